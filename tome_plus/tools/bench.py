"""`tome-plus bench`: the unpatched and the patched model, measured in one run.

Reports images/s, ms per batch, FLOPs per image (`torch.utils.flop_counter`, attention counted
on every device), peak activation memory and the tokens left after each layer. On CUDA each model
is also captured whole in a CUDA graph and timed by replay (the patched forward never syncs with
the host, so capture works); the graphed output is checked against eager. All timings are
interleaved run by run, so drift of the machine hits every model alike.

Precision: `--dtype float32` runs in fp32. For float16/bfloat16, `--precision autocast` (the
default) keeps fp32 weights and inputs and runs the forward under `torch.autocast`;
`--precision half` casts weights and inputs to the dtype (the default with --hf).

`--hf SHAPE` benchmarks a random-weight HF LLaVA of a known shape instead (llava-1.5-7b-shape on
a GPU, llava-small-shape on a CPU): the vision side in images/s, the prefill forward of a prompt
with one image and the language model alone on the prompt it gets, all interleaved; FLOPs of the
tower, projector and LLM; the image tokens that reach the LLM. The patched model shares the
unpatched one's weights, so the GPU holds them once. transformers is imported only for --hf.
"""
from __future__ import annotations

import argparse
import copy
import csv
import statistics
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Callable, ContextManager, Dict, Hashable, List, Optional, Sequence, Tuple, TypeVar

import torch
from tqdm.auto import tqdm

import tome_plus

from .common import (DTYPES, Parser, PeakMemory, UsageError, add_method_args, check_device, check_method,
                     cli_errors, describe, int_at_least, method_options, prepare_output, save_json)
from .flops import count_flops, flop_counter
from .hf_shapes import check_shape, shapes_help

