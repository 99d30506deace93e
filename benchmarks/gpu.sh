#!/usr/bin/env bash
# The GPU subset of probe's benchmarks (< 5 minutes on one H100): ResNet-50 at 224x224 with random weights:
# images/s of a plain inference pass vs the statistics pass at the same batch size, saliency ratios, and a
# batched render of one layer (against Lucent when installed). Writes <out dir>/gpu.json and prints what it measured.
#   benchmarks/gpu.sh <out dir> [--quick]
# On the lent GPU machine (no network): first run benchmarks/gpu_wheels.sh here, then carry .wheels.
set -euo pipefail

if [[ $# -lt 1 ]]; then
  echo "usage: benchmarks/gpu.sh <out dir> [--quick]" >&2
  exit 2
fi
out_dir=$1
shift
cd "$(dirname "$0")/.."

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu.sh: no NVIDIA GPU here (nvidia-smi missing or failing); nothing measured" >&2
  exit 1
fi
python=${PYTHON:-.venv/bin/python}
[[ -x $python ]] || python=python3
if ! "$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu.sh: torch ($python) sees no CUDA device; nothing measured" >&2
  exit 1
fi

if [[ -d .wheels ]]; then  # carried from benchmarks/gpu_wheels.sh: what this machine lacks
  "$python" -m pip install -q --no-deps --no-index .wheels/*.whl
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # probe from this tree, not installed

mkdir -p "$out_dir"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out_dir/nvidia-smi.txt"
start=$(date +%s)
timeout 290 "$python" benchmarks/bench_gpu.py --out "$out_dir/gpu.json" "$@" > "$out_dir/gpu.stdout"
echo "gpu.sh: measured in $(( $(date +%s) - start )) s; figures in $out_dir/gpu.json:"
cat "$out_dir/gpu.json"
