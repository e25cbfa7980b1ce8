# Sourced by the install scripts: one torch/torchvision pair, installed together. torchvision's
# compiled operators load only into the torch build they were made for; an unpinned install can
# pair a CPU torch with a CUDA torchvision and fail at import (`operator torchvision::nms does
# not exist`).
TORCH_VERSION=2.14.1
TORCHVISION_VERSION=0.29.1
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore

install_torch() {
  local index=()
  if [ -n "${TORCH_INDEX_URL:-}" ]; then
    index=(--index-url "$TORCH_INDEX_URL")
  fi
  python -m pip install --quiet ${index[@]+"${index[@]}"} "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"
}
