#!/usr/bin/env bash
# Full-statistics run of the asv suite on one commit, family by family (asv saves a commit's
# results only when a run ends, so each family's results are kept even if a later one is
# interrupted), then the claims table. Takes about 25–35 minutes on the 2-core machine; run it on
# a quiet machine (other jobs stretch single timings).
#
#   bash tools/asv_full_run.sh                 # HEAD, every family
#   bash tools/asv_full_run.sh <commit> "bench_engine|bench_cnn" …   # one commit, chosen families
set -uo pipefail
ROOT=$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)
COMMIT=$(git -C "$ROOT" rev-parse "${1:-HEAD}")
shift || true
FAMILIES=("$@")
[ ${#FAMILIES[@]} -eq 0 ] && FAMILIES=("bench_process|bench_engine" "bench_cnn" "bench_lsr1_scaling" "bench_families"
                                       "bench_optimizers|bench_algebra|bench_variants" "bench_kfac|bench_kbfgs"
                                       "bench_smw_tnt|bench_speed_ratios")
cd "$ROOT/asv_bench" || exit 1
asv machine --yes >/dev/null
status=0
for fam in "${FAMILIES[@]}"; do
    echo "+ asv run -b \"$fam\" ${COMMIT:0:8}^!   ($(date -u +%H:%M:%S) UTC)"
    asv run -b "$fam" "$COMMIT^!" || status=1
done
cd "$ROOT" && python -m asv_bench.claims --commit "$COMMIT"
exit $status
