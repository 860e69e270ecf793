#!/usr/bin/env bash
# Prepares .gpu/ for benchmarks/gpu.sh on a GPU machine that cannot install packages: wheels of
# what such an image usually lacks (Python 3.12, x86-64; the versions the tests pass with) and a
# copy of the public-diffusers reference step (../shared/tools/anchor_bench.py, when present).
#   bash benchmarks/gpu_prepare.sh          # here, with pip and a package index
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
mkdir -p .gpu/wheels
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .gpu/wheels \
  diffusers==0.42.1 importlib_metadata==10.2.0 hydra-core==1.3.8 omegaconf==2.3.1 \
  datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 webdataset==0.2.111 braceexpand==0.1.7
# antlr4-python3-runtime 4.9.3 (hydra's parser) is published as a source archive only: build its pure-Python wheel.
"$PY" -m pip wheel --quiet --no-deps -w .gpu/wheels antlr4-python3-runtime==4.9.3
if [ -f ../shared/tools/anchor_bench.py ]; then cp ../shared/tools/anchor_bench.py .gpu/; fi
du -sh .gpu
