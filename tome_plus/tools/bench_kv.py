"""`tome-plus bench --hf SHAPE --kv a2sf`: decoding with a pruned KV cache against the full one.

A random-weight model of `SHAPE` (the same as `bench --hf`) generates `--new-tokens` greedy tokens
(every one of them: no early stop) for a prompt with its image, with the full cache and with the KV
policy (the patched twin shares the weights), alternating the two `--runs` times. Reported per
model: prefill time, decode tokens/s (the new tokens after the first, over the time past the
prefill), the KV cache's size at the end of the generation (where it is largest), peak device
memory on CUDA; and how many of the policy's tokens equal the full cache's, with the first step
where they part. Part of `tome-plus bench` (its parser and `main` are in `bench`).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any, Dict, List, Optional

import torch
from tqdm.auto import tqdm

import tome_plus

from . import hf_shapes
from .common import UsageError, parse_options
from .models import shared_copy
from .report import device_name, save_json
from .timing import resolve_hf_precision


def cache_mib(cache) -> float:
    """Bytes of every key and value tensor the cache holds, in MiB."""
    total = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if t is not None:
                total += t.numel() * t.element_size()
    return total / 2 ** 20


def generate(model, inputs: Dict[str, Any], new_tokens: int, sync) -> Dict[str, Any]:
    """One greedy generation of exactly `new_tokens` with a fresh cache, timed: the prefill alone
    first (a one-token generation), then the whole."""
    from transformers import DynamicCache

    def run(n: int):
        cache = DynamicCache(config=model.config)
        sync()
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, cache=cache)
        sync()
        return out, cache, time.perf_counter() - start

    _, _, prefill = run(1)
    out, cache, total = run(new_tokens)
    return {"tokens": out[:, -new_tokens:], "prefill_s": prefill, "total_s": total, "cache_mib": cache_mib(cache),
            "cache_lengths": [layer.keys.shape[-2] for layer in cache.layers if getattr(layer, "keys", None) is not None]}


def run_kv_bench(shape: str, kv: str, kv_options: Dict[str, Any], device: str = "cpu", dtype: str = "float32",
                 batch_size: int = 1, text_tokens: int = 32, new_tokens: int = 1024, runs: int = 1,
                 progress: bool = True, precision: Optional[str] = None) -> Dict[str, Any]:
    hf_shapes.require_transformers()
    import transformers

    prec = resolve_hf_precision(device, dtype, precision)
    dev = torch.device(device)
    baseline = hf_shapes.build_model(shape, device, prec.tensor_dtype)
    baseline.generation_config.eos_token_id = None  # every new token is generated
    patched = tome_plus.patch(shared_copy(baseline), kv=kv, kv_options=kv_options)
    inputs = hf_shapes.make_batch(baseline, shape, batch_size, text_tokens, device, prec.tensor_dtype)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    models = {"full cache": baseline, kv: patched}
    measured: Dict[str, List[Dict[str, Any]]] = {name: [] for name in models}
    peaks: Dict[str, float] = {}
    with tqdm(desc=f"bench {shape} --kv {kv}", total=runs * len(models), disable=not progress,
              file=sys.stderr) as bar:
        for _ in range(runs):
            for name, model in models.items():
                if dev.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(dev)
                with prec.context():
                    measured[name].append(generate(model, inputs, new_tokens, sync))
                if dev.type == "cuda":
                    peaks[name] = torch.cuda.max_memory_allocated(dev) / 2 ** 20
                bar.update()
    rows = []
    for name in models:
        runs_of = measured[name]
        prefill = statistics.median(r["prefill_s"] for r in runs_of)
        total = statistics.median(r["total_s"] for r in runs_of)
        decode = max(total - prefill, 1e-9)
        rows.append({"name": name, "prefill_ms": prefill * 1e3, "total_s": total,
                     "decode_tokens_per_s": batch_size * (new_tokens - 1) / decode,
                     "kv_cache_mib": runs_of[-1]["cache_mib"], "cache_lengths": runs_of[-1]["cache_lengths"],
                     "peak_mem_mib": peaks.get(name)})
    full, pruned = (measured[name][-1]["tokens"] for name in models)
    same = (full == pruned)
    parted = (~same).any(dim=0).nonzero()
    base, red = rows
    return {
        "hf": shape, "kv": kv, "kv_options": kv_options, "device": str(dev), "device_name": device_name(dev),
        "dtype": dtype, "precision": prec.label, "batch_size": batch_size, "text_tokens": text_tokens,
        "prompt_tokens": int(inputs["input_ids"].shape[1]), "new_tokens": new_tokens, "runs": runs,
        "torch": torch.__version__, "transformers": transformers.__version__, "results": rows,
        "decode_speedup": red["decode_tokens_per_s"] / base["decode_tokens_per_s"],
        "kv_memory_ratio": red["kv_cache_mib"] / base["kv_cache_mib"],
        "token_agreement": float(same.float().mean()),
        "first_difference": int(parted[0]) if parted.numel() else None,
    }


def kv_table(report: Dict[str, Any]) -> str:
    base, red = report["results"]
    lines = [f"{report['hf']}: --kv {report['kv']} {report['kv_options']} | {report['device_name']} "
             f"({report['device']}) {report['precision']} | batch {report['batch_size']}: a {report['prompt_tokens']}-token "
             f"prompt, {report['new_tokens']} new tokens | {report['runs']} run(s), alternating",
             f"{'':<30}{base['name']:>14}{red['name']:>14}{'ratio':>9}"]
    for label, key, fmt in (("prefill ms", "prefill_ms", ".1f"), ("decode tokens/s", "decode_tokens_per_s", ".1f"),
                            ("KV cache MiB at the end", "kv_cache_mib", ".2f"), ("peak MiB (CUDA)", "peak_mem_mib", ".1f")):
        if base[key] is None:
            continue
        lines.append(f"{label:<30}{format(base[key], fmt):>14}{format(red[key], fmt):>14}"
                     f"{red[key] / base[key]:>8.2f}x")
    first = report["first_difference"]
    lines.append(f"greedy tokens equal to the full cache's: {100 * report['token_agreement']:.1f}% "
                 f"(first difference at new token {first if first is not None else '-'})")
    lines.append(f"cache per layer at the end: {red['cache_lengths'][:1]} tokens per head vs. "
                 f"{base['cache_lengths'][:1]}")
    return "\n".join(lines)


def kv_options(args: argparse.Namespace) -> Dict[str, Any]:
    """The policy's `--kv-option`s, checked as `tome_plus.patch` will check them, but before any model
    is built (usage errors). The method options are refused by `bench` itself: --kv compares the full
    cache with the policy alone."""
    from ..kv import make_config

    options = parse_options(args.kv_option, "--kv-option")
    try:
        make_config(args.kv, options)
    except (ValueError, TypeError) as e:
        raise UsageError(f"--kv-option: {e}") from None
    return options


def main_kv(args: argparse.Namespace) -> Dict[str, Any]:
    options = kv_options(args)
    resolve_hf_precision(args.device, args.dtype, args.precision)
    report = run_kv_bench(args.hf, args.kv, options, device=args.device, dtype=args.dtype,
                          batch_size=args.batch_size or 1, text_tokens=args.text_tokens, new_tokens=args.new_tokens,
                          runs=args.runs or 1, progress=not args.no_progress, precision=args.precision)
    print(kv_table(report))
    save_json(report, args.json)
    return report
