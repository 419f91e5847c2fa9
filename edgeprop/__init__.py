"""edgeprop: spiking keyword spotting that keeps learning on the device.

The computation lives here, in plain NumPy (numba kernels beside NumPy references):
audio features, spike encoders, the ALIF SRNN, e-prop, dense and sparse BPTT,
optimizers, datasets and checkpoints. No sockets, threads or devices.
"""

from edgeprop.errors import EdgepropError

__version__ = "0.1.0"
__all__ = ["EdgepropError", "__version__"]
