#!/usr/bin/env bash
# The vLLM plugin's tests (tests/vllm_plugin), in the vLLM environment that examples/vllm_serving/install.sh
# makes (VENV, default .venv-vllm); the HF reference runs in the python that calls this script.
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=${VENV:-.venv-vllm}
export TOME_PLUS_HF_PYTHON=${TOME_PLUS_HF_PYTHON:-$(command -v python)}
export VLLM_ENABLE_V1_MULTIPROCESSING=0 OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/vllm_plugin "$@"
