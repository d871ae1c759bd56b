"""Run by test_nccl_gpu.py under ``mpiexec -n 2``: NCCL all-reduce and all-gather on CuPy arrays."""
import json
import sys

import numpy as np

from qnref.distributed.comm import NCCLComm


def main() -> None:
    comm = NCCLComm()  # selects device rank % n_devices before any CuPy array exists
    import cupy

    r = comm.rank
    x = cupy.arange(6, dtype=cupy.float64) * (r + 1)
    s = comm.allreduce_sum(x)
    rows = cupy.full((r + 1, 2), float(r))
    g = comm.allgather_rows(rows, [1, 2])
    comm.barrier()
    out = {"rank": r, "device": comm.device_id, "sum": cupy.asnumpy(s).tolist(), "gather": cupy.asnumpy(g).tolist(),
           "on_device": type(s).__module__.startswith("cupy")}
    print("RESULT " + json.dumps(out))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
