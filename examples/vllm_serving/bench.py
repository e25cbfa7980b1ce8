"""vLLM serving speed, unpatched vs patched with tome_plus, in one run (offline, vLLM's `LLM`).

Run in the vLLM environment (examples/vllm_serving/install.sh makes it):

    OMP_NUM_THREADS=1 .venv-vllm/bin/python examples/vllm_serving/bench.py --shape tiny-llava --requests 16 --max-tokens 8
    python examples/vllm_serving/bench.py --shape llava-1.5-7b --requests 64 --batch 32 --json llava15.json
    python examples/vllm_serving/bench.py --shape llava-next-7b --settings '{"method": "pitome", "keep": 0.5}'
    python examples/vllm_serving/bench.py --model /path/or/hf-id --prompt 'USER: <image>\\nDescribe. ASSISTANT:'
    python examples/vllm_serving/bench.py --shape llava-1.5-7b --tensor-parallel-size 2

Shapes: `tiny-llava` (and `tiny-llava-next`, `tiny-onevision`, `tiny-qwen2.5-vl`) are random-weight checkpoints
written to a temporary folder by tests/vllm_plugin/tiny.py, CPU-sized (fp32, eager, 256-token context,
a 128 MiB KV cache). `llava-1.5-7b` (llava-hf/llava-1.5-7b-hf, 336 px: 576 image tokens),
`llava-next-7b` (llava-hf/llava-v1.6-mistral-7b-hf, 672 x 672 images: anyres tiles) and
`qwen2.5-vl-7b` (Qwen/Qwen2.5-VL-7B-Instruct, 448 x 448: 256 image tokens) pass the HF id to
vLLM (downloading is vLLM's and the user's business), bf16. `--model` takes any folder or id;
then `--prompt` (with one `<image>` where the model's image placeholder goes, in the model's
own prompt format) and `--image-size` are yours to give. tome_plus reduces only the families
its plugin registers (`tome_plus.integrations.vllm.FAMILIES`); for any other model vLLM ignores
the `tome_plus` key, and the script says so when the prompt lengths come out equal.

Configurations: `unpatched` (no `tome_plus` key: vLLM's own model) and one per `--settings`
(JSON, repeatable; default `{"method": "tome", "keep": 0.25}`), passed as
`hf_overrides={"tome_plus": settings}`. Each runs in its own subprocess, one after the other, so
engines never share memory, and vLLM's own engine process stays as vLLM sets it (on a machine
without CUDA the script sets `VLLM_ENABLE_V1_MULTIPROCESSING=0` unless it is set: the engine in
the subprocess, which starts in a quarter of the time). Every request is one image (seeded noise
of `--image-size`, a new one per request and phase, so neither the prefix cache nor the
multimodal caches ever hit) and the shape's prompt; greedy, `ignore_eos`, so every request makes
exactly `--max-tokens` tokens. Per configuration:

  0. load the engine (`load s` in the JSON); warm-up, not timed: `--warmup` requests at once
     (default `--batch`), then one alone;
  1. latency: `--latency-runs` requests one at a time;
     TTFT ms = median time to the first token, vLLM's `RequestOutput.metrics.first_token_latency`
     (arrival of the request in the engine front end to its first token; `LLM(...,
     disable_log_stats=False)` fills it), or, where vLLM gives no metrics, the wall time of a
     `max_tokens=1` request ("ttft_source" in the JSON);
  2. prefill: `--requests` requests at once with `max_tokens=1`;
     prefill s = the engine's time from the first request scheduled to the last first token
     (`metrics.scheduled_ts`, `first_token_ts`; the wall time without metrics): the vision tower,
     the reduction and the prompt's forward pass for all requests, batched by vLLM;
     prefill tok/s = prompt tokens of all requests (text and image placeholders, as vLLM
     counts them: the reduced count when patched) / prefill s. Fewer tokens in about the same
     fixed cost (the vision tower runs on every image either way) can lower this rate while the
     prefill gets faster: read it with `prefill s`;
  3. throughput: `--requests` requests at once, `--max-tokens` each, continuous batching at most
     `--batch` at a time (`max_num_seqs`); output tok/s = generated tokens / wall time;
     req/s = requests / wall time (wall time of `LLM.generate`, the front end's image
     processing included, as a user sees it).
  prompt tok/req = the mean prompt length vLLM scheduled (placeholders included).

The table ends with patched/unpatched ratios per column (for TTFT and prefill s lower is
better, for the rates higher). Timings depend on the machine, the other processes on it and the
vLLM version: compare ratios only within one run, never across runs or machines. `--rounds R`
runs the configurations R times, alternating (A B A B ...), and reports each number's median.
On a CPU that other processes share, vLLM's OpenMP threads wait on each other and one run can
come out ten times slower than the next: there, `OMP_NUM_THREADS=1` (measured: unpatched vs
keep=1.0, the same model, 1.00x) or a quiet machine. `--json FILE` writes every number, each
round's, the settings and the options.

Tensor parallel: `--tensor-parallel-size N` is passed to `LLM` (as are `--dtype`,
`--max-model-len`, `--gpu-memory-utilization`, `--kv-cache-memory-bytes`, `--enforce-eager`,
and `--llm-kwargs JSON` for anything else). vLLM calls its `vllm.general_plugins` entry points,
tome_plus's among them, in every process it starts (front end, engine core, each tensor-parallel
worker), so the patched model is the one every worker loads; nothing more to do than install
tome_plus in the environment that runs vLLM.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
TINY = os.path.join(ROOT, "tests", "vllm_plugin")
DEFAULT_SETTINGS = {"method": "tome", "keep": 0.25}
TINY_PROMPT = "<s> w{a} w{b} <image> w{c} w{d}"
TINY_ENGINE = {"dtype": "float32", "enforce_eager": True, "max_model_len": 256, "kv_cache_memory_bytes": 128 << 20}

# name -> model (an HF id) or tiny builder, prompt ({a}..{d}: words of the tiny tokenizer), image size, LLM kwargs
SHAPES = {
    "tiny-llava": {"tiny": "save_llava", "prompt": TINY_PROMPT, "image": (64, 64), "engine": TINY_ENGINE},
    "tiny-llava-next": {"tiny": "save_llava_next", "prompt": TINY_PROMPT, "image": (128, 64), "engine": TINY_ENGINE},
    "tiny-onevision": {"tiny": "save_onevision", "prompt": TINY_PROMPT, "image": (128, 64),
                       "engine": {**TINY_ENGINE, "limit_mm_per_prompt": {"image": 1, "video": 0}}},
    "tiny-qwen2.5-vl": {"tiny": "save_qwen2_5_vl", "image": (128, 128),  # 64 image tokens
                        "prompt": "<s> w{a} w{b} <|vision_start|> <|image_pad|> <|vision_end|> w{c} w{d}",
                        "engine": {**TINY_ENGINE, "limit_mm_per_prompt": {"image": 1, "video": 0}}},
    "llava-1.5-7b": {"model": "llava-hf/llava-1.5-7b-hf", "image": (336, 336),
                     "prompt": "USER: <image>\nWhat is shown in this image? ASSISTANT:",
                     "engine": {"dtype": "bfloat16", "max_model_len": 4096}},
    "llava-next-7b": {"model": "llava-hf/llava-v1.6-mistral-7b-hf", "image": (672, 672),
                      "prompt": "[INST] <image>\nWhat is shown in this image? [/INST]",
                      "engine": {"dtype": "bfloat16", "max_model_len": 8192}},
    "qwen2.5-vl-7b": {"model": "Qwen/Qwen2.5-VL-7B-Instruct", "image": (448, 448),
                      "prompt": ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
                                 "What is shown in this image?<|im_end|>\n<|im_start|>assistant\n"),
                      "engine": {"dtype": "bfloat16", "max_model_len": 8192,
                                 "limit_mm_per_prompt": {"image": 1, "video": 0}}},
}
COLUMNS = [("prompt tok/req", "prompt_tokens", "{:.1f}"), ("TTFT ms", "ttft_ms", "{:.1f}"),
           ("prefill s", "prefill_s", "{:.3f}"), ("prefill tok/s", "prefill_tok_s", "{:.0f}"),
           ("output tok/s", "output_tok_s", "{:.1f}"), ("req/s", "req_s", "{:.2f}")]


# ---------------------------------------------------------------- worker: one configuration, one process

def _image(width, height, seed):
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def worker(spec_file: str, out_file: str) -> None:
    with open(spec_file) as f:
        spec = json.load(f)
    import torch
    if not torch.cuda.is_available():
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    import vllm
    kwargs = {"model": spec["model"], "seed": 0, "max_num_seqs": spec["batch"], "disable_log_stats": False,
              "limit_mm_per_prompt": {"image": 1}, **spec["engine"]}
    if spec["settings"] is not None:
        kwargs["hf_overrides"] = {"tome_plus": spec["settings"]}
    t0 = time.perf_counter()
    llm = vllm.LLM(**kwargs)
    load_s = time.perf_counter() - t0
    width, height = spec["image"]
    words = 150

    def batch(n, phase):
        seeds = [phase * 1_000_003 + i for i in range(n)]
        return [{"prompt": (spec["prompt"].format(a=s % words, b=(7 * s + 1) % words, c=(13 * s + 2) % words,
                                                  d=(31 * s + 3) % words) if spec["tiny"] else spec["prompt"]),
                 "multi_modal_data": {"image": _image(width, height, s)}} for s in seeds]

    def params(max_tokens):
        return vllm.SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)

    def generate(requests, max_tokens):
        start = time.perf_counter()
        outs = llm.generate(requests, params(max_tokens), use_tqdm=False)
        return outs, time.perf_counter() - start

    generate(batch(spec["warmup"], 1), spec["max_tokens"])  # the batched shapes
    generate(batch(1, 4), spec["max_tokens"])  # and one request alone, as the latency phase runs them

    # 1. latency: one request at a time
    ttfts, source = [], "metrics.first_token_latency"
    for i in range(spec["latency_runs"]):
        (out,), _ = generate(batch(1, 100 + i), spec["max_tokens"])
        m = out.metrics
        ttfts.append(getattr(m, "first_token_latency", 0.0) or None)
    if any(t is None for t in ttfts):
        source, ttfts = "wall time of a max_tokens=1 request", []
        for i in range(spec["latency_runs"]):
            _, wall = generate(batch(1, 200 + i), 1)
            ttfts.append(wall)

    # 2. prefill: every request at once, one token each
    outs, wall = generate(batch(spec["requests"], 2), 1)
    prompt_tokens = [len(o.prompt_token_ids) for o in outs]
    metrics = [o.metrics for o in outs]
    if all(m is not None and m.scheduled_ts > 0 and m.first_token_ts > 0 for m in metrics):
        prefill_s = max(m.first_token_ts for m in metrics) - min(m.scheduled_ts for m in metrics)
        prefill_source = "engine: first scheduled to last first token"
    else:
        prefill_s, prefill_source = wall, "wall time of LLM.generate"

    # 3. throughput: every request at once, max_tokens each
    outs, wall = generate(batch(spec["requests"], 3), spec["max_tokens"])
    generated = sum(len(o.outputs[0].token_ids) for o in outs)
    loaded = [o.metrics.first_token_latency for o in outs if o.metrics is not None]

    result = {"load_s": load_s, "prompt_tokens": statistics.mean(prompt_tokens),
              "prompt_tokens_each": sorted(set(prompt_tokens)),
              "ttft_ms": 1000 * statistics.median(ttfts), "ttft_ms_each": [1000 * t for t in ttfts],
              "ttft_source": source,
              "ttft_loaded_ms": 1000 * statistics.mean(loaded) if loaded else None,
              "prefill_s": prefill_s, "prefill_source": prefill_source,
              "prefill_tok_s": sum(prompt_tokens) / prefill_s,
              "throughput_wall_s": wall, "generated_tokens": generated,
              "output_tok_s": generated / wall, "req_s": len(outs) / wall,
              "vllm": vllm.__version__}
    with open(out_file, "w") as f:
        json.dump(result, f)


# ---------------------------------------------------------------- driver

def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--shape", choices=sorted(SHAPES), help="a prepared model, prompt and image size")
    which.add_argument("--model", help="a model folder or HF id (with --prompt, --image-size)")
    p.add_argument("--prompt", help="the prompt, one <image> where the model's image placeholder goes "
                                    "(default: the shape's; with --model, LLaVA-1.5's format)")
    p.add_argument("--image-size", help="WxH of every image (default: the shape's; 336x336 with --model)")
    p.add_argument("--settings", action="append", type=json.loads,
                   help=f"tome_plus settings, JSON (repeatable; default {json.dumps(DEFAULT_SETTINGS)})")
    p.add_argument("--requests", type=int, default=16, help="requests in the prefill and throughput phases")
    p.add_argument("--max-tokens", type=int, default=16, help="tokens each request generates")
    p.add_argument("--batch", type=int, default=16, help="max_num_seqs: requests in the running batch at most")
    p.add_argument("--warmup", type=int, help="warm-up requests (default --batch)")
    p.add_argument("--latency-runs", type=int, default=3, help="single requests for TTFT (the median)")
    p.add_argument("--rounds", type=int, default=1, help="run the configurations this many times, alternating, "
                                                         "and report the median of each number (noisy machines)")
    p.add_argument("--tensor-parallel-size", type=int, help="passed to LLM")
    p.add_argument("--dtype", help="passed to LLM (default: the shape's; auto with --model)")
    p.add_argument("--max-model-len", type=int, help="passed to LLM")
    p.add_argument("--gpu-memory-utilization", type=float, help="passed to LLM")
    p.add_argument("--kv-cache-memory-bytes", type=int, help="passed to LLM (tiny shapes: 128 MiB)")
    p.add_argument("--enforce-eager", action="store_true", default=None, help="passed to LLM")
    p.add_argument("--llm-kwargs", type=json.loads, default={}, help="more LLM keyword arguments, JSON")
    p.add_argument("--json", help="write the numbers here")
    p.add_argument("--log-dir", help="keep each configuration's vLLM log here (default: a temporary folder, "
                                     "printed on failure)")
    args = p.parse_args(argv)
    if args.shape is None and args.model is None:
        args.shape = "tiny-llava"
    return args


def _size(text):
    w, h = text.lower().split("x")
    return int(w), int(h)


def engine_kwargs(args, shape):
    engine = dict(shape.get("engine", {}))
    for name in ("tensor_parallel_size", "dtype", "max_model_len", "gpu_memory_utilization",
                 "kv_cache_memory_bytes", "enforce_eager"):
        if getattr(args, name) is not None:
            engine[name] = getattr(args, name)
    engine.update(args.llm_kwargs)
    return engine


def run_config(name, spec, log_dir):
    """One configuration in a subprocess; its numbers, or the exit status and its log's tail."""
    spec_file, out_file = os.path.join(log_dir, f"{name}.spec.json"), os.path.join(log_dir, f"{name}.out.json")
    log = os.path.join(log_dir, f"{name}.log")
    with open(spec_file, "w") as f:
        json.dump(spec, f)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    with open(log, "w") as out:
        code = subprocess.call([sys.executable, os.path.abspath(__file__), "--_worker", spec_file, out_file],
                               stdout=out, stderr=subprocess.STDOUT, env=env)
    if code != 0 or not os.path.exists(out_file):
        with open(log, errors="replace") as f:
            tail = "".join(f.readlines()[-40:])
        return {"error": f"exit status {code}", "log": log, "tail": tail}
    with open(out_file) as f:
        result = json.load(f)
    result["process_s"] = time.perf_counter() - start
    return result


