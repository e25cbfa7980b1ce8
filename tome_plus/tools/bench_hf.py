"""What `tome-plus bench --hf SHAPE` measures: a random-weight HF LLaVA of a known shape, unpatched
vs. patched. Shared: `bench` reports it, `sweep` measures each point's speed with it.

The vision side in images/s, the prefill forward of a prompt with one image and the language
model alone on the prompt it gets, all interleaved; FLOPs of the tower, projector and LLM; the
image tokens that reach the LLM. The patched model shares the unpatched one's weights, so the GPU
holds them once. transformers is imported only when the run starts.
"""
from __future__ import annotations

import inspect
import statistics
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from tqdm.auto import tqdm

import tome_plus

from . import hf_shapes
from .common import UsageError
from .flops import flop_counter
from .models import shared_copy
from .report import device_name
from .timing import Precision, interleave, peak_memory_mib, resolve_hf_precision
from ..backends.base import get_info
from ..methods import get_method


HF_PARTS = ("vision", "prefill", "llm")


def image_features(model: torch.nn.Module, inputs: Dict[str, Any]) -> Any:
    """The vision side as the model's forward runs it: the tower (LLaVA: with the hidden states of
    the feature layer recorded, the selection), the projector or merger; videos through
    `get_video_features`."""
    config = model.config
    video = "pixel_values_videos" in inputs
    fn = model.get_video_features if video else model.get_image_features
    names = inspect.signature(fn).parameters
    kwargs = {k: v for k, v in inputs.items() if k in names}
    for name in ("vision_feature_layer", "vision_feature_select_strategy"):
        if name in names and hasattr(config, name):
            kwargs[name] = getattr(config, name)
    return fn(**kwargs)


def llava_prefill(model: torch.nn.Module, inputs: Dict[str, Any]) -> Any:
    """The whole prefill forward; logits of the last position only, as `generate` asks for them."""
    return model(**inputs, logits_to_keep=1)


