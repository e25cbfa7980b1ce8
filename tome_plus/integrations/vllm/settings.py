"""The `tome_plus` key of a vLLM model's config (`hf_overrides={"tome_plus": {...}}`), read once
and checked at start-up: a bad method, option or budget stops the engine with one line that
names it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from ...llm.features import feature_count
from ...methods.base import REGISTRY, get_method, method_names

KEY = "tome_plus"
SERVED = ("tome", "pitome", "divprune", "visionzip", "zero_tprune")  # the features site's (the tower's: not divprune)
MROPE = ("qwen2_vl", "qwen2_5_vl")  # model types whose kept tokens keep their (t, h, w) positions


@dataclass(frozen=True)
class Settings:
    """A checked `tome_plus` entry: the method, its reducer and config."""

    method: str
    reducer: Any
    config: Any
    site: str = "features"  # or "tower" (LLaVA-1.5's CLIP tower)
    record: Any = None  # the tower's patch record (`tower.tower_record`) at site="tower"

    def count(self, n: int) -> int:
        """Tokens an image whose features are `n` tokens keeps (`llm.features.feature_count`)."""
        return feature_count(self.config, self.reducer, n)


def read(hf_config) -> Optional[Settings]:
    """The settings in `hf_config` (None: no `tome_plus` key, vLLM's own model), checked."""
    entry = getattr(hf_config, KEY, None)
    if entry is None:
        return None
    if not isinstance(entry, dict) or "method" not in entry:
        raise ValueError(f"tome_plus: hf_overrides['tome_plus'] must be a dict with a 'method', got {entry!r}")
    options = dict(entry)
    method = options.pop("method")
    if "kv" in options:
        raise ValueError("tome_plus: kv policies (a2sf) evict cache slots per head, which vLLM's paged KV cache "
                         "(one sequence length per request across layers) cannot hold; serve without 'kv'")
    if method in method_names() and get_method(method).target == "llm":
        raise ValueError(f"tome_plus: {method!r} prunes inside the language model, which needs attention probabilities and "
                         f"per-layer sequence lengths that vLLM's paged attention does not have; serve a vision "
                         f"method ({', '.join(SERVED)}) on the image features instead")
    if method not in SERVED:
        raise ValueError(f"tome_plus: method {method!r} is not served in vLLM; use one of {', '.join(SERVED)}")
    site = options.pop("site", "features")
    model_type = getattr(hf_config, "model_type", None)
    if site == "tower":
        if "tower" not in get_method(method).vlm_sites:
            raise ValueError(f"tome_plus: {method!r} reduces the image features (site='features'), not in the tower")
        vision = getattr(getattr(hf_config, "vision_config", None), "model_type", None)
        if model_type != "llava" or vision != "clip_vision_model":
            raise ValueError(f"tome_plus: site='tower' is served on LLaVA-1.5's CLIP tower, whose projector takes "
                             f"any count; this model ({model_type}, {vision} tower) takes site='features'")
        if "positions" in options:
            raise ValueError("tome_plus: positions= places the kept tokens of site='features'; the tower's "
                             "features reach the language model in consecutive placeholders")
    elif site != "features":
        raise ValueError(f"tome_plus: site={site!r}; in vLLM the methods reduce the image features "
                         f"(site='features') or, on LLaVA-1.5, inside its CLIP tower (site='tower')")
    served = "kept" if model_type in MROPE else "packed"
    positions = options.pop("positions", served) if site == "features" else served
    if positions != served:
        if served == "packed":
            raise ValueError(f"tome_plus: positions={positions!r}; vLLM numbers an image's placeholders "
                             f"consecutively (positions='packed')")
        raise ValueError(f"tome_plus: positions={positions!r}; {hf_config.model_type}'s M-RoPE places each kept "
                         f"token at its own (t, h, w) position, as vLLM's video pruning does (positions='kept')")
    try:
        config_cls = REGISTRY.check_options(method, options)
        config = config_cls(**options)
    except (TypeError, ValueError) as err:
        raise ValueError(f"tome_plus: {err}") from None
    kind, value = config.budget
    if site == "features" and (kind not in ("tokens", "keep", "r") or isinstance(value, (list, tuple))):
        raise ValueError(f"tome_plus: the image features are reduced once per image: give tokens= (kept per "
                         f"image), keep= (a fraction) or r= (removed per image) as one number, not {kind}={value!r}")
    if config.trace_source:
        raise ValueError("tome_plus: trace_source is not recorded in vLLM")
    reducer = get_method(method)(config)
    reducer.for_family("hf")  # the paper defaults the HF backend settles (as `tome_plus.patch` does)
    if site == "features":
        reducer.check(getattr(hf_config, "text_config", hf_config).num_hidden_layers)
        return Settings(method=method, reducer=reducer, config=config)
    from .tower import removed, tower_record
    reducer.check(hf_config.vision_config.num_hidden_layers)
    record = tower_record(method, reducer, config, hf_config)
    try:  # the schedule at the tower's one image size: an unreachable budget is refused now
        removed(record, hf_config)
    except ValueError as err:
        raise ValueError(f"tome_plus: {err}") from None
    return Settings(method=method, reducer=reducer, config=config, site="tower", record=record)


def reads_first_layer(settings: Settings) -> bool:
    """Whether the method ranks by the language model's first decoder layer's attention (Zero-TPrune)."""
    return settings.site == "features" and "attn" in settings.reducer.needs


def check_parallel(settings: Optional[Settings]) -> None:
    """Refused under tensor parallelism where the selection reads attention over all heads, which
    each rank holds only some of (ranks would choose differently): the tower site, Zero-TPrune."""
    if settings is None or not (settings.site == "tower" or reads_first_layer(settings)):
        return
    from vllm.distributed import get_tensor_model_parallel_world_size
    if get_tensor_model_parallel_world_size() == 1:
        return
    if settings.site == "tower":
        raise ValueError("tome_plus: site='tower' ranks and merges an image's tokens from the tower's attention "
                         "over all heads, which tensor parallelism splits across ranks; serve site='features', "
                         "or tensor_parallel_size=1")
    raise ValueError(f"tome_plus: {settings.method!r} ranks an image's tokens by the first decoder layer's "
                     f"attention over all heads, which tensor parallelism splits across ranks; serve tome or "
                     f"pitome, or tensor_parallel_size=1")


def first_layer(settings: Optional[Settings], language_model) -> Optional[Any]:
    """The language model's first decoder layer where the method reads attention there, else None."""
    return language_model.model.layers[0] if settings is not None and reads_first_layer(settings) else None


def check_count(settings: Settings, n: int) -> int:
    """The kept count for `n` features per image; a `tokens=` budget above `n` is refused."""
    if settings.config.tokens is not None and settings.config.tokens > n:
        raise ValueError(f"tome_plus: tokens={settings.config.tokens} is more than the {n} image tokens this "
                         f"model's images have")
    return settings.count(n)
