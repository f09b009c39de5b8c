#!/bin/sh
# The install steps of docker/Dockerfile, which any clean virtual environment can run to check them:
#   python3.11 -m venv /tmp/clean && PATH=/tmp/clean/bin:$PATH sh docker/install.sh .
set -eu
python -m pip install --no-cache-dir --upgrade pip
python -m pip install --no-cache-dir "${1:-.}[export]"
# what a node needs, imported once: a broken wheel fails the build, not the first job
python -c "import dard, cluster, tuning, torch, torchvision, ray.train.torch, ray.tune, mlflow, pyarrow.fs, onnxruntime; \
print('dard', dard.__version__, 'torch', torch.__version__, 'ray', ray.__version__, 'mlflow', mlflow.__version__)"
dard --version
