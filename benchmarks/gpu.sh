#!/usr/bin/env bash
# The prepared GPU check (see benchmarks/gpu.py): needs torch, pyarrow, pillow, pyyaml, tqdm and
# scikit-learn (no Ray, no MLflow). SAT and DARD student epochs from teacher shards on CIFAR-shaped
# synthetic images: FP32, bf16 + channels_last, + torch.compile; images/s, FLOPs, share of peak.
#   bash benchmarks/gpu.sh [--samples N ...]      # from anywhere; writes $OUT/gpu.json|md (or ./)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'"
python3 benchmarks/gpu.py --device cuda --compile --out "${OUT:-.}" "$@"
