"""Reports of the tools: the terminal tables, JSON and CSV files, the machine's name.

One function per report: `bench_table` / `bench_csv` (timm bench), `hf_table` / `hf_csv`
(`bench --hf`), `kernels_table` (`bench --kernels`), `eval_line`, `fidelity_table` /
`fidelity_plot`; `save_json` writes any of them as JSON.
"""
from __future__ import annotations

import csv
import json
from typing import Any, Dict, Optional


def save_json(report: Dict[str, Any], path: Optional[str]) -> None:
    """Write a tool's report as indented JSON (nothing when no path was given)."""
    if path:
        with open(path, "w") as f:
            json.dump(report, f, indent=2)


def describe(method: str, options: Dict[str, Any]) -> str:
    return method + "".join(f" {k}={v}" for k, v in options.items())


def device_name(device) -> str:
    """The GPU's name for a CUDA device, the CPU's otherwise."""
    import torch
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or "cpu"


# --------------------------------------------------------------------- tome-plus bench

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


def bench_table(report: Dict[str, Any]) -> str:
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


def bench_csv(report: Dict[str, Any], path: str) -> None:
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


# --------------------------------------------------------------------- tome-plus bench --hf

# (label, result key, format) of the --hf table's rows (after the first, the visual tokens after each site)
HF_ROWS = [
    ("image tokens into the LLM / prompt", "image_tokens", "d"),
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


HF_LABEL = 40  # width of the --hf table's labels


def _cell(value: float, fmt: str) -> str:
    if fmt == "gflops":  # a 7B prefill is thousands, the test shape's tower hundredths
        fmt = ".2f" if abs(value) >= 1 else ".4f"
    return format(value, fmt)


def _hf_row(label: str, base: float, red: float, fmt: str) -> str:
    ratio = f"{red / base:>8.2f}x" if base else f"{'n/a':>9}"  # e.g. Qwen: no projector
    return f"{label:<{HF_LABEL}}{_cell(base, fmt):>12}{_cell(red, fmt):>12}{ratio}"


def hf_table(report: Dict[str, Any]) -> str:
    """The --hf report: one row per quantity, the two models and their ratio as columns."""
    base, red = report["results"]
    lines = [f"{report['hf']}: {report['description']}",
             f"{describe(report['method'], report['options'])} at site {report.get('site', 'tower')} | "
             f"{report['device_name']} ({report['device']}) "
             f"{report['precision']} | batch {report['batch_size']}: {report['text_tokens']} text tokens + "
             f"{report['image_placeholders']} image placeholders per prompt | {report['runs']} runs after "
             f"{report['warmup']} warm-up",
             f"{'':<{HF_LABEL}}{'baseline':>12}{red['name']:>12}{'ratio':>9}"]
    first, *rest = HF_ROWS
    lines.append(_hf_row(first[0], base["image_tokens"], red["image_tokens"], first[2]))
    # at the features and llm sites the image tokens all enter the LLM: the reduction is after each site
    # (a batch's mean; the unpatched model keeps every one)
    for where, kept in zip(report.get("pruned_after", []), red.get("llm_kept") or []):
        lines.append(_hf_row(f"visual tokens after {where}", base["image_tokens"], kept, "g"))
    for label, key, fmt in rest:
        lines.append(_hf_row(label, base[key], red[key], fmt))
    lines.append(f"speed-up: vision {report['vision_speedup']:.2f}x, prefill {report['prefill_speedup']:.2f}x, "
                 f"LLM alone {report['llm_speedup']:.2f}x | FLOPs: tower {report['tower_flops_ratio']:.2f}x, "
                 f"LLM {report['llm_flops_ratio']:.2f}x, prefill {report['prefill_flops_ratio']:.2f}x")
    lines.append("graphs: n/a (--hf times eager forwards)")
    if red["tokens"]:
        lines.append("tower tokens after each layer: " + " ".join(str(t) for t in red["tokens"]))
    return "\n".join(lines)


def hf_csv(report: Dict[str, Any], path: str) -> None:
    keys = ["hf", "method", "site", "device_name", "dtype", "precision", "batch_size", "text_tokens"]
    columns = list(report["results"][0])  # the fields of bench_hf.HFMeasurement, in order
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(keys + columns)
        for r in report["results"]:
            writer.writerow([report[k] for k in keys]
                            + [" ".join(map(str, r[c])) if c in ("tokens", "llm_kept") else r[c] for c in columns])


# --------------------------------------------------------------------- tome-plus bench --kernels

def _ms(value: Optional[float], width: int) -> str:
    return f"{value:>{width}.2f}" if value is not None else f"{'-':>{width}}"


def _ratio(value: Optional[float], width: int) -> str:
    return f"{value:>{width - 1}.2f}x" if value is not None else f"{'-':>{width}}"


def kernels_table(report: Dict[str, Any]) -> str:
    graphs = {None: "n/a (CPU)", False: "off"}.get(report["graphs"], "on")
    lines = [f"{report['device']} | torch {report['torch']} | kernels {report['dtype']} | "
             f"end to end {report['precision']}, graphs {graphs}", "",
             f"{'shape':<34}{'op':<22}{'torch ms':>10}{'triton ms':>11}{'speed-up':>10}"]
    for r in report["kernels"]:
        lines.append(f"{r['shape']:<34}{r['op']:<22}{r['torch_ms']:>10.3f}{r['triton_ms']:>11.3f}"
                     f"{r['speedup']:>9.1f}x")
    lines += ["", f"{'shape':<34}{'attention':<16}{'SDPA ms':>9}{'x no mask':>11}{'qkv+SDPA ms':>13}"
                  f"{'x no mask':>11}"]
    for r in report["attention"]:
        diff = r["max_abs_diff_vs_mask"]
        lines.append(f"{r['shape']:<34}{r['layout']:<16}{r['sdpa_ms']:>9.3f}{r['sdpa_vs_no_mask']:>10.2f}x"
                     f"{r['qkv_sdpa_ms']:>13.3f}{r['qkv_sdpa_vs_no_mask']:>10.2f}x"
                     + (f"  (max abs diff to the mask: {diff:.2g})" if diff is not None else ""))
    lines += ["", f"{'model':<30}{'budget':<10}{'batch':>6}  {'run':<6}{'base ms':>10}{'torch ms':>10}"
                  f"{'triton ms':>11}{'x torch':>9}{'x triton':>10}"]
    notes = []
    for r in report["end_to_end"]:
        budget = ",".join(f"{k}={v}" for k, v in r["budget"].items())
        for run_kind, key, speed in (("eager", "ms", "speedup"), ("graph", "graph_ms", "graph_speedup")):
            head = f"{r['model']:<30}{budget:<10}{r['batch']:>6}" if run_kind == "eager" else " " * 46
            lines.append(f"{head}  {run_kind:<6}{_ms(r['baseline_' + key], 10)}{_ms(r['torch_' + key], 10)}"
                         f"{_ms(r['triton_' + key], 11)}{_ratio(r[speed + '_torch'], 9)}"
                         f"{_ratio(r[speed + '_triton'], 10)}")
        notes += [f"{r['model']} batch {r['batch']} {v}: graph capture failed: {e}"
                  for v, e in r["graph_errors"].items()]
        notes += [f"{r['model']} batch {r['batch']} {v}: graphed output differs from eager by up to {d:.3g}"
                  for v, d in r["graph_max_abs_diff"].items() if d]
    return "\n".join(lines + notes)


# --------------------------------------------------------------------- tome-plus eval, fidelity

def eval_line(r: Dict[str, Any]) -> str:
    what = describe(r["method"], r["options"]) if r["method"] else "unpatched"
    what += f" + {r['head']} head" if r.get("head") else ""
    return (f"{r['model']} | {what} | top-1 {r['top1']:.2f} | top-5 {r['top5']:.2f} | "
            f"{r['images']} images ({r['skipped']} skipped) | {r['images_per_s']:.1f} images/s | "
            f"{r['gflops_per_image']:.2f} GFLOPs ({r['flops_ratio']:.2f}x) | {r['world_size']} process(es)")


def fidelity_table(report: Dict[str, Any]) -> str:
    width = max([14] + [len(r["budget"]) + 2 for r in report["rows"]])  # a schedule's file name can be long
    lines = [report["model"], report["data"], f"machine: {report['machine']} ({report['threads']} threads)",
             f"{'method':<14}{'budget':<{width}}{'kNN top-1':>10}{'cos':>8}{'FLOPs':>8}{'img/s':>8}{'tokens':>8}"]
    for r in report["rows"]:
        lines.append(f"{r['method']:<14}{r['budget']:<{width}}{r['knn_top1']:>10.1f}{r['cosine_to_unpatched']:>8.4f}"
                     f"{r['flops_ratio']:>8.3f}{r['images_per_s']:>8.1f}{r['tokens_out']:>8d}")
    return "\n".join(lines)


def fidelity_plot(report: Dict[str, Any], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    base = rows[0]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for method in dict.fromkeys(r["method"] for r in rows[1:]):
        pts = sorted((r["flops_ratio"], r["knn_top1"]) for r in rows if r["method"] == method)
        pts.append((base["flops_ratio"], base["knn_top1"]))
        ax.plot(*zip(*pts), marker="o", label=method)
    ax.scatter([base["flops_ratio"]], [base["knn_top1"]], color="black", zorder=5, label="unpatched")
    ax.set_xlabel("FLOPs relative to the unpatched model")
    ax.set_ylabel("k-NN top-1 (%)")
    ax.set_title("DINOv2 ViT-S/14 on Fashion-MNIST (k-NN, no training)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
