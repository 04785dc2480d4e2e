"""Data: file I/O (:mod:`.io`), the breathing-lung phantom (:mod:`.phantom`) and the tf.data
pipeline onto the network grid (:mod:`.pipeline`)."""

from tfmlreg.data import io, phantom, pipeline  # noqa: F401
