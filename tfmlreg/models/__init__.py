"""Models shipped inside the package (package data), found with :mod:`importlib.resources`.

Each is a model root: a versioned SavedModel (``NAME/1/``, the TF Serving layout) and
``NAME/model.keras`` (the same network, for fine-tuning, reduced precision and ONNX export).

- ``chest_ct/``, the default model of ``tfmlreg demo``, ``register`` and ``evaluate``: trained on
  real chest CT with synthetic breathing and on phantoms (card: ``docs/CHEST_CT_MODEL.md``).
- ``demo/``: trained on phantoms only (card: ``docs/DEMO_MODEL.md``); the default until the
  chest-CT model, kept as the phantom baseline.

Shipping them as package data is what lets a plain (non-editable) ``pip install`` run
``tfmlreg demo``. The default model is, in this order: the ``TFMLREG_MODEL`` environment variable
(a model path), else the shipped ``chest_ct``. Importing this module does not import TensorFlow.
"""

from __future__ import annotations

import os
from importlib import resources
from typing import cast

MODEL_VARIABLE = "TFMLREG_MODEL"
DEFAULT = "chest_ct"


def shipped(name: str = DEFAULT) -> str:
    """The folder of the shipped model ``name`` (a model root: ``1/`` and ``model.keras``)."""
    root = resources.files(__name__).joinpath(name)
    if not root.is_dir():
        available = sorted(entry.name for entry in resources.files(__name__).iterdir()
                           if entry.is_dir() and not entry.name.startswith(("_", ".")))
        raise FileNotFoundError(f"model {name!r}: not shipped with tfmlreg (shipped: "
                                f"{', '.join(available) or 'none'})")
    # A SavedModel is loaded from the file system; an installed package is a folder of files
    # (not a zip), so the traversable is a real path (a pathlib.Path).
    return os.fspath(cast("os.PathLike[str]", root))


def default_model() -> str:
    """The model the commands use without ``--model``: ``$TFMLREG_MODEL`` if set, else the
    shipped ``chest_ct``."""
    return os.environ.get(MODEL_VARIABLE) or shipped(DEFAULT)