def combine(rounds):
    """One configuration's rounds: the median of every number (the first failure, if any)."""
    for r in rounds:
        if "error" in r:
            return r
    if len(rounds) == 1:
        return rounds[0]
    out = dict(rounds[0])
    for key, value in rounds[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = statistics.median(r[key] for r in rounds)
    out["rounds"] = rounds
    return out


def table(results):
    rows = [["configuration"] + [c[0] for c in COLUMNS]]
    base = results.get("unpatched")
    for name, r in results.items():
        if "error" in r:
            rows.append([name, f"failed ({r['error']}): {r['log']}"])
            continue
        rows.append([name] + [fmt.format(r[key]) for _, key, fmt in COLUMNS])
    for name, r in results.items():
        if name == "unpatched" or "error" in r or base is None or "error" in base:
            continue
        rows.append([f"{name} / unpatched"] + [f"{r[key] / base[key]:.2f}x" if base[key] else "-"
                                               for _, key, _ in COLUMNS])
    widths = [max(len(row[i]) for row in rows if len(row) > 2 or i == 0) for i in range(len(rows[0]))]
    lines = []
    for k, row in enumerate(rows):
        if row[1].startswith("failed"):
            lines.append(f"{row[0]:<{widths[0]}}  {row[1]}")
        else:
            lines.append("  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(row)))
        if k == 0:
            lines.append("-" * len(lines[0]))
    return "\n".join(lines)


def main(argv=None):
    if argv is None and len(sys.argv) == 4 and sys.argv[1] == "--_worker":
        return worker(sys.argv[2], sys.argv[3])
    args = parse(argv)
    shape = SHAPES[args.shape] if args.shape else {"model": args.model, "prompt": "USER: <image>\nDescribe the "
                                                   "image. ASSISTANT:", "image": (336, 336), "engine": {}}
    prompt = args.prompt.replace("\\n", "\n") if args.prompt else shape["prompt"]
    image = _size(args.image_size) if args.image_size else tuple(shape["image"])
    settings = args.settings or [DEFAULT_SETTINGS]
    work = tempfile.mkdtemp(prefix="tome_plus_vllm_bench_")
    log_dir = args.log_dir or work
    os.makedirs(log_dir, exist_ok=True)
    if "tiny" in shape:
        sys.path.insert(0, TINY)
        import tiny
        if not hasattr(tiny, shape["tiny"]):
            sys.exit(f"{args.shape}: tests/vllm_plugin/tiny.py has no {shape['tiny']} in this checkout")
        model = getattr(tiny, shape["tiny"])(os.path.join(work, args.shape))
    else:
        model = shape["model"]
    if "<image>" not in prompt and "<|image_pad|>" not in prompt:
        print("warning: the prompt has no image placeholder; vLLM may add or refuse the image", file=sys.stderr)
    base = {"model": model, "prompt": prompt, "tiny": "tiny" in shape, "image": image,
            "engine": engine_kwargs(args, shape),
            "requests": args.requests, "max_tokens": args.max_tokens, "batch": args.batch,
            "warmup": args.warmup if args.warmup is not None else args.batch, "latency_runs": args.latency_runs}
    configs = {"unpatched": None}
    for s in settings:
        configs[",".join(f"{k}={v}" for k, v in s.items())] = s
    print(f"model {args.shape or args.model} ({model}); images {image[0]}x{image[1]}; {args.requests} requests x "
          f"{args.max_tokens} tokens, batch {args.batch}; engine {base['engine']}", flush=True)
    runs = {name: [] for name in configs}
    for round_ in range(args.rounds):
        for name, s in configs.items():
            if runs[name] and "error" in runs[name][-1]:
                continue
            tag = f" (round {round_ + 1}/{args.rounds})" if args.rounds > 1 else ""
            print(f"  {name}{tag} ...", end=" ", flush=True)
            r = run_config(f"{name}.{round_}".replace("/", "_"), {**base, "settings": s}, log_dir)
            runs[name].append(r)
            if "error" in r:
                print(f"failed, {r['error']}; last lines of {r['log']}:\n{r['tail']}", flush=True)
            else:
                print(f"{r['process_s']:.0f} s (engine load {r['load_s']:.0f} s)", flush=True)
    results = {name: combine(rs) for name, rs in runs.items()}
    print()
    print(table(results))
    ok = {n: r for n, r in results.items() if "error" not in r}
    if "unpatched" in ok:
        for name, r in ok.items():
            if name != "unpatched" and r["prompt_tokens"] == ok["unpatched"]["prompt_tokens"]:
                print(f"note: {name} scheduled as many prompt tokens as unpatched: the plugin did not reduce this "
                      f"model (is its architecture in tome_plus.integrations.vllm.FAMILIES?)")
    if ok:
        any_r = next(iter(ok.values()))
        print(f"TTFT: {any_r['ttft_source']}; prefill s: {any_r['prefill_source']}. Ratios compare configurations "
              f"of this run only.")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": model, "shape": args.shape, "image": image, "prompt": prompt,
                       "settings": {n: s for n, s in configs.items()}, "options": {k: v for k, v in vars(args).items()},
                       "engine": base["engine"], "machine": platform.platform(), "python": sys.version.split()[0],
                       "results": results}, f, indent=2, default=str)
        print(f"wrote {args.json}")
    if not any("error" in r for r in results.values()):  # else keep the logs that the failure message names
        shutil.rmtree(work, ignore_errors=True)
    return 0 if len(ok) == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
