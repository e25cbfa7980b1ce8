"""What the tools measure, shared by the commands that report it and by `tome-plus sweep`, which
measures every point of its grid with them (no command imports another):

- `run_bench`: a timm model's throughput, unpatched against patched in one interleaved run
  (`tome-plus bench`);
- `evaluate`: top-1/top-5 on an ImageFolder split or Fashion-MNIST, one process or torchrun
  (`tome-plus eval`);
- `embed`, `knn_top1`: pooled features and DINO's weighted k-NN on them (`tome-plus fidelity`).

The HF side's measurement is `bench_hf.run_hf_bench`.
"""
from __future__ import annotations

import copy
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

import tome_plus

from ..methods import get_method
from ..training import setup_distributed, teardown_distributed
from .data import FashionMnist, SafeImageFolder, ShardSampler, collate, to_model_input
from .flops import count_flops
from .models import check_patchable, input_size, load_finetuned, load_model, read_finetuned, unpatched_twin
from .report import device_name
from .timing import peak_memory_mib, resolve_graphs, resolve_precision, time_forwards


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
        "device_name": device_name(dev),
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


def evaluate(model_name: Optional[str], data: str, method: Optional[str] = None,
             options: Optional[Dict[str, Any]] = None, pretrained: bool = False, checkpoint: Optional[str] = None,
             batch_size: int = 64, workers: int = 4, amp: bool = False, device: str = "cpu", progress: bool = True,
             finetuned: Optional[str] = None, count: int = 10000,
             status: Optional[Dict[str, int]] = None) -> Dict[str, Any]:
    """Evaluate; in a torchrun job every rank returns the same all-reduced result.

    `finetuned`: a checkpoint of `tome-plus finetune` (its model, method and head) instead of
    `model_name`; `data="fashion-mnist"`: the first `count` Fashion-MNIST test images. `status`,
    when given, is kept up to date with this process's `images` (done) and `total` (its share)."""
    status = status if status is not None else {}
    from timm.data import create_transform, resolve_data_config

    options = dict(options or {})
    if method:
        get_method(method)  # unknown method: error before any work
    fashion = data == "fashion-mnist"
    dataset = None if fashion else SafeImageFolder(data, transform=None)  # a bad folder fails before the model loads
    if dataset is not None and len(dataset) == 0:
        raise FileNotFoundError(f"--data {data!r} holds no images")
    rank, world, dev = setup_distributed(device)
    if dataset is not None and dataset.repeats and rank == 0:
        print(f"tome-plus eval: note: --data: {len(dataset.repeats)} link(s) lead to images already counted "
              f"({', '.join(dataset.repeats[:3])}); each image counts once, under the class folder it lies in",
              file=sys.stderr)
    try:
        if finetuned:
            payload = read_finetuned(finetuned)
            model, base = load_finetuned(payload), unpatched_twin(payload)
            model_name = model_name or finetuned
            method, options = None, {}
            trained = (payload["method"], payload["options"], payload["head"])
        else:
            model = base = load_model(model_name, pretrained, checkpoint)
            trained = (None, {}, None)
            if method:
                check_patchable(model)
        config = resolve_data_config({}, model=model)
        if fashion:  # the size the model was built for (a pretrained config may name another)
            size = model.patch_embed.img_size[-1]
            config["input_size"] = (3, size, size)
            dataset = FashionMnist(count, size)
        else:
            dataset.transform = create_transform(**config, is_training=False)
        head = tome_plus.heads.name_of(model)
        classes = tome_plus.heads.module(model).num_classes if head else model.num_classes
        if len(dataset.classes) != classes:
            raise ValueError(f"--data has {len(dataset.classes)} classes but the model head has "
                             f"{classes}; use a matching checkpoint or data split")
        model = model.eval().to(dev)
        probe = torch.zeros(1, *config["input_size"], device=dev)
        base_flops = count_flops(base.eval().to(dev), probe)
        if method:
            tome_plus.patch(model, method, **options)
        flops = count_flops(model, probe)

        loader = DataLoader(dataset, batch_size=batch_size, sampler=ShardSampler(len(dataset), rank, world),
                            num_workers=workers, collate_fn=collate, pin_memory=dev.type == "cuda")
        counts = torch.zeros(4, dtype=torch.float64)  # top-1 hits, top-5 hits, images, skipped
        amp_ctx = torch.autocast(dev.type, dtype=torch.float16 if dev.type == "cuda" else torch.bfloat16,
                                 enabled=amp)
        start = time.perf_counter()
        status.update(images=0, total=len(loader.sampler))
        with torch.no_grad(), amp_ctx:
            for images, targets, skipped in tqdm(loader, desc=f"eval {model_name}", file=sys.stderr,
                                                 disable=not progress or rank != 0):
                counts[3] += skipped
                if images is None:
                    continue
                images, targets = images.to(dev, non_blocking=True), targets.to(dev)
                top = model(images).topk(min(5, classes), dim=-1).indices
                hits = top == targets[:, None]
                counts[0] += hits[:, 0].sum().item()
                counts[1] += hits.any(dim=-1).sum().item()
                counts[2] += len(targets)
                status["images"] = int(counts[2] + counts[3])
        elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
        if world > 1:
            reduce_dev = dev if dev.type == "cuda" else torch.device("cpu")
            counts, elapsed = counts.to(reduce_dev), elapsed.to(reduce_dev)
            dist.all_reduce(counts)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        hit1, hit5, n, skipped = (int(v) for v in counts.tolist())
        return {
            "model": model_name, "checkpoint": checkpoint, "pretrained": pretrained, "data": data,
            "finetuned": finetuned, "method": method or trained[0], "options": options or trained[1],
            "head": trained[2] or head, "top1": 100.0 * hit1 / max(n, 1),
            "top5": 100.0 * hit5 / max(n, 1), "images": n, "skipped": skipped,
            "repeated_links": len(dataset.repeats),
            "images_per_s": n / float(elapsed.item()), "gflops_per_image": flops / 1e9,
            "flops_ratio": flops / base_flops, "world_size": world, "device": str(dev), "amp": amp,
            "batch_size": batch_size, "data_config": {k: (list(v) if isinstance(v, tuple) else v)
                                                      for k, v in config.items()},
        }
    finally:
        teardown_distributed(world)


@torch.no_grad()
def embed(model, images: np.ndarray, size: int, batch_size: int, desc: str, progress: bool):
    """L2-normalised pooled features and the seconds spent in the model."""
    feats, seconds = [], 0.0
    for start in tqdm(range(0, len(images), batch_size), desc=desc, disable=not progress, file=sys.stderr,
                      leave=False):
        x = to_model_input(images[start:start + batch_size], size)
        t0 = time.perf_counter()
        feats.append(model(x))
        seconds += time.perf_counter() - t0
    return F.normalize(torch.cat(feats).float(), dim=-1), seconds


def knn_top1(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor,
             labels: torch.Tensor, k: int = 20, temperature: float = 0.07, n_classes: int = 10) -> float:
    """DINO's weighted k-NN: each of the k most similar bank entries votes exp(sim / T)."""
    sims = queries @ bank.T
    top, idx = sims.topk(min(k, bank.shape[0]), dim=-1)
    votes = torch.zeros(queries.shape[0], n_classes)
    votes.scatter_add_(1, bank_labels[idx], (top / temperature).exp())
    return float((votes.argmax(-1) == labels).float().mean() * 100)
