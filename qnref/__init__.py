"""qnref: a reference engine for second-order and quasi-Newton optimization of neural networks.

    import qnref
    opt = qnref.optim.LSR1TrustRegion(memory=5)       # or qnref.optim.make_optimizer("lsr1-tr")

Subpackages: :mod:`qnref.backend`, :mod:`qnref.params`, :mod:`qnref.nn`, :mod:`qnref.curvature`,
:mod:`qnref.optim`, :mod:`qnref.data`, :mod:`qnref.train`, :mod:`qnref.distributed`.
"""
from . import backend, optim

__version__ = "0.1.0"
__all__ = ["backend", "optim", "__version__"]