def llm_inputs(model: torch.nn.Module, inputs: Dict[str, Any]) -> Dict[str, Any]:
    """The keyword arguments the language model gets inside one `llava_prefill` (the embedded
    prompt, cut by a patched model to its image-token count, image features in place), recorded
    from the call itself so the LLM alone runs on exactly that, whatever the patch does to get it."""
    seen: Dict[str, Any] = {}

    def record(module: torch.nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> None:
        # Qwen3-VL's DeepStack features too: part of what its language model adds
        seen.update({k: kwargs.get(k) for k in ("inputs_embeds", "attention_mask", "position_ids", "visual_pos_masks",
                                                "deepstack_visual_embeds")})
        if "tome_plus.llm.context" in sys.modules:  # ATP: which tokens are visual, for its modules
            seen["_atp_scope"] = sys.modules["tome_plus.llm.context"].current_inputs()
    handle = model.model.language_model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        llava_prefill(model, inputs)
    finally:
        handle.remove()
    if seen.get("inputs_embeds") is None:
        raise RuntimeError(f"{type(model).__name__} did not pass inputs_embeds to its language model by keyword")
    return {k: v for k, v in seen.items() if v is not None}


def llm_prefill(model: torch.nn.Module, llm_kwargs: Dict[str, Any]) -> torch.Tensor:
    """The language model alone on a ready prompt, and the head on its last position (with ATP,
    under the scope the real call gave it, so its modules prune as there)."""
    kwargs = dict(llm_kwargs)
    scope = kwargs.pop("_atp_scope", None)
    if scope is None:
        return model.lm_head(model.model.language_model(**kwargs)[0][:, -1:])
    from ..llm.context import running_with
    with running_with(scope):
        return model.lm_head(model.model.language_model(**kwargs)[0][:, -1:])


def llava_flops(model: torch.nn.Module, inputs: Dict[str, Any]) -> Dict[str, int]:
    """FLOPs of one `llava_prefill`, by part: tower (Qwen: with its merger), projector, llm
    (decoder and head), total."""
    with torch.no_grad(), flop_counter() as counter:
        llava_prefill(model, inputs)
    # the counter names modules by path from the root, whose name is its class's (patched or not)
    root = type(model).__name__
    per_module = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    part = lambda path: per_module.get(f"{root}.{path}", 0)  # noqa: E731
    return {"tower": part("model.vision_tower") + part("model.visual"), "projector": part("model.multi_modal_projector"),
            "llm": part("model.language_model") + part("lm_head"), "total": counter.get_total_flops()}


@dataclass
class HFMeasurement:
    """One LLaVA model: times of the vision side, of the whole prefill and of the language model
    alone (per batch), FLOPs per image or prompt, and the image tokens that reached the LLM."""

    name: str
    image_tokens: int  # per prompt (one image each), as the language model received them
    prompt_tokens: int  # per prompt, after the cut
    vision_images_per_s: float
    vision_ms_per_batch: float
    vision_ms_per_batch_min: float
    prefill_prompts_per_s: float
    prefill_ms_per_batch: float
    prefill_ms_per_batch_min: float
    llm_ms_per_batch: float
    llm_ms_per_batch_min: float
    tower_gflops_per_image: float
    projector_gflops_per_image: float
    llm_gflops_per_prompt: float
    prefill_gflops_per_prompt: float  # all parts together
    peak_mem_mib: float  # of the prefill forward
    tokens: List[int] = field(default_factory=list)  # the tower's, after each layer
    llm_kept: List[float] = field(default_factory=list)  # ATP: visual tokens each module kept (batch mean)


def _hf_calls(models: Dict[str, torch.nn.Module], prec: Precision, inputs: Dict[str, Any],
              llm_in: Dict[str, Dict[str, Any]]) -> Dict[Tuple[str, str], Callable[[], Any]]:
    """The timed calls, keyed (model, part), part by part so a round alternates the models."""
    def inference(fn: Callable[..., Any], *args: Any) -> Callable[[], Any]:
        def call() -> Any:
            with torch.no_grad(), prec.context():
                return fn(*args)
        return call
    calls: Dict[Tuple[str, str], Callable[[], Any]] = {}
    for part in HF_PARTS:
        for name, model in models.items():
            fn, args = {"vision": (image_features, (model, inputs)),
                        "prefill": (llava_prefill, (model, inputs)),
                        "llm": (llm_prefill, (model, llm_in[name]))}[part]
            calls[(name, part)] = inference(fn, *args)
    return calls


def run_hf_bench(shape: str, method: str, options: Dict[str, Any], device: str = "cpu", dtype: str = "float32",
                 batch_size: int = 1, text_tokens: int = 32, warmup: int = 1, runs: int = 3, progress: bool = True,
                 precision: Optional[str] = None, site: Optional[str] = None) -> Dict[str, Any]:
    """Benchmark a random-weight VLM of `shape` (see `hf_shapes.SHAPES`) unpatched vs. patched (at
    `site`, None: the model's default for the method).

    Times, interleaved in one loop: the vision side (`get_image_features` / `get_video_features`:
    tower and projector), the whole prefill forward on a prompt of `text_tokens` text tokens around
    one image's (or video's) placeholders, and the language model alone on the prompt it actually
    gets (at the features and llm sites, the reduction runs inside it). FLOPs of the tower,
    projector and LLM come from one counted prefill of one prompt.
    """
    hf_shapes.require_transformers()
    import transformers

    prec = resolve_hf_precision(device, dtype, precision)
    dev = torch.device(device)
    # inference only: torch's FLOP counter refuses a module handed a parameter that wants a gradient
    # under no_grad (Qwen3.5's gated norm is), so no weight wants one
    baseline = hf_shapes.build_model(shape, device, prec.tensor_dtype).requires_grad_(False)
    patched = tome_plus.patch(shared_copy(baseline), method, site=site, **options)
    models = {"baseline": baseline, method: patched}
    inputs = hf_shapes.make_batch(baseline, shape, batch_size, text_tokens, device, prec.tensor_dtype)
    one = hf_shapes.make_batch(baseline, shape, 1, text_tokens, device, prec.tensor_dtype)  # FLOPs per prompt
    ids = inputs["input_ids"]
    visual_ids = [i for i in (baseline.config.image_token_id, getattr(baseline.config, "video_token_id", None))
                  if i is not None]
    placeholders = int(torch.isin(ids[0], torch.tensor(visual_ids, device=ids.device)).sum())
    with torch.no_grad(), prec.context():
        llm_in = {name: llm_inputs(model, inputs) for name, model in models.items()}
    calls = _hf_calls(models, prec, inputs, llm_in)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    with tqdm(desc=f"bench {shape}", total=(warmup + runs) * len(calls), disable=not progress, file=sys.stderr) as bar:
        times = interleave(calls, warmup, runs, sync=sync, step=bar.update)

    results = []
    for name, model in models.items():
        with prec.context():
            flops = llava_flops(model, one)
        # last, so `inspect` below describes this full-batch prefill
        peak = peak_memory_mib(calls[(name, "prefill")], dev)
        llm_kept: List[float] = []
        if name == "baseline":
            image_tokens, tokens = torch.tensor([placeholders]), []
        else:
            info = tome_plus.inspect(model)
            image_tokens, tokens = info.image_tokens, list(info.tokens or [])
            llm_kept = info.llm_kept.float().mean(dim=1).tolist() if info.llm_kept is not None else []
        med = {part: statistics.median(times[(name, part)]) for part in HF_PARTS}
        best = {part: min(times[(name, part)]) for part in HF_PARTS}
        results.append(HFMeasurement(
            name=name, image_tokens=int(image_tokens.max()), prompt_tokens=llm_in[name]["inputs_embeds"].shape[1],
            vision_images_per_s=batch_size / med["vision"], vision_ms_per_batch=med["vision"] * 1e3,
            vision_ms_per_batch_min=best["vision"] * 1e3,
            prefill_prompts_per_s=batch_size / med["prefill"], prefill_ms_per_batch=med["prefill"] * 1e3,
            prefill_ms_per_batch_min=best["prefill"] * 1e3,
            llm_ms_per_batch=med["llm"] * 1e3, llm_ms_per_batch_min=best["llm"] * 1e3,
            tower_gflops_per_image=flops["tower"] / 1e9, projector_gflops_per_image=flops["projector"] / 1e9,
            llm_gflops_per_prompt=flops["llm"] / 1e9, prefill_gflops_per_prompt=flops["total"] / 1e9,
            peak_mem_mib=peak, tokens=tokens, llm_kept=llm_kept))
    base, red = results
    ratio = lambda key: getattr(red, key) / getattr(base, key) if getattr(base, key) else None  # noqa: E731
    return {
        "hf": shape, "model": shape, "description": hf_shapes.SHAPES[shape].description,
        "method": method, "options": options, "site": get_info(patched).parts.site,
        "pruned_after": pruned_after(patched), "device": str(dev),
        "device_name": device_name(dev),
        "dtype": dtype, "precision": prec.label, "graphs": None, "batch_size": batch_size,
        "text_tokens": text_tokens, "image_placeholders": placeholders,
        "image_size": hf_shapes.media_size(shape, baseline.config), "warmup": warmup, "runs": runs,
        "torch": torch.__version__, "transformers": transformers.__version__,
        "results": [asdict(r) for r in results],
        "vision_speedup": ratio("vision_images_per_s"),
        "prefill_speedup": base.prefill_ms_per_batch / red.prefill_ms_per_batch,
        "llm_speedup": base.llm_ms_per_batch / red.llm_ms_per_batch,
        "image_token_ratio": ratio("image_tokens"), "prompt_token_ratio": ratio("prompt_tokens"),
        "tower_flops_ratio": ratio("tower_gflops_per_image"), "llm_flops_ratio": ratio("llm_gflops_per_prompt"),
        "prefill_flops_ratio": ratio("prefill_gflops_per_prompt"), "memory_ratio": ratio("peak_mem_mib"),
    }


def check_site(shape: str, method: str, site: Optional[str], option: str = "--site ") -> None:
    """Where `method` goes on `shape` (`site`, given as `option`; None: the model's default for the
    method), checked as `tome_plus.patch` will check it, but before the model is built: a site that
    the method or the model cannot take is a usage error."""
    hf_shapes.require_transformers()
    from ..backends import hf_llava  # imports transformers

    # what the check reads of a model, its class name and config, without building it
    stand_in = type(hf_shapes.model_class(shape).__name__, (), {"config": hf_shapes.llava_config(shape)})()
    reducer = get_method(method)  # the class: the check reads its name and target
    chosen = site or hf_llava.default_site(stand_in, reducer)
    try:
        hf_llava.check_site(stand_in, reducer, chosen)
    except ValueError as e:
        where = f"{option}{site}" if site else f"--method {method} at its default site, {chosen}"
        raise UsageError(f"{where}: {e}") from None


def pruned_after(patched: torch.nn.Module) -> List[str]:
    """Where the visual tokens of `inspect(patched).llm_kept` were counted: after the features site,
    or after each decoder layer that prunes (ATP's modules, FastV's layer K)."""
    info = get_info(patched)
    if info.parts.site == "features":
        return ["the features site"]
    if info.parts.site != "llm":
        return []
    layers = info.reducer.sites(info.depth)
    return [f"decoder layer {layer}" for layer in layers]
