#!/usr/bin/env bash
# One command that proves qnref's GPU path on a fresh GPU machine (docs/gpu.md), in under 8 minutes:
#   1. installs what is missing: qnref itself (editable, with the test extra), CuPy for the driver's
#      CUDA (cupy-cuda13x, else cupy-cuda12x; the pip CUDA libraries when the system has none), torch
#      with CUDA for the comparison timings (optional; skipped when it cannot be installed in time);
#   2. runs every `gpu`-marked test;
#   3. runs tools/gpu_check.py: products and optimizer trajectories GPU vs CPU in float64
#      (≤ 1e-10 relative) and grad/Hv/Gv/ResNet-20 timings against torch-CUDA, as one table.
# Usage: bash tools/gpu_check.sh [tools/gpu_check.py options, e.g. --optimizers all --json out.json]
# Environment: PYTHON (default python3), GPU_CHECK_NO_INSTALL=1 to install nothing,
#              GPU_CHECK_TORCH=0 to skip the torch install, GPU_CHECK_WHEELS=DIR to install offline
#              from a folder of wheels (pip download cupy-cuda13x fastrlock cuda-pathfinder -d DIR
#              on a machine with internet). Exit status: 0 only when everything passed.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-python3}
T0=$(date +%s)
say() { printf '[gpu_check %4ss] %s\n' "$(( $(date +%s) - T0 ))" "$*"; }
PIP_SRC=()
[ -n "${GPU_CHECK_WHEELS:-}" ] && PIP_SRC=(--no-index --find-links "$GPU_CHECK_WHEELS")
pipi() { "$PY" -m pip install -q --disable-pip-version-check "${PIP_SRC[@]}" "$@"; }

if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | sed 's/^/[gpu] /'
else
  say "nvidia-smi not found (no NVIDIA driver?)"
fi

cupy_ok() {
  "$PY" - <<'EOF' 2>/dev/null
import cupy
a = cupy.arange(6.0).reshape(2, 3)
assert float((a @ a.T).sum()) == 70.0          # cuBLAS
cupy.linalg.eigh(a @ a.T)                      # cuSOLVER
cupy.random.default_rng(0).standard_normal(3)  # cuRAND
import cupyx.scipy.linalg                      # noqa: F401
EOF
}

if [ "${GPU_CHECK_NO_INSTALL:-0}" != 1 ]; then
  "$PY" -c "import qnref, pytest" 2>/dev/null || { say "installing qnref[test]"; pipi -e ".[test]" || pipi -e . pytest; }
  if ! cupy_ok; then
    for pkg in "cupy-cuda13x" "cupy-cuda13x[ctk]" "cupy-cuda12x" "cupy-cuda12x[ctk]"; do
      say "installing $pkg"
      "$PY" -m pip uninstall -q -y cupy-cuda13x cupy-cuda12x >/dev/null 2>&1
      timeout 300 "$PY" -m pip install -q --disable-pip-version-check "${PIP_SRC[@]}" "$pkg" && cupy_ok && break
    done
  fi
  if [ "${GPU_CHECK_TORCH:-1}" != 0 ] && ! "$PY" -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
    say "installing torch with CUDA (for the comparison timings; optional)"
    timeout 240 "$PY" -m pip install -q --disable-pip-version-check "${PIP_SRC[@]}" torch || say "torch-CUDA not installed: timings without the torch column"
  fi
fi
cupy_ok || { say "CuPy cannot use a CUDA device here: stopping (see docs/gpu.md, Installing)"; exit 2; }
"$PY" -c "from qnref import backend; import cupy; print('[gpu] CuPy', cupy.__version__, 'devices:', cupy.cuda.runtime.getDeviceCount(), 'available:', backend.gpu_available())"

say "running the gpu tests"
timeout 240 "$PY" -m pytest -q -m gpu -p no:cacheprovider -rs tests
TESTS=$?
say "gpu tests: exit $TESTS"

say "GPU vs CPU comparisons and timings"
timeout 240 "$PY" tools/gpu_check.py "$@"
CHECK=$?
say "done: tests exit $TESTS, check exit $CHECK"
[ "$TESTS" = 0 ] && [ "$CHECK" = 0 ]
