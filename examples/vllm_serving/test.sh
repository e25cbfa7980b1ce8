#!/usr/bin/env bash
# The vLLM plugin's tests (tests/vllm_plugin), in the vLLM environment that examples/vllm_serving/install.sh
# makes (VENV, default .venv-vllm); the HF reference runs in the python that calls this script.
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=${VENV:-.venv-vllm}
export TOME_PLUS_HF_PYTHON=${TOME_PLUS_HF_PYTHON:-$(command -v python)}
export VLLM_ENABLE_V1_MULTIPROCESSING=0 OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
# two processes: the offline engines' tests, then the server's (its servers are processes of
# their own); arguments go to both
run() { "$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@" || [ $? -eq 5 ]; }  # 5: -k selected none here
run tests/vllm_plugin/test_vllm.py "$@"
run tests/vllm_plugin/test_server.py "$@"
