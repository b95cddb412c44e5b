#!/usr/bin/env bash
# The GPU train-step benchmark in one command, on a machine with one NVIDIA GPU:
# jlora LoRA against full fine-tuning on a ~1B-parameter Llama (random weights) at
# sequence 2048 in bf16, printing tokens/s, MFU and jlora / full (benchmarks/gpu_step.py).
#
#   bash benchmarks/gpu.sh                 # installs into .venv-gpu, then runs
#   bash benchmarks/gpu.sh --batch 8       # flags go to benchmarks/gpu_step.py
#
# Needs nothing beyond `pip install -e .[bench]` and `jax[cuda12]` (installed here).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${JLORA_GPU_VENV:-.venv-gpu}"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -e ".[bench]" "jax[cuda12]"
"$VENV/bin/python" -c "import jax; d = jax.devices()[0]; assert d.platform == 'gpu', d; print(d.device_kind)"
MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=4294967296 \
    "$VENV/bin/python" -m benchmarks.gpu_step "$@"
