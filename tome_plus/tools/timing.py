"""Timing for the tools: precision (fp32, autocast, half weights), interleaved timing of several
forwards, CUDA-graph capture and replay, peak memory on any device.

`tome-plus bench` (timm and --hf) and `tome-plus bench --kernels` time through here; timings are
interleaved run by run, so drift of the machine (clocks, heat, other load) hits every model alike.
"""
from __future__ import annotations

import statistics
import time
import warnings
import weakref
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Dict, Hashable, List, Optional, Tuple, TypeVar

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from tqdm.auto import tqdm

from .common import UsageError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
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


def error_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    line = f"{type(error).__name__}: {text}" if text else type(error).__name__
    # an error inside the capture often surfaces as a second one when the capture ends: keep the first
    first = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
    return f"{line} (after {error_line(first)})" if first is not None else line


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
                timing[name].graph_error = error_line(e)
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


def resolve_hf_precision(device: str, dtype: str, precision: Optional[str] = None) -> Precision:
    """As `resolve_precision`, but float16/bfloat16 default to "half": LLaVA runs with half weights,
    and a 7B model's fp32 weights would not fit where its fp16 ones do."""
    half = DTYPES.get(dtype) in (torch.float16, torch.bfloat16)
    return resolve_precision(device, dtype, precision or ("half" if half else None))


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


class PeakMemory(TorchDispatchMode):
    """Peak bytes of tensors allocated while active, on any device (weights and inputs excluded).

    Works on CPU, where torch keeps no allocator statistics: every op output whose storage is new
    is counted until Python frees that storage.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live: set = set()
        self.current = 0
        self.peak = 0

    def _free(self, key: int, nbytes: int) -> None:
        self.current -= nbytes
        self.live.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0 or key in self.live or key in inputs:  # views share their input's storage
                continue
            self.live.add(key)
            self.current += nbytes
            self.peak = max(self.peak, self.current)
            weakref.finalize(storage, self._free, key, nbytes)
        return out


def time_ms(fn: Callable[[], Any], warmup: int = 10, runs: int = 50) -> float:
    """Median milliseconds of `fn` (CUDA events on a GPU, wall clock otherwise)."""
    cuda = torch.cuda.is_available()
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        if cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)
