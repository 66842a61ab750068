#!/usr/bin/env bash
# Downloads, on a machine with a package registry, the wheels that tools/gpu/verify.sh installs on the
# bare GPU machine (Python 3.12 there; it has torch, triton, transformers, scipy, pytest(-benchmark) already).
#   tools/gpu/fetch_wheels.sh [DIR]        (default .whl; keep it out of git: echo /.whl/ >> .git/info/exclude)
set -euo pipefail
dir="${1:-.whl}"
mkdir -p "$dir"
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$dir" diffusers==0.42.1 k-diffusion==0.1.1.post1 torchsde==0.2.6 trampoline==0.1.2
ls -l "$dir"
