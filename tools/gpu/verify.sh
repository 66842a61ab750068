#!/usr/bin/env bash
# The whole GPU verification in one command, on a bare GPU machine (no package registry):
#   tools/gpu/verify.sh [--wheels DIR] [--out DIR] [--site DIR] [--budget SECONDS] [--dry-run] [--rehearse]
# In order of what a short lease needs most:
# 1. installs the carried wheels (tools/gpu/fetch_wheels.sh) into --site (/tmp/site), without dependencies,
#    and builds the extension with its CUDA sources in place (setup.py build_ext, DDIMGMM_FORCE_CUDA=1);
# 2. the tests that run on the device (pytest -k cuda: the CUDA parametrisations and test_cuda_loop.py);
# 3. every benchmark on CUDA: step_cuda.json, thin_svd_cuda.json, loop_cuda.json, schedulers_cuda.json;
# 4. compute-sanitizer on the thin-SVD and step tests, then the rest of the suite (CPU cases: CI and
#    rehearse.sh run them too; tests that install from a registry are deselected).
# Results go to --out as each step ends (tests_*.xml, the JSON files, verify.log), so a run stopped at its time
# limit still returns what it finished. A step that would start after --budget seconds (default 480) is
# skipped; a failing step is recorded and the rest still run; the exit status is 1 if any step failed.
# --dry-run prints every command instead of running it (CI checks that on a CPU machine).
# --rehearse runs the same steps on a CPU machine (tools/gpu/rehearse.sh gives it the GPU machine's
#   Python, torch and triton): the CUDA build without a device, the tests, the benchmarks on the CPU with short
#   timings, no sanitizer.
set -uo pipefail
wheels=.whl
out="${OUT:-gpu_results}"
site=/tmp/site
budget=480
dry=0
rehearse=0
while [ $# -gt 0 ]; do
    case "$1" in
        --wheels) wheels="$2"; shift 2 ;;
        --out) out="$2"; shift 2 ;;
        --site) site="$2"; shift 2 ;;
        --budget) budget="$2"; shift 2 ;;
        --dry-run) dry=1; shift ;;
        --rehearse) rehearse=1; shift ;;
        -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
        *) echo "verify.sh: unknown argument $1 (expected --wheels DIR, --out DIR, --site DIR, --budget SECONDS," \
               "--dry-run, --rehearse)" >&2
           exit 2 ;;
    esac
done
cd "$(dirname "$0")/../.." || exit 1
py=python3
[ "$dry" -eq 1 ] || mkdir -p "$out" || exit 1
out="$(cd "$out" 2>/dev/null && pwd || echo "$out")"
log="$out/verify.log"
failed=()
skipped=()
SECONDS=0

# step NAME CMD...: prints CMD, runs it (output also into verify.log) and records NAME if it fails; past the
# budget it records NAME as skipped instead.
step() {
    local name="$1"
    shift
    echo "+ $*"
    [ "$dry" -eq 1 ] && return 0
    if [ "$SECONDS" -ge "$budget" ] && [ "$name" != wheels ] && [ "$name" != build ]; then
        echo "verify.sh: $name skipped: ${SECONDS}s used of a ${budget}s budget" | tee -a "$log"
        skipped+=("$name")
        return 0
    fi
    echo "+ $*" >> "$log"
    if ! "$@" 2>&1 | tee -a "$log"; then
        failed+=("$name")
        return 1
    fi
}

if compgen -G "$wheels/*.whl" > /dev/null || [ "$dry" -eq 1 ]; then
    step wheels $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
        "$wheels"/*.whl || exit 1
fi
export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# torch takes the toolkit from CUDA_HOME, else from the nvcc on PATH, which may be a wrapper script outside it
if [ -z "${CUDA_HOME:-}" ] && [ -d /usr/local/cuda/lib64 ]; then export CUDA_HOME=/usr/local/cuda; fi

step build env DDIMGMM_FORCE_CUDA=1 $py setup.py build_ext --inplace -q || exit 1
if [ "$rehearse" -eq 1 ]; then
    dev=cpu
    step_flags=(--min-run-time 0.02)
    svd_flags=(--repeats 1)
    loop_flags=(--repeats 2 --steps 3)
    sched_flags=(--benchmark-min-rounds=1 --benchmark-max-time=0.001 --benchmark-warmup=off)
else
    dev=cuda
    step_flags=() svd_flags=() loop_flags=() sched_flags=()
    step device $py -c "import torch, ddim_gmm_ext; assert torch.cuda.is_available(), 'no CUDA device'" || exit 1
fi
tests=($py -m pytest tests -q -p no:cacheprovider -rs -m "not registry")
step device_tests "${tests[@]}" -k cuda --junitxml "$out/tests_device.xml"
step step_bench $py benchmarks/run_step_bench.py --device $dev "${step_flags[@]}" --out "$out/step_$dev.json"
step thin_svd_bench $py benchmarks/thin_svd_results.py --device $dev "${svd_flags[@]}" --out "$out/thin_svd_$dev.json"
step loop_bench $py benchmarks/run_loop_bench.py --device $dev "${loop_flags[@]}" --out "$out/loop_$dev.json"
step scheduler_bench $py -m pytest benchmarks/bench_schedulers.py -q -p no:cacheprovider "${sched_flags[@]}" \
    --benchmark-json "$out/schedulers_$dev.json"
if [ "$rehearse" -eq 0 ] && { command -v compute-sanitizer > /dev/null || [ "$dry" -eq 1 ]; }; then
    step sanitizer compute-sanitizer --tool memcheck --error-exitcode 1 $py -m pytest tests/ops/test_thin_svd.py \
        tests/ops/test_step.py tests/ops/test_step_table.py -q -p no:cacheprovider -k cuda
fi
step other_tests "${tests[@]}" -k "not cuda" --junitxml "$out/tests_other.xml"
[ "${#skipped[@]}" -eq 0 ] || echo "verify.sh: skipped for the budget: ${skipped[*]}" >&2
if [ "${#failed[@]}" -gt 0 ]; then
    echo "verify.sh: failed steps: ${failed[*]} (log: $log)" >&2
    exit 1
fi
echo "results in $out"
