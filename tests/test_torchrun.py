"""The multi-process tools under one `torchrun` launch (two gloo processes on CPU): `tome-plus eval`,
`tome-plus finetune` and `tome-plus sweep --source eval` run one after another in one process group
(as a job script would), and each result is checked against one process or across the ranks.
Starting a torchrun job costs seconds of imports per process, so the suite starts one."""
import json
import subprocess
import sys

import pytest
import torch

import tome_plus
from tome_plus.tools.cli import main
from tome_plus.tools.finetune import read_checkpoint

from test_eval import CLASSES, ENV, checkpoint, direct_loop, folder  # noqa: F401  (fixtures)

JOBS = """
import json, os, sys
import torch
from tome_plus.tools import eval as evaluate, finetune, sweep
from tome_plus.training.distributed import held_process_group

jobs = json.loads(sys.argv[1])
built = []  # the fine-tuned model of this rank, to save the head it ended with
real = finetune.build_model
finetune.build_model = lambda *a, **k: built.append(real(*a, **k)) or built[-1]
with held_process_group("cpu"):  # one group for all three, as sweep holds one for its points
    evaluate.main(jobs["eval"])
    finetune.main(jobs["finetune"])
    torch.save(finetune.trainable_module(built[0], "clca").state_dict(), jobs["head"] + os.environ["RANK"])
    sweep.main(jobs["sweep"])
"""


@pytest.fixture(scope="module")
def jobs(folder, checkpoint, tmp_path_factory):  # noqa: F811
    """Command lines of the three tools, and the torchrun run of all of them: (args, outputs)."""
    tmp = tmp_path_factory.mktemp("torchrun")
    eval_args = ["--model", "vit_tiny_patch16_224", "--checkpoint", str(checkpoint), "--data", str(folder),
                 "--method", "tome", "--budget", "r=8", "--batch-size", "4", "--workers", "0", "--device", "cpu",
                 "--no-progress"]
    finetune_args = ["--model", "vit_tiny_patch16_224", "--data", str(folder), "--method", "tome", "--budget",
                     "r=8", "--head", "clca", "--freeze", "--steps", "2", "--batch-size", "2", "--workers", "0",
                     "--device", "cpu", "--no-progress"]
    # --keep: torchrun's argparse reads a bare --r as an abbreviation of its own options
    sweep_args = ["--source", "eval", "--model", "vit_tiny_patch16_224", "--checkpoint", str(checkpoint), "--data",
                  str(folder), "--methods", "tome", "--keep", "0.9", "--batch-size", "4", "--workers", "0",
                  "--device", "cpu", "--bench-batch", "2", "--warmup", "0", "--runs", "1", "--no-progress"]
    two = {"eval": tmp / "eval.json", "finetune": tmp / "ddp.pt", "head": tmp / "head.rank", "sweep": tmp / "sweep"}
    script = tmp / "jobs.py"
    script.write_text(JOBS)
    spec = {"eval": [*eval_args, "--json", str(two["eval"])], "finetune": [*finetune_args, "--out", str(two["finetune"])],
            "head": str(two["head"]), "sweep": [*sweep_args, "--out", str(two["sweep"])]}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), json.dumps(spec)], env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"eval": eval_args, "sweep": sweep_args}, two


def test_eval_in_two_processes_equals_one_and_a_direct_loop(jobs, checkpoint, folder, tmp_path):  # noqa: F811
    args, two = jobs
    one = tmp_path / "one.json"
    main(["eval", *args["eval"], "--json", str(one)])
    r1, r2 = json.loads(one.read_text()), json.loads(two["eval"].read_text())
    assert r2["world_size"] == 2 and r1["world_size"] == 1
    for key in ("top1", "top5", "images", "skipped", "gflops_per_image", "flops_ratio"):
        assert r1[key] == r2[key], key
    assert r1["images"] == 21 and r1["skipped"] == 2
    top1, top5, n, skipped = direct_loop(checkpoint, folder, r=8)
    assert (r1["top1"], r1["top5"], r1["images"], r1["skipped"]) == (pytest.approx(top1), pytest.approx(top5), n, skipped)
    assert r1["flops_ratio"] < 0.8 and r1["method"] == "tome" and r1["options"] == {"r": 8}


def test_finetune_ranks_take_the_same_steps(jobs):
    _, two = jobs
    payload = read_checkpoint(str(two["finetune"]))
    assert payload["step"] == 2
    ranks = [torch.load(f"{two['head']}{r}") for r in range(2)]
    # both ranks took the same steps (gradients averaged) and rank 0 wrote what both hold
    for key, value in payload["weights"].items():
        assert torch.equal(ranks[0][key], value) and torch.equal(ranks[1][key], value), key
    # ... and they trained: the head is not the one a fresh patch starts from
    torch.manual_seed(0)
    import timm
    fresh = timm.create_model("vit_tiny_patch16_224")
    tome_plus.patch(fresh, "tome", r=8, head="clca", head_options={"num_classes": len(CLASSES)})
    start = tome_plus.heads.module(fresh).state_dict()
    assert not torch.equal(start["carrier"], payload["weights"]["carrier"])


def test_sweep_over_eval_in_two_processes_equals_one(jobs, tmp_path):
    """Each point's top-1 is what one process gets (every process evaluates its share, rank 0 times
    and writes), and the points file holds each point once."""
    args, two = jobs
    main(["sweep", *args["sweep"], "--out", str(tmp_path / "one")])
    one, got = (json.loads((d / "sweep.json").read_text())["points"] for d in (tmp_path / "one", two["sweep"]))
    assert [(p["method"], p["accuracy"], p["flops_ratio"]) for p in one] == \
           [(p["method"], p["accuracy"], p["flops_ratio"]) for p in got]
    assert one[1]["flops_ratio"] < 1.0
    assert len((two["sweep"] / "points.jsonl").read_text().splitlines()) == 3  # settings + 2 points, once
