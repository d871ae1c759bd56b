#!/usr/bin/env bash
# Planted-regression demo for the asv record (docs/benchmarks.md, "Catching a regression").
#
# In a scratch clone of this repository (committed HEAD, never the working tree):
#   commit A = HEAD,
#   commit B = A + a deliberate extra pass in every gradient (a forward pass over 3/4 of the
#              batch, ≈ +25 % of a gradient's time, +0.375 gradient-equivalent passes),
#   commit C = revert of B.
# Then the documented comparison command, asv continuous, must report B as a regression
# against A ("PERFORMANCE DECREASED") and C as an improvement against B ("PERFORMANCE INCREASED").
# asv builds and installs each commit into its own virtualenv (asv.conf.json).
#
# Not a CI test: it builds a virtualenv (about a minute with a warm pip cache) and three commits,
# and times the gradient with full statistics (a few minutes in all on 2 cores).
#
#   bash tools/asv_regression_demo.sh                 # scratch dir under /tmp, kept for inspection
#   QNREF_DEMO_DIR=/tmp/demo bash tools/asv_regression_demo.sh
#   QNREF_DEMO_ENV_DIR=/tmp/qnref-asv-env bash tools/asv_regression_demo.sh   # reuse a virtualenv dir
#
# Exit 0 when both verdicts come out as expected, 1 otherwise.
set -uo pipefail

SRC=$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)
WORK=${QNREF_DEMO_DIR:-$(mktemp -d /tmp/qnref-asv-demo.XXXXXX)}
BENCH=${QNREF_DEMO_BENCH:-'AutoencoderProducts.time_forward_backward|ProductPasses.track_passes_grad'}
FACTOR=${QNREF_DEMO_FACTOR:-1.1}
# one BLAS/chunk thread by default: on a shared 2-core machine, two-thread BLAS calls stall on
# thread wake-ups and a 25 % change drowns in the noise (QNREF_BENCH_THREADS=2 for the record's setting)
export QNREF_BENCH_THREADS=${QNREF_BENCH_THREADS:-1}

run() { echo "+ $*" >&2; "$@"; }

rm -rf "$WORK/repo"
mkdir -p "$WORK"
run git clone -q "$SRC" "$WORK/repo" || exit 1
cd "$WORK/repo" || exit 1
git config user.email "asv-demo@example.invalid"
git config user.name "asv regression demo"
A=$(git rev-parse HEAD)

# B: the planted regression, appended to the engine's objective (no anchor to break)
cat >> qnref/curvature/objective.py <<'EOF'


# --- planted regression (tools/asv_regression_demo.sh): an extra pass in every gradient --------
_planted_grad = Objective.grad


def _planted_slow_grad(self, theta):
    self.subset(slice(0, (3 * self.X.shape[0]) // 4)).at(theta).value  # forward over 3/4 of the batch
    return _planted_grad(self, theta)


Objective.grad = _planted_slow_grad
EOF
run git commit -q -m "planted regression: an extra forward pass over 3/4 of the batch in every gradient" qnref/curvature/objective.py || exit 1
B=$(git rev-parse HEAD)
run git revert --no-edit HEAD >/dev/null || exit 1
C=$(git rev-parse HEAD)
echo "A (base)      $A"
echo "B (regressed) $B"
echo "C (reverted)  $C"

cd asv_bench || exit 1
if [ -n "${QNREF_DEMO_ENV_DIR:-}" ]; then
    mkdir -p "$QNREF_DEMO_ENV_DIR"
    ln -sfn "$QNREF_DEMO_ENV_DIR" env
fi
run asv machine --yes >/dev/null

# a verdict counts only if asv's table flags the gradient's time itself (not only the pass count)
flagged() { grep -qE "^\| \\$2 .*AutoencoderProducts\.time_forward_backward" "$1" && grep -q "$3" "$1"; }
status=0
run asv continuous --factor "$FACTOR" -b "$BENCH" "$A" "$B" 2>&1 | tee "$WORK/continuous_A_B.log"
if flagged "$WORK/continuous_A_B.log" "+" "PERFORMANCE DECREASED"; then
    echo "demo: B flagged as a regression against A (as planted)"
else
    echo "demo: FAILED: B's gradient time was not flagged as a regression"; status=1
fi
run asv continuous --factor "$FACTOR" -b "$BENCH" "$B" "$C" 2>&1 | tee "$WORK/continuous_B_C.log"
if flagged "$WORK/continuous_B_C.log" "-" "PERFORMANCE INCREASED"; then
    echo "demo: C flagged as an improvement against B (the revert)"
else
    echo "demo: FAILED: C's gradient time was not flagged as an improvement"; status=1
fi
# the saved results, read back by the documented commands
run asv compare --factor "$FACTOR" "$A" "$B" 2>&1 | tee "$WORK/compare_A_B.log"
run asv compare --factor "$FACTOR" --split "$A" "$C" 2>&1 | tee "$WORK/compare_A_C.log"
echo "logs and results: $WORK"
exit $status
