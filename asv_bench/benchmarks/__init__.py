"""qnref's asv benchmarks. Importing the package pins the thread counts (``_common``) before any
benchmark module loads NumPy."""
from . import _common  # noqa: F401  (thread pinning, first)
