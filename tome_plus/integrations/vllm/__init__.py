"""tome_plus inside vLLM: the image features a vision-language model hands its language model,
reduced per image by a vision method (ToMe, PiToMe), with one flag:

    LLM(model, hf_overrides={"tome_plus": {"method": "tome", "keep": 0.25}})
    vllm serve MODEL --hf-overrides '{"tome_plus": {"method": "tome", "keep": 0.25}}'

vLLM calls `register` in every process it starts (the `vllm.general_plugins` entry point of the
tome_plus package): it registers, under vLLM's own architecture names, subclasses of vLLM's
model classes (`FAMILIES`, one file each). Without the `tome_plus` key in the model's config a
subclass runs exactly as vLLM's class. With it, the count of placeholders per image is the
reduced one, decided from the image size before scheduling (vLLM's processing info), and the
model returns exactly that many embeddings per image: the kept (or merged) features in their
input order, numbered consecutively as vLLM numbers placeholders (tome_plus's HF features site
with `positions="packed"` gives the same tokens).

Methods that prune inside the language model (atp, fastv) and KV-cache policies (a2sf) need the
attention probabilities and per-layer sequence lengths, which vLLM's paged attention does not
have: they are refused at start-up (`settings.read`).
"""
from __future__ import annotations

import functools
from typing import Dict

# vLLM architecture name -> the subclass that replaces it ("module:Class" under this package)
FAMILIES: Dict[str, str] = {
    "LlavaForConditionalGeneration": "llava:TomePlusLlava",
    "LlavaNextForConditionalGeneration": "llava_next:TomePlusLlavaNext",
    "LlavaOnevisionForConditionalGeneration": "llava_onevision:TomePlusLlavaOnevision",
    "Qwen2VLForConditionalGeneration": "qwen2_vl:TomePlusQwen2VL",
    "Qwen2_5_VLForConditionalGeneration": "qwen2_5_vl:TomePlusQwen2_5_VL",
}


def register() -> None:
    """The `vllm.general_plugins` entry point: our subclasses under vLLM's architecture names."""
    from vllm import ModelRegistry
    for architecture, target in FAMILIES.items():
        ModelRegistry.register_model(architecture, f"{__name__}.{target}")
    _cpu_runner_reads_pruning_switch()


def _cpu_runner_reads_pruning_switch() -> None:
    """vLLM's GPU runner reads the multimodal pruning switch after loading a model (and then calls
    `recompute_mrope_positions`); vLLM 0.32's CPU runner loads the model without reading it. On a
    CPU, a served M-RoPE model (Qwen2-VL, Qwen2.5-VL) sets it there; any other model is untouched."""
    from vllm.platforms import current_platform
    if not current_platform.is_cpu():
        return
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    load = CPUModelRunner.load_model
    if getattr(load, "tome_plus", False):
        return

    @functools.wraps(load)
    def load_model(self, *args, **kwargs):
        load(self, *args, **kwargs)
        model = self.get_model()
        if getattr(model, "tome_plus", None) is not None and getattr(model, "supports_multimodal_pruning", False):
            self.is_multimodal_pruning_enabled = True

    load_model.tome_plus = True
    CPUModelRunner.load_model = load_model
