"""Time the numba patch kernels (im2col_t, col2im_t) against those of another revision.

    python tools/patch_kernel_table.py [REV]        # REV defaults to 42be613~1 (before issue 21's
                                                    # unsigned-index kernels)

Loads ``qnref/nn/_numba_kernels.py`` as it was at REV (``git show``) next to the working tree's,
checks that both give the same bytes on every shape, and prints a Markdown table of per-chunk
times (float32, one thread, best of 40 calls, ms) at the chunk shapes ResNet-20 and LeNet-5 use
at batch 128 (docs/cnn.md, "Fourth round"). The two versions run interleaved in one process; the
machine's noise still moves single readings by tens of percent, so run it twice.
"""
from __future__ import annotations

import importlib.util
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qnref.nn import _numba_kernels as new  # noqa: E402
from qnref.nn.conv import out_size  # noqa: E402

#: (label, C_in, H = W, examples per chunk, kernel, stride, padding)
SHAPES = [
    ("ResNet-20 16→16, 32×32, 3 examples", 16, 32, 3, 3, 1, 1),
    ("32→32, 16×16, 7 examples", 32, 16, 7, 3, 1, 1),
    ("64→64, 8×8, 14 examples", 64, 8, 14, 3, 1, 1),
    ("16→32, 32×32, stride 2, 3 examples", 16, 32, 3, 3, 2, 1),
    ("LeNet-5 20→50, 5×5, 12×12, 8 examples", 20, 12, 8, 5, 1, 0),
    ("LeNet-5 1→20, 5×5, 28×28, 8 examples", 1, 28, 8, 5, 1, 0),
]


def load_revision(rev: str):
    """The kernel module as it was at ``rev``, imported from a temporary file."""
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:qnref/nn/_numba_kernels.py"],
                         check=True, capture_output=True, text=True).stdout
    path = pathlib.Path(tempfile.mkdtemp()) / "old_numba_kernels.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("old_numba_kernels", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def best_ms(fn, repeat: int = 40) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * min(times)


def main(rev: str) -> None:
    old = load_revision(rev)
    rng = np.random.default_rng(0)
    print(f"| chunk (float32, one thread) | im2col {rev} | working tree | col2im {rev} | working tree |")
    print("|---|---:|---:|---:|---:|")
    for label, c, hw, n, k, s, p in SHAPES:
        x = rng.standard_normal((n, c, hw, hw)).astype(np.float32)
        ho = out_size(hw, k, s, p)
        cols = [np.empty((c, k, k, n, ho, ho), np.float32) for _ in range(2)]
        g = rng.standard_normal(cols[0].shape).astype(np.float32)
        dst = [np.zeros(x.shape, np.float32) for _ in range(2)]
        row = []
        for mod, out in zip((old, new), cols):
            row.append(best_ms(lambda: mod.im2col_t(x, out, s, s, p, p)))
        for mod, d in zip((old, new), dst):
            def scatter(mod=mod, d=d):
                d.fill(0)
                mod.col2im_t(g, d, s, s, p, p)
            row.append(best_ms(scatter))
        if cols[0].tobytes() != cols[1].tobytes() or dst[0].tobytes() != dst[1].tobytes():
            raise SystemExit(f"{label}: the two revisions give different bytes")
        print(f"| {label} | " + " | ".join(f"{t:.3f}" for t in row) + " |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "42be613~1")
