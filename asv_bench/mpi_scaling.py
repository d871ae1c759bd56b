"""Step time of data-parallel training with P = 1, 2, … MPI ranks (docs/distributed.md).

    python asv_bench/mpi_scaling.py                 # P = 1 and 2, prints a markdown table
    python asv_bench/mpi_scaling.py --ranks 1 2 4 --batch 8192 --steps 10

Each P runs ``mpiexec -n P python asv_bench/mpi_scaling.py --worker …`` with one BLAS thread per
rank (OMP_NUM_THREADS=1), so P = 2 uses two cores; the P = 1 row with ``--threads 2`` (one process,
two BLAS threads) is the fair one-process baseline on a 2-core machine. Timing: median wall time of
``--steps`` optimizer steps after ``--warmup`` steps, measured on rank 0 (all ranks finish a step
together, the collectives synchronise them). The communicator is wrapped to count the bytes passed
to allreduce / allgather per step.

Not an asv benchmark (asv runs one process); a plain script whose numbers go into the docs.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

METHODS = {
    "sgd": {"lr": 0.05},
    "lbfgs": {},
    "lsr1-tr": {},
    "kfac": {"inv_freq": 20, "warm_start": False},
    "smw-ng": {"curvature_batch": 256},
}


class CountingComm:
    """Proxy of a communicator that adds up the payload bytes of its collectives."""

    def __init__(self, comm):
        self._c = comm
        self.reduced = 0
        self.gathered = 0

    def __getattr__(self, name):
        return getattr(self._c, name)

    def allreduce_sum(self, x):
        self.reduced += 8 if isinstance(x, (int, float)) else int(x.nbytes)
        return self._c.allreduce_sum(x)

    def allgather_rows(self, x, counts):
        row = int(x.nbytes // max(x.shape[0], 1))
        self.gathered += row * sum(counts)
        return self._c.allgather_rows(x, counts)


def worker(a) -> None:
    import numpy as np

    from qnref.distributed import DistributedProblem, get_comm
    from qnref.nn.activations import Tanh
    from qnref.nn.dense import Dense
    from qnref.nn.model import Sequential
    from qnref.optim import make_optimizer

    comm = CountingComm(get_comm())
    r = np.random.default_rng(0)
    d, C = a.dim, 10
    X = r.standard_normal((a.n, d)).astype(a.dtype)
    y = r.integers(0, C, a.n)
    layers = []
    for h in a.hidden:
        layers += [Dense(h), Tanh()]
    model = Sequential(layers + [Dense(C)], input_shape=(d,))
    out = {"P": comm.size, "threads": int(os.environ.get("OMP_NUM_THREADS", "0") or 0), "n_params": model.n_params,
           "batch": a.batch, "methods": {}}
    for name in a.methods:
        kw = dict(METHODS[name])
        if name == "smw-ng":
            kw["batch_size"] = a.batch
        else:
            kw["batch_size"] = a.batch
        prob = DistributedProblem(model, "softmax_ce", X, y, 1e-4, seed=0, comm=comm)
        opt = make_optimizer(name, **kw)
        theta = model.init(0, dtype=a.dtype)
        state = opt.init(theta)
        for _ in range(a.warmup):
            theta, state, _ = opt.step(theta, state, prob)
        times, red, gat = [], [], []
        for _ in range(a.steps):
            comm.reduced = comm.gathered = 0
            comm.barrier()
            t0 = time.perf_counter()
            theta, state, info = opt.step(theta, state, prob)
            times.append(time.perf_counter() - t0)
            red.append(comm.reduced)
            gat.append(comm.gathered)
        out["methods"][name] = {"step_s": statistics.median(times), "allreduce_bytes": statistics.median(red),
                                "allgather_bytes": statistics.median(gat)}
    if comm.is_root:
        print("RESULT " + json.dumps(out), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--threads", type=int, default=None, help="also run P = 1 with this many BLAS threads")
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--n", type=int, default=16384, help="training examples")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--hidden", type=int, nargs="+", default=[512, 512])
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--dtype", default="float64")
    a = ap.parse_args()
    if a.worker:
        worker(a)
        return
    mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    if not os.path.exists(mpiexec):
        mpiexec = shutil.which("mpiexec") or sys.exit("mpiexec not found (pip install mpi4py mpich)")
    fwd = ["--methods", *a.methods, "--n", str(a.n), "--dim", str(a.dim), "--hidden", *map(str, a.hidden),
           "--batch", str(a.batch), "--steps", str(a.steps), "--warmup", str(a.warmup), "--dtype", a.dtype]
    runs = [(p, 1) for p in a.ranks] + ([(1, a.threads)] if a.threads else [])
    results = []
    for p, th in runs:
        env = dict(os.environ, OMP_NUM_THREADS=str(th), OPENBLAS_NUM_THREADS=str(th), MKL_NUM_THREADS=str(th))
        env.pop("QNREF_COMM", None)
        cmd = [mpiexec, "-n", str(p), sys.executable, os.path.abspath(__file__), "--worker", *fwd]
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
        line = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")][-1]
        results.append(json.loads(line[7:]))
    base = {m: results[0]["methods"][m]["step_s"] for m in a.methods}
    print(f"n_params = {results[0]['n_params']:,}, global batch {a.batch}, {a.dtype}, "
          f"MLP {a.dim}-{'-'.join(map(str, a.hidden))}-10\n")
    print("| method | P | BLAS threads/rank | step time [ms] | speed-up vs P=1 (1 thread) | allreduce / step | allgather / step |")
    print("|---|---|---|---|---|---|---|")
    for m in a.methods:
        for r in results:
            x = r["methods"][m]
            print(f"| {m} | {r['P']} | {r['threads']} | {1e3 * x['step_s']:.1f} | {base[m] / x['step_s']:.2f} | "
                  f"{x['allreduce_bytes'] / 1e6:.2f} MB | {x['allgather_bytes'] / 1e6:.3f} MB |")


if __name__ == "__main__":
    main()