PROG = "tome-plus bench"
DEFAULT_MODEL = "vit_base_patch16_224"
PRECISIONS = ("autocast", "half")
SHORT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
Forward = Callable[[torch.Tensor], torch.Tensor]
K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True)
class Precision:
    """How a forward runs: `mode` None (fp32), "half" (weights and inputs in `dtype`) or "autocast"
    (fp32 weights and inputs, forward under `torch.autocast(device_type, dtype)`)."""

    dtype: torch.dtype
    mode: Optional[str]
    device_type: str

    @property
    def label(self) -> str:
        if self.mode == "half":
            return f"{SHORT[self.dtype]} weights"
        return f"autocast {SHORT[self.dtype]}" if self.mode == "autocast" else "fp32"

    @property
    def tensor_dtype(self) -> torch.dtype:
        """dtype of the weights and the input."""
        return self.dtype if self.mode == "half" else torch.float32

    def context(self) -> ContextManager:
        if self.mode != "autocast":
            return nullcontext()
        # No cache of cast weights (torch.cuda.make_graphed_callables requires the same): cached
        # casts made outside a capture, freed when the context exits, must not be read by the
        # graph. Each forward enters its own context, so eager loses nothing by it.
        return torch.autocast(self.device_type, dtype=self.dtype, cache_enabled=False)

    def forward(self, model: torch.nn.Module) -> Forward:
        """`model` as an inference call in this precision."""
        def run(x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad(), self.context():
                return model(x)
        return run


def autocast_supported(device_type: str, dtype: torch.dtype) -> bool:
    """Whether this torch runs autocast to `dtype` on `device_type` (it disables itself, with a
    warning, where it does not)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.autocast(device_type, dtype=dtype):
            return torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) == dtype


def resolve_precision(device: str, dtype: str, precision: Optional[str] = None) -> Precision:
    """Check `--dtype`/`--precision` for `device` (usage errors) and pick the default: autocast."""
    if dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    if precision is not None and precision not in PRECISIONS:
        raise UsageError(f"--precision {precision!r}; expected one of {list(PRECISIONS)}")
    torch_dtype, device_type = DTYPES[dtype], torch.device(device).type
    if torch_dtype == torch.float32:
        if precision is not None:
            raise UsageError(f"--precision {precision} needs --dtype float16 or bfloat16 (float32 runs in fp32)")
        return Precision(torch_dtype, None, device_type)
    mode = precision or "autocast"
    if mode == "autocast" and not autocast_supported(device_type, torch_dtype):
        raise UsageError(f"--precision autocast: this torch has no {device_type} autocast to {dtype}; "
                         f"use --precision half or another --dtype")
    return Precision(torch_dtype, mode, device_type)


def resolve_graphs(device: str, graphs: Optional[bool] = None) -> Optional[bool]:
    """CUDA graph timings: on by default on CUDA; None (not applicable) elsewhere."""
    if torch.device(device).type == "cuda":
        return True if graphs is None else graphs
    if graphs:
        raise UsageError(f"--graphs needs a CUDA device (CUDA graphs); this run is on {device}")
    return None


def interleave(fns: Dict[K, Callable[[], Any]], warmup: int, runs: int,
               sync: Callable[[], None] = lambda: None, step: Callable[[], None] = lambda: None
               ) -> Dict[K, List[float]]:
    """Seconds per call of every fn. Round i calls each fn once, in order, so drift of the machine
    (clocks, heat, other load) hits all alike; the first `warmup` rounds are not kept."""
    times: Dict[K, List[float]] = {name: [] for name in fns}
    for i in range(warmup + runs):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
            step()
    return times


def capture_graph(forward: Forward, x: torch.Tensor, warmup: int = 3) -> Callable[[], torch.Tensor]:
    """`forward(x)` captured in a CUDA graph; returns a replay call that gives the static output
    (overwritten by the next replay)."""
    static_x = x.clone()
    with torch.cuda.device(x.device):
        # Warm-up on a side stream, as capture wants: lazy inits (cuBLAS handles, Triton compiles)
        # must not happen inside the capture.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                forward(static_x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = forward(static_x)

    def replay() -> torch.Tensor:
        graph.replay()
        return static_out
    return replay


@dataclass
class Timing:
    """Seconds per call, eager and graphed (None: graphs off, or capture failed: see `graph_error`)."""

    eager: List[float]
    graph: Optional[List[float]] = None
    graph_max_abs_diff: Optional[float] = None  # graphed output vs. eager, same input
    graph_equal: Optional[bool] = None
    graph_error: Optional[str] = None


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    line = f"{type(error).__name__}: {text}" if text else type(error).__name__
    # an error inside the capture often surfaces as a second one when the capture ends: keep the first
    first = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
    return f"{line} (after {_one_line(first)})" if first is not None else line


def time_forwards(forwards: Dict[str, Forward], x: torch.Tensor, warmup: int, runs: int, graphs: bool,
                  progress: Optional[tqdm] = None) -> Dict[str, Timing]:
    """Eager timings of every forward on `x` and, with `graphs`, CUDA-graph replay timings, all
    interleaved. A capture that fails is reported in its `Timing`, and the run goes on."""
    timing = {name: Timing(eager=[]) for name in forwards}
    replays: Dict[str, Callable[[], torch.Tensor]] = {}
    if graphs:
        for name, forward in forwards.items():
            # Any error (capture refuses host syncs, CPU tensors, ...) is a finding to report.
            try:
                replay = capture_graph(forward, x)
                eager, graphed = forward(x).float(), replay().float()
                timing[name].graph_equal = torch.equal(eager, graphed)
                timing[name].graph_max_abs_diff = (eager - graphed).abs().max().item()
                replays[name] = replay
            except Exception as e:  # noqa: BLE001
                timing[name].graph_error = _one_line(e)
    fns: Dict[Tuple[str, str], Callable[[], Any]] = {(name, "eager"): (lambda f=f: f(x))
                                                     for name, f in forwards.items()}
    fns.update({(name, "graph"): replay for name, replay in replays.items()})
    if progress is not None:
        progress.total = (warmup + runs) * len(fns)
        progress.refresh()
    sync = (lambda: torch.cuda.synchronize(x.device)) if x.device.type == "cuda" else (lambda: None)
    times = interleave(fns, warmup, runs, sync=sync, step=(progress.update if progress is not None else lambda: None))
    for (name, kind), seconds in times.items():
        setattr(timing[name], kind, seconds)
    return timing


@dataclass
class Measurement:
    name: str
    images_per_s: float
    ms_per_batch: float
    ms_per_batch_min: float
    gflops_per_image: float
    peak_mem_mib: float
    tokens: List[int] = field(default_factory=list)
    graph_images_per_s: Optional[float] = None
    graph_ms_per_batch: Optional[float] = None
    graph_ms_per_batch_min: Optional[float] = None
    graph_max_abs_diff: Optional[float] = None
    graph_equal: Optional[bool] = None
    graph_error: Optional[str] = None


def peak_memory_mib(call: Callable[[], Any], device: torch.device) -> float:
    """Peak MiB that `call()` allocates on `device` above what was allocated before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        call()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    with PeakMemory() as mem:
        call()
    return mem.peak / 2**20


def input_size(model, img_size: Optional[int]) -> Sequence[int]:
    if img_size:
        return (3, img_size, img_size)
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", {}) or {}
    return tuple(cfg.get("input_size", (3, 224, 224)))


def run_bench(model_name: str, method: str, options: Dict[str, Any], device: str = "cpu",
              dtype: str = "float32", batch_size: int = 8, warmup: int = 2, runs: int = 10,
              img_size: Optional[int] = None, model_kwargs: Optional[Dict[str, Any]] = None,
              progress: bool = True, precision: Optional[str] = None,
              graphs: Optional[bool] = None) -> Dict[str, Any]:
    """Benchmark `model_name` unpatched vs. patched with `method` and `options`; returns a dict.

    `precision`: "autocast" (default for float16/bfloat16) or "half"; `graphs`: CUDA-graph timings
    too (default on CUDA; refused elsewhere).
    """
    import timm

    prec = resolve_precision(device, dtype, precision)
    use_graphs = resolve_graphs(device, graphs)
    dev = torch.device(device)
    kwargs = dict(model_kwargs or {})
    if img_size:
        kwargs["img_size"] = img_size
    baseline = timm.create_model(model_name, pretrained=False, **kwargs).eval()
    baseline = baseline.to(dev, prec.tensor_dtype)
    patched = tome_plus.patch(copy.deepcopy(baseline), method, **options)

    x = torch.randn(batch_size, *input_size(baseline, img_size), device=dev, dtype=prec.tensor_dtype)
    models = {"baseline": baseline, method: patched}
    forwards = {name: prec.forward(model) for name, model in models.items()}
    with tqdm(desc=f"bench {model_name}", disable=not progress, file=sys.stderr) as bar:
        timings = time_forwards(forwards, x, warmup, runs, bool(use_graphs), progress=bar)

    results = []
    for name, model in models.items():
        t = timings[name]
        med = statistics.median(t.eager)
        gmed = statistics.median(t.graph) if t.graph else None
        with prec.context():  # every forward in the chosen precision, the counted one too
            flops = count_flops(model, x[:1])
        results.append(Measurement(
            name=name, images_per_s=batch_size / med, ms_per_batch=med * 1e3,
            ms_per_batch_min=min(t.eager) * 1e3, gflops_per_image=flops / 1e9,
            peak_mem_mib=peak_memory_mib(lambda: forwards[name](x), x.device),
            tokens=list(tome_plus.inspect(model).tokens) if name != "baseline" else [],
            graph_images_per_s=batch_size / gmed if gmed is not None else None,
            graph_ms_per_batch=gmed * 1e3 if gmed is not None else None,
            graph_ms_per_batch_min=min(t.graph) * 1e3 if t.graph else None,
            graph_max_abs_diff=t.graph_max_abs_diff, graph_equal=t.graph_equal, graph_error=t.graph_error))
    base, red = results
    return {
        "model": model_name, "method": method, "options": options, "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else _cpu_name(),
        "dtype": dtype, "precision": prec.label, "graphs": use_graphs,
        "batch_size": batch_size, "warmup": warmup, "runs": runs,
        "input_size": list(x.shape[1:]), "torch": torch.__version__,
        "results": [asdict(r) for r in results],
        "speedup": red.images_per_s / base.images_per_s,
        "graph_speedup": (red.graph_images_per_s / base.graph_images_per_s
                          if red.graph_images_per_s and base.graph_images_per_s else None),
        "flops_ratio": red.gflops_per_image / base.gflops_per_image,
        "memory_ratio": red.peak_mem_mib / base.peak_mem_mib if base.peak_mem_mib else None,
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or "cpu"


def graph_summary(report: Dict[str, Any]) -> str:
    """One line on the CUDA graphs: not applicable, off, or per model equal / differs / failed."""
    if report["graphs"] is None:
        return f"graphs: n/a ({report['device'].split(':')[0].upper()})"
    if not report["graphs"]:
        return "graphs: off (--no-graphs)"
    parts = []
    for r in report["results"]:
        if r["graph_error"]:
            parts.append(f"{r['name']} capture failed: {r['graph_error']}")
        elif r["graph_equal"]:
            parts.append(f"{r['name']} equals eager")
        else:
            parts.append(f"{r['name']} differs from eager by up to {r['graph_max_abs_diff']:.3g}")
    return "graphs: " + "; ".join(parts)


def format_table(report: Dict[str, Any]) -> str:
    graphs = bool(report["graphs"])
    lines = [f"{report['model']} | {describe(report['method'], report['options'])} | "
             f"{report['device_name']} ({report['device']}) {report['precision']} | batch {report['batch_size']}, "
             f"{report['runs']} runs after {report['warmup']} warm-up",
             f"{'':<12}{'images/s':>12}{'ms/batch':>12}" + (f"{'graph img/s':>13}{'graph ms':>10}" if graphs else "")
             + f"{'GFLOPs/img':>12}{'peak MiB':>12}"]
    for r in report["results"]:
        graph = ""
        if graphs:
            graph = (f"{r['graph_images_per_s']:>13.1f}{r['graph_ms_per_batch']:>10.2f}"
                     if r["graph_ms_per_batch"] is not None else f"{'failed':>13}{'':>10}")
        lines.append(f"{r['name']:<12}{r['images_per_s']:>12.1f}{r['ms_per_batch']:>12.2f}{graph}"
                     f"{r['gflops_per_image']:>12.2f}{r['peak_mem_mib']:>12.1f}")
    mem, graphed = report["memory_ratio"], report["graph_speedup"]
    lines.append(f"speed-up {report['speedup']:.2f}x eager" + (f", {graphed:.2f}x graphed" if graphed else "")
                 + f" | FLOPs {report['flops_ratio']:.2f}x" + (f" | peak memory {mem:.2f}x" if mem else ""))
    lines.append(graph_summary(report))
    tokens = report["results"][1]["tokens"]
    lines.append("tokens after each layer: " + " ".join(str(t) for t in tokens))
    return "\n".join(lines)


def write_csv(report: Dict[str, Any], path: str) -> None:
    keys = ["model", "method", "device_name", "dtype", "precision", "batch_size"]
    columns = ["name", "images_per_s", "ms_per_batch", "graph_images_per_s", "graph_ms_per_batch",
               "gflops_per_image", "peak_mem_mib", "tokens", "graph_error"]
    fmt = {"images_per_s": ".3f", "ms_per_batch": ".3f", "graph_images_per_s": ".3f", "graph_ms_per_batch": ".3f",
           "gflops_per_image": ".4f", "peak_mem_mib": ".2f"}

    def cell(name: str, value: Any) -> str:
        if value is None:
            return ""  # graphs off, n/a or failed
        if name == "tokens":
            return " ".join(map(str, value))
        return format(value, fmt[name]) if name in fmt else str(value)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(keys + columns)
        for r in report["results"]:
            writer.writerow([report[k] for k in keys] + [cell(c, r[c]) for c in columns])


# --------------------------------------------------------------------- HF LLaVA shapes (--hf)

HF_PARTS = ("vision", "prefill", "llm")


def resolve_hf_precision(device: str, dtype: str, precision: Optional[str] = None) -> Precision:
    """As `resolve_precision`, but float16/bfloat16 default to "half": LLaVA runs with half weights,
    and a 7B model's fp32 weights would not fit where its fp16 ones do."""
    half = DTYPES.get(dtype) in (torch.float16, torch.bfloat16)
    return resolve_precision(device, dtype, precision or ("half" if half else None))


def shared_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model` with modules of its own but the same parameter and buffer tensors, so
    patching the copy leaves `model` unpatched while the weights are held once (a 7B model needs
    its 14 GB of fp16 weights once, not twice)."""
    tensors = list(model.parameters()) + list(model.buffers())
    return copy.deepcopy(model, {id(t): t for t in tensors})


def image_features(model: torch.nn.Module, pixel_values: torch.Tensor) -> Any:
    """The vision side as LLaVA's forward runs it: the tower with the hidden states of the feature
    layer recorded, the selection, the projector."""
    config = model.config
    return model.get_image_features(pixel_values=pixel_values, vision_feature_layer=config.vision_feature_layer,
                                    vision_feature_select_strategy=config.vision_feature_select_strategy)


def llava_prefill(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  pixel_values: torch.Tensor) -> Any:
    """The whole prefill forward; logits of the last position only, as `generate` asks for them."""
    return model(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask, logits_to_keep=1)


def llm_inputs(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               pixel_values: torch.Tensor) -> Dict[str, Any]:
    """The keyword arguments the language model gets inside one `llava_prefill` (the embedded
    prompt, cut by a patched model to its image-token count, image features in place), recorded
    from the call itself so the LLM alone runs on exactly that, whatever the patch does to get it."""
    seen: Dict[str, Any] = {}

    def record(module: torch.nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> None:
        seen.update({k: kwargs.get(k) for k in ("inputs_embeds", "attention_mask", "position_ids")})
        if "tome_plus.backends.hf_llm" in sys.modules:  # ATP: which tokens are visual, for its modules
            seen["_atp_scope"] = sys.modules["tome_plus.backends.hf_llm"].SCOPE.get()
    handle = model.model.language_model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        llava_prefill(model, input_ids, attention_mask, pixel_values)
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
    from ..backends import hf_llm
    token = hf_llm.SCOPE.set(replace(scope, kept=[], positions=[]))
    try:
        return model.lm_head(model.model.language_model(**kwargs)[0][:, -1:])
    finally:
        hf_llm.SCOPE.reset(token)


def llava_flops(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                pixel_values: torch.Tensor) -> Dict[str, int]:
    """FLOPs of one `llava_prefill`, by part: tower, projector, llm (decoder and head), total."""
    with torch.no_grad(), flop_counter() as counter:
        llava_prefill(model, input_ids, attention_mask, pixel_values)
    # the counter names modules by path from the root, whose name is its class's (patched or not)
    root = type(model).__name__
    per_module = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    part = lambda path: per_module.get(f"{root}.{path}", 0)  # noqa: E731
    return {"tower": part("model.vision_tower"), "projector": part("model.multi_modal_projector"),
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


def _hf_calls(models: Dict[str, torch.nn.Module], prec: Precision, ids: torch.Tensor, mask: torch.Tensor,
              pixels: torch.Tensor, llm_in: Dict[str, Dict[str, Any]]) -> Dict[Tuple[str, str], Callable[[], Any]]:
    """The timed calls, keyed (model, part), part by part so a round alternates the models."""
    def inference(fn: Callable[..., Any], *args: Any) -> Callable[[], Any]:
        def call() -> Any:
            with torch.no_grad(), prec.context():
                return fn(*args)
        return call
    calls: Dict[Tuple[str, str], Callable[[], Any]] = {}
    for part in HF_PARTS:
        for name, model in models.items():
            fn, args = {"vision": (image_features, (model, pixels)),
                        "prefill": (llava_prefill, (model, ids, mask, pixels)),
                        "llm": (llm_prefill, (model, llm_in[name]))}[part]
            calls[(name, part)] = inference(fn, *args)
    return calls


def run_hf_bench(shape: str, method: str, options: Dict[str, Any], device: str = "cpu", dtype: str = "float32",
                 batch_size: int = 1, text_tokens: int = 32, warmup: int = 1, runs: int = 3, progress: bool = True,
                 precision: Optional[str] = None) -> Dict[str, Any]:
    """Benchmark a random-weight LLaVA of `shape` (see `hf_shapes.SHAPES`) unpatched vs. patched.

    Times, interleaved in one loop: the vision side (`get_image_features`: tower and projector),
    the whole prefill forward on a prompt of `text_tokens` text tokens around one image's
    placeholders, and the language model alone on the prompt it actually gets. FLOPs of the tower,
    projector and LLM come from one counted prefill of one prompt.
    """
    from . import hf_shapes

    hf_shapes.require_transformers()
    import transformers

    prec = resolve_hf_precision(device, dtype, precision)
    dev = torch.device(device)
    baseline = hf_shapes.build_llava(shape, device, prec.tensor_dtype)
    patched = tome_plus.patch(shared_copy(baseline), method, **options)
    models = {"baseline": baseline, method: patched}
    ids, mask, pixels = hf_shapes.make_inputs(baseline.config, batch_size, text_tokens, device, prec.tensor_dtype)
    with torch.no_grad(), prec.context():
        llm_in = {name: llm_inputs(model, ids, mask, pixels) for name, model in models.items()}
    calls = _hf_calls(models, prec, ids, mask, pixels, llm_in)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    with tqdm(desc=f"bench {shape}", total=(warmup + runs) * len(calls), disable=not progress, file=sys.stderr) as bar:
        times = interleave(calls, warmup, runs, sync=sync, step=bar.update)

    results = []
    for name, model in models.items():
        with prec.context():
            flops = llava_flops(model, ids[:1], mask[:1], pixels[:1])
        # last, so `inspect` below describes this full-batch prefill
        peak = peak_memory_mib(calls[(name, "prefill")], dev)
        if name == "baseline":
            image_tokens, tokens = (ids == baseline.config.image_token_id).sum(dim=1), []
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
            peak_mem_mib=peak, tokens=tokens, llm_kept=llm_kept if name != "baseline" else []))
    base, red = results
    ratio = lambda key: getattr(red, key) / getattr(base, key) if getattr(base, key) else None  # noqa: E731
    return {
        "hf": shape, "model": shape, "description": hf_shapes.SHAPES[shape].description,
        "method": method, "options": options, "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else _cpu_name(),
        "dtype": dtype, "precision": prec.label, "graphs": None, "batch_size": batch_size,
        "text_tokens": text_tokens, "image_placeholders": hf_shapes.image_placeholders(baseline.config),
        "image_size": baseline.config.vision_config.image_size, "warmup": warmup, "runs": runs,
        "torch": torch.__version__, "transformers": transformers.__version__,
        "results": [asdict(r) for r in results],
        "vision_speedup": ratio("vision_images_per_s"),
        "prefill_speedup": base.prefill_ms_per_batch / red.prefill_ms_per_batch,
        "llm_speedup": base.llm_ms_per_batch / red.llm_ms_per_batch,
        "image_token_ratio": ratio("image_tokens"), "prompt_token_ratio": ratio("prompt_tokens"),
        "tower_flops_ratio": ratio("tower_gflops_per_image"), "llm_flops_ratio": ratio("llm_gflops_per_prompt"),
        "prefill_flops_ratio": ratio("prefill_gflops_per_prompt"), "memory_ratio": ratio("peak_mem_mib"),
    }


# (label, result key, format) of the --hf table's rows
HF_ROWS = [
    ("image tokens to the LLM / prompt", "image_tokens", "d"),
    ("prompt tokens", "prompt_tokens", "d"),
    ("vision images/s", "vision_images_per_s", ".1f"),
    ("vision ms/batch", "vision_ms_per_batch", ".2f"),
    ("prefill ms/batch (whole model)", "prefill_ms_per_batch", ".2f"),
    ("LLM alone ms/batch", "llm_ms_per_batch", ".2f"),
    ("tower GFLOPs/image", "tower_gflops_per_image", "gflops"),
    ("projector GFLOPs/image", "projector_gflops_per_image", "gflops"),
    ("LLM GFLOPs/prompt", "llm_gflops_per_prompt", "gflops"),
    ("prefill GFLOPs/prompt (all)", "prefill_gflops_per_prompt", "gflops"),
    ("prefill peak MiB", "peak_mem_mib", ".1f"),
]


def _cell(value: float, fmt: str) -> str:
    if fmt == "gflops":  # a 7B prefill is thousands, the test shape's tower hundredths
        fmt = ".2f" if abs(value) >= 1 else ".4f"
    return format(value, fmt)


def format_hf_table(report: Dict[str, Any]) -> str:
    """The --hf report: one row per quantity, the two models and their ratio as columns."""
    base, red = report["results"]
    lines = [f"{report['hf']}: {report['description']}",
             f"{describe(report['method'], report['options'])} | {report['device_name']} ({report['device']}) "
             f"{report['precision']} | batch {report['batch_size']}: {report['text_tokens']} text tokens + "
             f"{report['image_placeholders']} image placeholders per prompt | {report['runs']} runs after "
             f"{report['warmup']} warm-up",
             f"{'':<34}{'baseline':>12}{red['name']:>12}{'ratio':>9}"]
    for label, key, fmt in HF_ROWS:
        ratio = red[key] / base[key] if base[key] else float("nan")
        lines.append(f"{label:<34}{_cell(base[key], fmt):>12}{_cell(red[key], fmt):>12}{ratio:>8.2f}x")
    lines.append(f"speed-up: vision {report['vision_speedup']:.2f}x, prefill {report['prefill_speedup']:.2f}x, "
                 f"LLM alone {report['llm_speedup']:.2f}x | FLOPs: tower {report['tower_flops_ratio']:.2f}x, "
                 f"LLM {report['llm_flops_ratio']:.2f}x, prefill {report['prefill_flops_ratio']:.2f}x")
    lines.append("graphs: n/a (--hf times eager forwards)")
    if red["tokens"]:
        lines.append("tower tokens after each layer: " + " ".join(str(t) for t in red["tokens"]))
    if red.get("llm_kept"):
        lines.append("visual tokens after each ATP module: " + " ".join(f"{t:.1f}" for t in red["llm_kept"]))
    return "\n".join(lines)


def write_hf_csv(report: Dict[str, Any], path: str) -> None:
    keys = ["hf", "method", "device_name", "dtype", "precision", "batch_size", "text_tokens"]
    columns = [f.name for f in fields(HFMeasurement)]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(keys + columns)
        for r in report["results"]:
            writer.writerow([report[k] for k in keys]
                            + [" ".join(map(str, r[c])) if c == "tokens" else r[c] for c in columns])


def check_hf_args(args: argparse.Namespace) -> None:
    """Options of the timm bench that an --hf run cannot take (usage errors)."""
    if args.model is not None:
        raise UsageError("--hf builds its own model; give --hf or --model, not both")
    for given, option, why in ((args.img_size, "--img-size", "the shape fixes the image size"),
                               (args.graphs, "--graphs", "--hf times eager forwards"),
                               (args.kernels, "--kernels", "the kernel bench takes no model")):
        if given:
            raise UsageError(f"{option} does not go with --hf: {why}")


def main_hf(args: argparse.Namespace) -> Dict[str, Any]:
    """`tome-plus bench --hf SHAPE`: checks, run, table and outputs."""
    check_hf_args(args)
    check_method(args.method)
    options = method_options(args)
    resolve_hf_precision(args.device, args.dtype, args.precision)  # refused here, before any model is built
    cuda = args.device.startswith("cuda")
    report = run_hf_bench(
        args.hf, args.method, options, device=args.device, dtype=args.dtype,
        batch_size=args.batch_size if args.batch_size is not None else (8 if cuda else 1),
        text_tokens=args.text_tokens,
        warmup=args.warmup if args.warmup is not None else (5 if cuda else 1),
        runs=args.runs if args.runs is not None else (20 if cuda else 3),
        progress=not args.no_progress, precision=args.precision)
    print(format_hf_table(report))
    save_json(report, args.json)
    if args.csv:
        write_hf_csv(report, args.csv)
    return report


def build_parser(parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    parser = parser or Parser(prog=PROG, description=__doc__)
    parser.add_argument("--model", default=None, help=f"timm model name (default {DEFAULT_MODEL})")
    parser.add_argument("--hf", type=check_shape, default=None, metavar="SHAPE",
                        help="instead of --model: a random-weight HF LLaVA of a known shape, built here "
                             "(needs transformers); reports vision images/s, prefill and LLM latency, FLOPs "
                             "per part and image tokens. The 7B/13B shapes need a GPU with ~15/~28 GB in "
                             "fp16 at batch 1 (weights held once; more with larger batches). Shapes: "
                             + shapes_help().replace("%", "%%"))
    parser.add_argument("--text-tokens", type=int_at_least(1), default=32,
                        help="--hf: text tokens per prompt (BOS included) around the image placeholders "
                             "(default 32)")
    parser.add_argument("--device", type=check_device, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float16" if torch.cuda.is_available() else "float32",
                        choices=sorted(DTYPES))
    parser.add_argument("--precision", choices=PRECISIONS, default=None,
                        help="for float16/bfloat16: autocast (default; fp32 weights, forward under "
                             "torch.autocast) or half (weights and inputs cast to --dtype; default with --hf)")
    parser.add_argument("--graphs", action=argparse.BooleanOptionalAction, default=None,
                        help="also time each model captured in a CUDA graph (default on CUDA; CUDA only)")
    parser.add_argument("--batch-size", type=int_at_least(1), default=None,
                        help="images per batch (default 256 on CUDA, 8 on CPU; --hf: prompts of one "
                             "image each, 8 on CUDA, 1 on CPU)")
    parser.add_argument("--img-size", type=int_at_least(1), default=None,
                        help="input resolution (default: the model's)")
    parser.add_argument("--warmup", type=int_at_least(0), default=None,
                        help="untimed runs first (default 10 on CUDA, 2 on CPU; --hf: 5 and 1)")
    parser.add_argument("--runs", type=int_at_least(1), default=None,
                        help="timed runs (default 50 on CUDA, 10 on CPU; --hf: 20 and 3)")
    parser.add_argument("--json", default=None, metavar="PATH",
                        help="write the report as JSON (missing folders are created before the run)")
    parser.add_argument("--csv", default=None, metavar="PATH", help="write the results as CSV (same)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--kernels", action="store_true",
                        help="instead: Triton kernels vs. PyTorch twins per op and end to end (CUDA only)")
    add_method_args(parser)
    return parser


def main(argv: Optional[Sequence[str]] = None, args: Optional[argparse.Namespace] = None) -> Dict[str, Any]:
    args = args or build_parser().parse_args(argv)
    outputs = " or ".join(option for option, value in (("--json", args.json), ("--csv", args.csv)) if value)
    written = "nothing was written" + (f" ({outputs} at the end)" if outputs else "")
    with cli_errors(PROG, on_interrupt=lambda: f"stopped before the timings were complete; {written}"):
        prepare_output(args.json, "--json")
        prepare_output(args.csv, "--csv")
        if args.hf is not None:
            return main_hf(args)
        if args.kernels:
            from . import kernel_bench
            report = kernel_bench.run(dtype=args.dtype, runs=args.runs if args.runs is not None else 30,
                                      precision=args.precision, graphs=args.graphs)
            print(kernel_bench.format_report(report))
            save_json(report, args.json)
            return report
        check_method(args.method)
        options = method_options(args)
        # refused here, before any model is built
        resolve_precision(args.device, args.dtype, args.precision)
        resolve_graphs(args.device, args.graphs)
        cuda = args.device.startswith("cuda")
        report = run_bench(
            args.model or DEFAULT_MODEL, args.method, options, device=args.device, dtype=args.dtype,
            batch_size=args.batch_size if args.batch_size is not None else (256 if cuda else 8),
            warmup=args.warmup if args.warmup is not None else (10 if cuda else 2),
            runs=args.runs if args.runs is not None else (50 if cuda else 10),
            img_size=args.img_size, progress=not args.no_progress, precision=args.precision,
            graphs=args.graphs)
        print(format_table(report))
        save_json(report, args.json)
        if args.csv:
            write_csv(report, args.csv)
        return report


if __name__ == "__main__":
    main()
