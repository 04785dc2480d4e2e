"""tfmlreg: multilevel deep-learning 3D image registration (mlVIRNET) in Keras 3 / TensorFlow."""

from tfmlreg import losses, metrics
from tfmlreg.geometry import compose, resample, resample_displacement, warp
from tfmlreg.model import MultilevelRegistration
from tfmlreg.training import fit_progressive

__version__ = "0.1.0"
