"""tfmlreg: multilevel deep-learning 3D image registration (mlVIRNET) in Keras 3 / TensorFlow."""

from tfmlreg.geometry import compose, resample, resample_displacement, warp

__version__ = "0.1.0"
