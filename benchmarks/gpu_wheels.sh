#!/usr/bin/env bash
# Wheels that the GPU machine lacks, for benchmarks/gpu.sh: that machine has Python 3.12 with torch,
# torchvision, numba, pandas, pyarrow, scikit-learn, matplotlib and safetensors, and no network.
# Run this here (PyPI reachable), then carry the folder: run(command="benchmarks/gpu.sh $OUT", carry=[".wheels"]).
#   benchmarks/gpu_wheels.sh [folder (default .wheels)]
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-.wheels}
pip=${PIP:-.venv/bin/pip}
mkdir -p "$dir"
# probe itself: hydra (and its antlr4 runtime, sdist only: built here), captum
"$pip" wheel -q --no-deps -w "$dir" "antlr4-python3-runtime==4.9.3" "kornia==0.4.1"
"$pip" download -q --no-deps -d "$dir" --python-version 3.12 --only-binary=:all: \
  "hydra-core==1.3.8" "omegaconf==2.3.1" "captum==0.9.0" \
  "torch-lucent==0.1.8" "ipython==9.18.1" ipython_pygments_lexers decorator jedi parso traitlets prompt_toolkit \
  pexpect ptyprocess matplotlib-inline stack_data executing asttokens pure_eval wcwidth
du -sh "$dir"
