#!/usr/bin/env bash
# A prepared GPU check: needs torch, pyarrow, pyyaml, tqdm, scikit-learn (no Ray, no MLflow).
# CIFAR-shaped synthetic data: WRN-34-10 teacher precompute images/s, ResNet-18 DARD student
# images/s from shards vs with the online teacher (bf16 AMP, channels_last), DPGD vs PGD step
# cost. About 8 minutes on one GPU. Prints tables; writes $OUT/gpu-*.json (or ./gpu-*.json).
#   bash benchmarks/gpu.sh [CIFAR_SAMPLES]      # from anywhere; default 1024 samples
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out="${OUT:-.}"
samples="${1:-1024}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'"
python3 benchmarks/speed.py --device cuda --amp --only shards --cifar-samples "$samples" --json "$out/gpu-shards.json"
python3 benchmarks/speed.py --device cuda --only attacks --json "$out/gpu-attacks.json"
