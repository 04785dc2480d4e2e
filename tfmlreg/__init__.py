"""tfmlreg: multilevel deep-learning 3D image registration (mlVIRNET) in Keras 3 / TensorFlow."""

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public names, imported on first use (PEP 562): importing ``tfmlreg`` (as the ``tfmlreg``
# command does) must not import TensorFlow, so ``tfmlreg --help`` answers at once. Add new
# public names here rather than as imports. name -> (module, attribute or None for the module)
_LAZY = {
    "losses": ("tfmlreg.losses", None),
    "metrics": ("tfmlreg.metrics", None),
    "compose": ("tfmlreg.geometry", "compose"),
    "resample": ("tfmlreg.geometry", "resample"),
    "resample_displacement": ("tfmlreg.geometry", "resample_displacement"),
    "warp": ("tfmlreg.geometry", "warp"),
    "MultilevelRegistration": ("tfmlreg.model", "MultilevelRegistration"),
    "fit_progressive": ("tfmlreg.training", "fit_progressive"),
    "refine": ("tfmlreg.refinement", "refine"),
    "RefineConfig": ("tfmlreg.refinement", "RefineConfig"),
}
__all__ = sorted(_LAZY)

if TYPE_CHECKING:  # what type checkers see: the same names (``x as x``: re-exported)
    from tfmlreg import losses as losses, metrics as metrics
    from tfmlreg.geometry import (compose as compose, resample as resample,
                                  resample_displacement as resample_displacement, warp as warp)
    from tfmlreg.model import MultilevelRegistration as MultilevelRegistration
    from tfmlreg.refinement import RefineConfig as RefineConfig, refine as refine
    from tfmlreg.training import fit_progressive as fit_progressive


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'tfmlreg' has no attribute {name!r}")
    module_name, attribute = _LAZY[name]
    module = importlib.import_module(module_name)
    value = module if attribute is None else getattr(module, attribute)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_LAZY))
