#!/usr/bin/env bash
# Rehearses the GPU verification on a CPU machine with the GPU machine's software, so that what would fail
# there for its versions fails here first (and GPU time goes to measuring):
#   tools/gpu/rehearse.sh [DIR]        (default /tmp/ddimgmm_rehearsal; needs python3.12 and a registry;
#                                           exit status 3: no python3.12 here)
# In DIR: a Python 3.12 venv with that machine's torch, triton and numpy (the CUDA build of torch, which runs on
# a CPU), the wheels verify.sh carries (fetch_wheels.sh), and a copy of this checkout's files (tracked and
# untracked, not ignored), where `verify.sh --rehearse` builds the extension with its CUDA sources, runs the
# tests and the benchmarks on the CPU, and writes DIR/out (verify.log, tests.xml, the JSON files).
# Versions as the device tool's machine page lists them (python 3.12, torch 2.11.0+cu130, triton 3.6.0).
set -euo pipefail
dir="${1:-/tmp/ddimgmm_rehearsal}"
root="$(cd "$(dirname "$0")/../.." && pwd)"
# a python3.12 that runs (a pyenv shim on PATH may not), else one of pyenv's versions
python312=""
for candidate in "$(command -v python3.12 || true)" "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12; do
    if [ -n "$candidate" ] && [ -x "$candidate" ] && "$candidate" -c "import venv" 2> /dev/null; then
        python312="$candidate"
        break
    fi
done
[ -n "$python312" ] || { echo "rehearse.sh: no working python3.12 found" >&2; exit 3; }
mkdir -p "$dir"
dir="$(cd "$dir" && pwd)"
if [ ! -x "$dir/venv/bin/python3" ]; then
    "$python312" -m venv "$dir/venv"
fi
# The GPU machine's image (KINDS.md): what the project's tests and benchmarks import, at its versions where
# they matter (torch, triton, numpy, transformers); everything verify.sh carries is installed by verify.sh.
"$dir/venv/bin/python3" -m pip install -q torch==2.11.0 triton==3.6.0 numpy==2.5.2 transformers==5.17.0 \
    huggingface_hub safetensors regex requests pillow scipy scikit-learn matplotlib pytest pytest-benchmark \
    torchdiffeq tqdm ninja setuptools wheel build
rm -rf "$dir/src" "$dir/out" "$dir/site"
mkdir -p "$dir/src"
git -C "$root" ls-files -z --cached --others --exclude-standard \
    | tar -C "$root" --null --ignore-failed-read -T - -cf - | tar -xf - -C "$dir/src"
bash "$dir/src/tools/gpu/fetch_wheels.sh" "$dir/whl" > /dev/null
# --budget: verify.sh's default is a GPU lease's (a 16-core machine); on CI's 2 cores every step must still run,
# or the rehearsal would check less than the lease runs
PATH="$dir/venv/bin:$PATH" bash "$dir/src/tools/gpu/verify.sh" --rehearse --wheels "$dir/whl" \
    --site "$dir/site" --out "$dir/out" --budget 3600
