#!/usr/bin/env bash
# Install tome_plus with a matching torch/torchvision pair, then measure ToMe on ViT-B/16: the
# unpatched and the patched model in one run (`tome-plus bench`). Any arguments go to the bench,
# e.g. `bash examples/install_and_bench.sh --method pitome --keep 0.9`.
#
# TORCH_INDEX_URL picks where torch comes from, e.g. PyTorch's CPU wheels on a machine without a
# GPU (PyPI's Linux torch is the CUDA build, about 5.5 GB):
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu bash examples/install_and_bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source examples/torch_pins.sh
install_torch
python -m pip install --quiet -e .
tome-plus bench "$@"
