"""Output folders and files that appear whole or not at all, written by one run at a time.

A command writes into a hidden staging folder beside its output (``.NAME.staging-XXXXXXXX``) and
renames it into place only when it has succeeded, so an error, Ctrl-C or ``kill`` never leaves
a partial output. The output must not exist or be empty, unless ``overwrite`` (then the old
content is replaced, also only at the end).

A run holds an exclusive lock on its output for its whole life: ``fcntl.flock`` on a hidden
``.NAME.lock`` beside it. The operating system releases the lock when the process ends, however
it ends (``kill -9`` included), so a second run aimed at the same output is refused at once and a
later run is never blocked by a dead one. The run that takes the lock removes what killed runs
left beside the output (staging folders, replaced outputs).

Messages name the output by ``what``, the caller's name for it (the argument ``out`` of
:mod:`tfmlreg.commands` by default; the command line shows its flags). No TensorFlow here.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import shutil
from collections.abc import Iterator
from typing import IO

from tfmlreg.types import PathLike

STAGING = "staging"
REPLACED = "old"


class OutputError(ValueError):
    """An output that cannot be used (exists, not writable, in use); one line naming it."""


def _beside(path: PathLike, kind: str) -> str:
    """``DIR/.NAME.KIND-<random>``: a hidden sibling of ``path`` on the same file system."""
    parent, name = os.path.split(os.path.abspath(path))
    return os.path.join(parent, f".{name}.{kind}-{secrets.token_hex(4)}")


def leftovers(path: PathLike) -> list[str]:
    """Hidden siblings that runs on ``path`` left behind (staging folders, replaced outputs)."""
    parent, name = os.path.split(os.path.abspath(path))
    if not os.path.isdir(parent):
        return []
    prefixes = tuple(f".{name}.{kind}-" for kind in (STAGING, REPLACED))
    return [os.path.join(parent, entry) for entry in os.listdir(parent) if entry.startswith(prefixes)]


def _remove(path: PathLike) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


def check_parent(path: PathLike, what: str) -> list[str]:
    """Make the folder that will hold ``path`` (if need be); returns the folders it made,
    deepest first. Raises OutputError if that folder cannot be written."""
    parent = os.path.dirname(os.path.abspath(path))
    missing = []
    existing = parent
    while not os.path.exists(existing):  # the nearest existing ancestor decides
        missing.append(existing)
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise OutputError(f"{what}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"{what}: cannot write in {existing} (permission denied)")
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as error:
        raise OutputError(f"{what}: cannot create {parent} ({error.strerror})") from None
    return missing


def check_target(path: PathLike, overwrite: bool, what: str, folder: bool = True) -> None:
    """Refuse an output that exists with content, unless ``overwrite``; refuse a wrong kind."""
    if not os.path.lexists(path):
        return
    if folder and not os.path.isdir(path):
        raise OutputError(f"{what}: {path} exists and is not a folder")
    if not folder and os.path.isdir(path):
        raise OutputError(f"{what}: {path} is a folder; give a file name")
    if overwrite:
        return
    if folder and not os.listdir(path):
        return  # an empty folder is as good as none
    raise OutputError(f"{what}: {path} exists and is not empty; use overwrite=True to replace "
                      "it, or choose another output")


@contextlib.contextmanager
def locked(path: PathLike, what: str = "out") -> Iterator[None]:
    """Hold the exclusive lock of ``path`` (which need not exist) for the ``with`` block."""
    made = check_parent(path, what)
    parent, name = os.path.split(os.path.abspath(path))
    lock_path = os.path.join(parent, f".{name}.lock")
    handle = _acquire(lock_path, path, what)
    try:
        for stale in leftovers(path):  # the lock is ours: nobody else is writing these
            _remove(stale)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.remove(lock_path)
        handle.close()  # releases the flock
        for folder in made:  # parents made for an output that did not come: no empty folders
            with contextlib.suppress(OSError):
                os.rmdir(folder)


def _acquire(lock_path: str, path: PathLike, what: str) -> IO[str]:
    """Open and flock ``lock_path``; retried when another run removed the file meanwhile."""
    while True:
        try:
            handle = open(lock_path, "a+")
        except OSError as error:
            raise OutputError(f"{what}: cannot write {lock_path} ({error.strerror})") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            handle.close()
            if error.errno in (errno.EAGAIN, errno.EACCES):
                raise OutputError(f"{what}: {path} is being written by another tfmlreg run "
                                  f"(lock {lock_path}); wait for it or choose another output") from None
            raise
        # The holder before us removes the file when it finishes; a lock on that removed file
        # would not exclude a run that creates a new one, so only a lock on the current file counts.
        try:
            current = os.stat(lock_path).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(handle.fileno()).st_ino:
            return handle
        handle.close()


# Signals the command layer turned into exceptions (Ctrl-C, SIGTERM). A library may swallow
# such an exception where it lands (a bare ``except`` in an import, a finaliser), and the
# command would then run to its end; the commit point below raises it again instead.
signalled: list[type[BaseException]] = []


def raise_if_signalled() -> None:
    """Raise the exception of a signal received earlier in this command, if any."""
    if signalled:
        raise signalled[0]()


@contextlib.contextmanager
def staged(path: PathLike, overwrite: bool = False, what: str = "out",
           folder: bool = True) -> Iterator[str]:
    """Lock ``path``, check it, and yield an empty hidden staging folder beside it.

    On success, a ``folder`` output becomes the staging folder itself; a file output is the file
    of the same name inside it. On any exception (Ctrl-C included) the staging folder goes and
    ``path`` is left as it was.
    """
    with locked(path, what):
        check_target(path, overwrite, what, folder)
        staging = _beside(path, STAGING)
        os.mkdir(staging)
        try:
            yield staging
            raise_if_signalled()  # an interrupted command never commits its output
            if folder:
                _replace_folder(staging, path)
            else:
                os.replace(os.path.join(staging, os.path.basename(path)), path)
        finally:
            _remove(staging)


def _replace_folder(staging: str, path: PathLike) -> None:
    """Put ``staging`` at ``path``; an existing ``path`` is moved aside first, then removed."""
    if not os.path.lexists(path):
        os.rename(staging, path)
        return
    replaced = _beside(path, REPLACED)
    os.rename(path, replaced)
    try:
        os.rename(staging, path)
    except BaseException:
        os.rename(replaced, path)
        raise
    _remove(replaced)
