#!/usr/bin/env bash
# The whole GPU verification in one command, on a bare GPU machine (no package registry):
#   benchmarks/gpu/verify.sh [--wheels DIR] [--out DIR] [--dry-run]
# 1. installs the carried wheels (benchmarks/gpu/fetch_wheels.sh) into /tmp/site, without dependencies;
# 2. builds the extension with its CUDA sources in place (setup.py build_ext, DDIMGMM_FORCE_CUDA=1);
# 3. runs the whole test suite (CUDA cases included) and compute-sanitizer on the thin-SVD and step tests;
# 4. runs every benchmark on CUDA and writes step_cuda.json, thin_svd_cuda.json, loop_cuda.json,
#    schedulers_cuda.json and verify.log into --out.
# Expected on an H100: build ~2 min, tests ~5 min, sanitizer ~3 min, benchmarks ~5 min (under 20 minutes).
# --dry-run prints every command instead of running it (CI checks that on a CPU machine).
set -euo pipefail
wheels=.whl
out="${OUT:-gpu_results}"
dry=0
while [ $# -gt 0 ]; do
    case "$1" in
        --wheels) wheels="$2"; shift 2 ;;
        --out) out="$2"; shift 2 ;;
        --dry-run) dry=1; shift ;;
        -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
        *) echo "verify.sh: unknown argument $1 (expected --wheels DIR, --out DIR, --dry-run)" >&2; exit 2 ;;
    esac
done
cd "$(dirname "$0")/../.."
py=python3
run() {
    echo "+ $*"
    if [ "$dry" -eq 0 ]; then "$@"; fi
}
[ "$dry" -eq 1 ] || mkdir -p "$out"

if compgen -G "$wheels/*.whl" > /dev/null || [ "$dry" -eq 1 ]; then
    run $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$wheels"/*.whl
fi
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
run env DDIMGMM_FORCE_CUDA=1 $py setup.py build_ext --inplace -q
run $py -c "import torch, ddim_gmm_ext; assert torch.cuda.is_available(), 'no CUDA device'"
run $py -m pytest tests -q -p no:cacheprovider -rs
if command -v compute-sanitizer > /dev/null || [ "$dry" -eq 1 ]; then
    run compute-sanitizer --tool memcheck --error-exitcode 1 $py -m pytest tests/ops/test_thin_svd.py \
        tests/ops/test_step.py tests/ops/test_step_table.py -q -p no:cacheprovider -k cuda
fi
run $py benchmarks/run_step_bench.py --device cuda --out "$out/step_cuda.json"
run $py benchmarks/thin_svd_results.py --device cuda --out "$out/thin_svd_cuda.json"
run $py benchmarks/run_loop_bench.py --device cuda --out "$out/loop_cuda.json"
run $py -m pytest benchmarks/bench_schedulers.py -q -p no:cacheprovider --benchmark-json "$out/schedulers_cuda.json"
echo "results in $out"
