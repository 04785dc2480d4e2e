"""A persistent cache of XLA executables, so a new ``tfmlreg`` process does not compile again.

The refinement compiles one XLA step per working-grid shape (about 1.5-2 s each on 2 cores for
the two finest levels), the network's geometry a few more; a later run on grids of the same
shapes (the same scan size and spacing) loads them instead. TensorFlow keeps them on disk when
``TF_XLA_FLAGS`` holds ``--tf_xla_persistent_cache_directory``; this module sets that flag for
the ``tfmlreg`` command. It must run before TensorFlow is imported (TensorFlow reads its flags
then), so it imports nothing heavy.

``TFMLREG_XLA_CACHE``: the cache directory; ``off`` (or ``0``) disables the cache. Default:
``$XDG_CACHE_HOME/tfmlreg/xla/<machine>`` (``~/.cache`` without XDG), where ``<machine>`` is a
fingerprint of the TensorFlow version and of the CPU's instruction-set flags: an executable is
machine code for one CPU, and loading one built for another could crash (SIGILL), so a shared
home directory keeps one cache per kind of machine. A ``TF_XLA_FLAGS`` that already names a
persistent cache is left alone. Python API users set ``TF_XLA_FLAGS`` themselves, before
importing TensorFlow: ``--tf_xla_persistent_cache_directory=DIR``.
"""

from __future__ import annotations

import hashlib
import os
import platform
from collections.abc import MutableMapping
from importlib import metadata

CACHE_VARIABLE = "TFMLREG_XLA_CACHE"
DISABLED = ("off", "0")
FLAG = "--tf_xla_persistent_cache_directory"


def machine_fingerprint() -> str:
    """A short hash of what an executable depends on: TensorFlow's version, the CPU architecture
    and its instruction-set flags (Linux: ``/proc/cpuinfo``; elsewhere the processor name)."""
    parts = [_tensorflow_version(), platform.machine(), _cpu_flags() or platform.processor()]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def _tensorflow_version() -> str:
    for name in ("tensorflow", "tensorflow-cpu"):
        try:
            return f"{name}=={metadata.version(name)}"
        except metadata.PackageNotFoundError:
            continue
    return "tensorflow"


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return ""


def default_directory(environ: MutableMapping[str, str] = os.environ) -> str:
    base = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "tfmlreg", "xla", machine_fingerprint())


def with_cache_flag(xla_flags: str, directory: str) -> str:
    """``xla_flags`` (the value of ``TF_XLA_FLAGS``) plus the persistent-cache flag, unless it
    names a cache already."""
    if FLAG in xla_flags:
        return xla_flags
    return " ".join(part for part in (xla_flags.strip(), f"{FLAG}={directory}") if part)


def enable(environ: MutableMapping[str, str] = os.environ) -> str | None:
    """Point TensorFlow's persistent XLA cache at ``TFMLREG_XLA_CACHE`` (or the default) in
    ``environ``; returns the directory, or None when disabled, already configured or not
    writable (the cache only saves time: without it everything works, compiling afresh)."""
    choice = environ.get(CACHE_VARIABLE, "").strip()
    if choice.lower() in DISABLED or FLAG in environ.get("TF_XLA_FLAGS", ""):
        return None
    directory = choice or default_directory(environ)
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError:
        return None
    if not os.access(directory, os.W_OK):
        return None
    environ["TF_XLA_FLAGS"] = with_cache_flag(environ.get("TF_XLA_FLAGS", ""), directory)
    return directory
