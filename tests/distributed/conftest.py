"""Tests marked ``mpi`` (registered in pyproject.toml) launch ``mpiexec -n 2``; they FAIL, not skip,
when mpiexec or mpi4py is missing: install the test extra's ``mpi4py`` and ``mpich``."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # mpi_script (shared with the MPI side)

