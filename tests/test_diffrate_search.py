"""DiffRate's search against hand-written references of the authors' search (OpenGVLab/DiffRate,
`DiffRate/ddp.py`, `DiffRate/patch/deit.py`, `main.py`), and its checkpoint / command-line rules."""
import json
import math
import os

import pytest
import timm
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

import tome_plus
from tome_plus.training import diffrate as ds  # the search (public: tome_plus.diffrate_search)
from tome_plus.training import diffrate_forward as dsf  # the forward it trains the rates on, and its helpers

from conftest import make


def toy(depth=4, pool="token", **kwargs):
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", depth=depth, img_size=64, num_classes=5, global_pool=pool,
                             **kwargs).eval()


def toy_batches(n=3, seed=0, batch=4):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, 64, 64, generator=g), torch.randint(0, 5, (batch,), generator=g))
            for _ in range(n)]


# ------------------------------------------------------------------ the authors' search, by hand

class SteMin(torch.autograd.Function):
    """Their straight-through minimum: min in the forward; the gradient to the block's two counts,
    none to the incoming count."""

    @staticmethod
    def forward(ctx, n, a, b):
        return torch.minimum(torch.minimum(n, a), b)

    @staticmethod
    def backward(ctx, g):
        return None, g, g


def kept_count(logits, patches, granularity):
    """ceil(E[kept patches]) + 1 (the class token), with the expectation's gradient."""
    cands = torch.arange(patches, 0, -granularity).float()
    e = (logits.softmax(-1) * cands).sum() + 1
    return e + (e.ceil() - e).detach()


def rank_mask(logits, patches, granularity, n, start, stop):
    """Their token mask: hard 0 on [start, stop), P_i = sum of the probabilities of the
    candidates keeping rank i in the backward."""
    cands = torch.arange(patches, 0, -granularity)
    pi = logits.softmax(-1)
    prob = torch.zeros(n)
    for c, p in zip(cands.tolist(), pi):
        prob = prob + torch.cat([p.expand(c + 1), torch.zeros(n - c - 1)])
    hard = torch.ones(n)
    hard[start:stop] = 0
    return hard - prob.detach() + prob


def authors_search_forward(model, images, prune, merge, granularity=4):
    """One search forward as the authors' code does it: the tokens themselves re-sorted in every
    block, masks over the sorted ranks, the merge done token by token. (logits, GMACs)."""
    x = model.norm_pre(model._pos_embed(model.patch_embed(images)))
    batch, n, dim = x.shape
    patches = n - 1
    avg = model.global_pool == "avg"
    depth = len(model.blocks)
    fixed = {0, depth - 1} if avg else {0}
    size = torch.ones(batch, n)
    mask = torch.ones(batch, n)
    count = torch.tensor(float(n))
    hidden = model.blocks[0].mlp.fc1.out_features
    macs = torch.tensor(float(patches * 3 * 16 * 16 * dim + dim * model.num_classes))
    for layer, blk in enumerate(model.blocks):
        a = blk.attn
        h = blk.norm1(x)
        q, k, v = a.qkv(h).reshape(batch, n, 3, a.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k = a.q_norm(q), a.k_norm(k)
        logits = q @ k.transpose(-2, -1) * a.scale + size.log()[:, None, None, :]
        policy = mask[:, None, None, :]
        policy = policy + (1 - policy) * torch.eye(n)
        w = (logits - logits.max(-1, keepdim=True)[0]).exp() * policy
        attn = (w + 1e-6 / n) / (w.sum(-1, keepdim=True) + 1e-6)
        x = x + blk.ls1(a.proj(a.norm((attn @ v).transpose(1, 2).reshape(batch, n, -1))))
        idx = torch.cat([torch.zeros(batch, 1, dtype=torch.long), attn[:, :, 0, 1:].mean(1).argsort(1, True) + 1], 1)
        x = x.gather(1, idx[..., None].expand_as(x))
        size, mask = size.gather(1, idx), mask.gather(1, idx)
        macs = macs + 4 * count * dim * dim + 2 * count * count * dim
        if layer in fixed:
            count = SteMin.apply(count, torch.tensor(float(n)), torch.tensor(float(n)))
        else:
            alive = int(round(mask[0].sum().item()))
            kp = kept_count(prune[layer], patches, granularity)
            if kp < alive:
                mask = mask * rank_mask(prune[layer], patches, granularity, n, int(kp), alive)
            mid = min(alive, int(kp))
            km = kept_count(merge[layer], patches, granularity)
            if km < mid:
                kmi = int(km)
                rows, sizes = [], []
                for b in range(batch):
                    tokens, s = list(x[b]), list(size[b])
                    members = {d: [d] for d in range(kmi)}
                    for src in range(kmi, mid):
                        sims = [F.cosine_similarity(x[b, src].detach(), x[b, d].detach(), dim=0) for d in range(1, kmi)]
                        best = max(range(len(sims)), key=lambda i: sims[i])
                        members[best + 1].append(src)
                        s[src] = torch.clamp(size[b, src] * sims[best], min=1)
                    for d, group in members.items():
                        tokens[d] = sum(x[b, m] for m in group) / len(group)
                        s[d] = size[b, d] + sum(s[m] for m in group[1:])
                    rows.append(torch.stack(tokens))
                    sizes.append(torch.stack([torch.as_tensor(v) for v in s]))
                x, size = torch.stack(rows), torch.stack(sizes)
                mask = mask * rank_mask(merge[layer], patches, granularity, n, kmi, mid)
            count = SteMin.apply(count, kp, km)
        macs = macs + 2 * count * dim * hidden
        x = x + blk.ls2(blk.mlp(blk.norm2(x)))
    x = model.norm(x)
    if avg:
        weights = (size * mask)[:, 1:, None]
        pooled = (x[:, 1:] * weights).sum(1) / weights.sum(1).detach()
    else:
        pooled = x[:, 0]
    return model.head(model.fc_norm(pooled)), macs / 1e9


def random_rates(model, seed=0):
    rates = dsf.DiffRateRates.for_model(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        rates.prune.copy_(torch.randn(rates.prune.shape, generator=g) * 2)
        rates.merge.copy_(torch.randn(rates.merge.shape, generator=g) * 2)
    return rates


def grads(value, params):
    return [g if g is not None else torch.zeros_like(p)
            for g, p in zip(torch.autograd.grad(value, params, retain_graph=True, allow_unused=True), params)]


@pytest.mark.parametrize("pool", ["token", "avg"])
def test_default_search_is_the_authors(pool):
    """The default (straight_through="authors", size_clamp="per_source") gives the authors' search:
    its logits, GMACs and the gradients of both the task loss and the GMACs on the rates."""
    model = toy(pool=pool).requires_grad_(False)
    images, labels = toy_batches(1)[0]
    checked = 0
    for seed in range(4):
        rates = random_rates(model, seed)
        logits, _, macs = dsf.search_forward(model, images, rates)
        prune, merge = rates.prune.detach().clone().requires_grad_(), rates.merge.detach().clone().requires_grad_()
        ref_logits, ref_macs = authors_search_forward(model, images, prune, merge)
        torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(macs, ref_macs)
        for value, ref in ((F.cross_entropy(logits, labels), F.cross_entropy(ref_logits, labels)), (macs, ref_macs)):
            ours, theirs = grads(value, [rates.prune, rates.merge]), grads(ref, [prune, merge])
            for a, b in zip(ours, theirs):
                torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-7)
                checked += int(b.abs().sum() > 0)
    assert checked >= 8  # real gradients were compared, not zeros


def test_the_all_ranks_option_has_other_gradients_but_the_same_forward():
    model = toy().requires_grad_(False)
    images, labels = toy_batches(1)[0]
    rates = random_rates(model, 1)
    out = {}
    for mode in dsf.STRAIGHT_THROUGH:
        logits, _, macs = dsf.search_forward(model, images, rates, straight_through=mode)
        out[mode] = logits, torch.cat([g.flatten() for g in grads(F.cross_entropy(logits, labels),
                                                                   [rates.prune, rates.merge])])
    torch.testing.assert_close(out["authors"][0], out["all_ranks"][0])
    assert F.cosine_similarity(out["authors"][1], out["all_ranks"][1], dim=0) < 0.99


def test_which_ranks_pass_gradient():
    """A block sees 6 sorted tokens, 4 alive (an earlier straight-through mask killed ranks 4, 5),
    and prunes to 3. The authors' mask is hard 0 on rank 3 only, so the earlier mask keeps its
    gradient at ranks 4, 5; the all-ranks mask is 0 there too and cuts it."""
    rates = dsf.DiffRateRates(depth=2, n_tokens=6, n_prefix=1, granularity=1)
    with torch.no_grad():
        rates.prune[0] = torch.tensor([0.0, 0.0, 0.0, 10.0, 0.0])  # 3 patches + the class token kept
        rates.prune[1] = torch.tensor([0.0, 0.0, 0.0, 0.0, 10.0])  # 2.0x -> 3 kept
    before = rates.window_mask(rates.prune[0], 6, 4, 6)
    assert before.tolist() == [1, 1, 1, 1, 0, 0]
    assert int(rates.expected(rates.prune[1])) == 3
    weights = torch.arange(1.0, 7.0)
    for mode, expected_hard, gets in (("authors", [1, 1, 1, 0, 1, 1], {0, 1, 2, 4, 5}),
                                      ("all_ranks", [1, 1, 1, 0, 0, 0], {0, 1, 2})):
        rates.zero_grad()
        now = (rates.window_mask(rates.prune[1], 6, 3, 4) if mode == "authors" else rates.mask(rates.prune[1], 6)[0])
        assert [round(v) for v in now.tolist()] == expected_hard
        # the gradient each rank of the earlier mask receives: d(sum w * before * now) / d(before_i) = w_i now_i
        before_i = before.detach().requires_grad_()
        (weights * before_i * now.detach()).sum().backward()
        assert {i for i, g in enumerate(before_i.grad.tolist()) if g != 0} == gets


def test_size_clamp_per_source_and_total():
    """Two sources go into one destination: shares max(size * sim, 1) each (per_source), or
    size * max(sim, 0) added and the total clamped (total)."""
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [-0.6, -0.8]]])  # token 0: prefix
    size = torch.tensor([[1.0, 1.0, 3.0, 2.0]])
    moving = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    dest = torch.tensor([[False, True, False, False]])
    _, per_source = dsf.merge_masked(x, size, moving, dest, "per_source")
    _, total = dsf.merge_masked(x, size, moving, dest, "total")
    # similarities to token 1: 0.8 and -0.8; shares max(3 * 0.8, 1) = 2.4 and max(2 * -0.8, 1) = 1
    torch.testing.assert_close(per_source, torch.tensor([[1.0, 1 + 2.4 + 1.0, 2.4, 1.0]]))
    torch.testing.assert_close(total, torch.tensor([[1.0, 1 + 2.4 + 0.0, 3.0, 2.0]]))
    merged, _ = dsf.merge_masked(x, size, moving, dest, "per_source")
    torch.testing.assert_close(merged[0, 1], (x[0, 1] + x[0, 2] + x[0, 3]) / 3)  # the plain mean
    torch.testing.assert_close(merged[0, 2:], x[0, 2:])  # sources stay (masked) in the tensor


def test_masks_are_hard_forward_and_soft_backward():
    rates = dsf.DiffRateRates(depth=1, n_tokens=17, n_prefix=1, granularity=4)
    with torch.no_grad():
        rates.prune[0] = torch.tensor([0.5, -0.2, 0.1, 0.3])
    mask, count = rates.mask(rates.prune[0], 17)
    pi = rates.prune[0].softmax(-1).detach()
    expected = (pi * rates.candidates).sum()
    assert count.item() == math.ceil(expected.item())
    assert set(mask.tolist()) <= {0.0, 1.0} and mask.sum().item() == math.ceil(expected.item())
    w = torch.randn(17)
    (mask * w).sum().backward()
    theta = rates.prune[0].detach().clone().requires_grad_(True)
    prob = torch.stack([(theta.softmax(-1) * (rates.candidates > i)).sum() for i in range(17)])
    (prob * w).sum().backward()
    torch.testing.assert_close(rates.prune.grad[0], theta.grad)


def test_task_gradients_reach_both_rate_logits():
    """With the all-ranks masks every searched block's prune and merge logits get the task's
    gradient (block 0 keeps every token; with class-token pooling nothing after the last block's
    attention reads the other tokens, so its counts are free: no gradient)."""
    model, rates = toy().requires_grad_(False), dsf.DiffRateRates(4, 17, 1)
    images, labels = toy_batches(1)[0]
    logits, _, _ = dsf.search_forward(model, images, rates, straight_through="all_ranks")
    F.cross_entropy(logits, labels).backward()
    for grad in (rates.prune.grad, rates.merge.grad):
        assert bool((grad[1:-1].abs().sum(-1) > 0).all()) and grad[0].abs().sum() == 0 and grad[-1].abs().sum() == 0
    assert all(p.grad is None for p in model.parameters())


def set_rates(rates, prune, merge):
    """Logits that put all probability on these kept counts per block."""
    with torch.no_grad():
        for logits, counts in ((rates.prune, prune), (rates.merge, merge)):
            logits.fill_(-100.0)
            for layer, c in enumerate(counts):
                logits[layer, rates.candidates.tolist().index(c)] = 100.0


@pytest.mark.parametrize("pool", ["token", "avg"])
def test_search_forward_is_the_patched_model(pool):
    """Rates on one schedule, size_clamp="total": the patched model's logits (mean merge,
    similarity sizes, proportional attention); with nothing removed, the unpatched model's
    logits and pre-logits (the distillation target)."""
    model = toy(pool=pool).requires_grad_(False)
    images = toy_batches(1)[0][0]
    rates = dsf.DiffRateRates.for_model(model)
    set_rates(rates, [17] * 4, [17] * 4)
    logits, pooled, _ = dsf.search_forward(model, images, rates)
    with torch.no_grad():
        torch.testing.assert_close(logits, model(images), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(pooled, model.forward_head(model.forward_features(images), pre_logits=True),
                                   rtol=1e-4, atol=1e-5)
    set_rates(rates, [17, 13, 13, 9], [17, 13, 9, 5])
    schedule = rates.schedule()
    assert schedule["merge_kept_num"] == ([17, 13, 9, 5] if pool == "token" else [17, 13, 9, 9])  # avg: last fixed
    for mode in dsf.STRAIGHT_THROUGH:
        logits, _, _ = dsf.search_forward(model, images, rates, straight_through=mode, size_clamp="total")
        tome_plus.patch(model, "diffrate", schedule=schedule)
        with torch.no_grad():
            torch.testing.assert_close(logits, model(images), rtol=1e-4, atol=1e-4)
        tome_plus.unpatch(model)


def test_search_forward_runs_the_models_own_block():
    """`scale_attn_norm` (the attention's output norm), qk-norm and LayerScale: with rates that
    keep every token the search's forward is the unpatched model's."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=3, img_size=64, num_classes=5,
                              scale_attn_norm=True, qk_norm=True, init_values=0.5).eval().requires_grad_(False)
    assert not isinstance(model.blocks[0].attn.norm, torch.nn.Identity)
    rates = dsf.DiffRateRates.for_model(model)
    set_rates(rates, [17] * 3, [17] * 3)
    images = toy_batches(1)[0][0]
    for mode in dsf.STRAIGHT_THROUGH:
        logits, _, _ = dsf.search_forward(model, images, rates, straight_through=mode)
        with torch.no_grad():
            torch.testing.assert_close(logits, model(images), rtol=1e-4, atol=1e-5)


def test_lr_per_epoch_is_timms_cosine_stepped_as_the_authors_do():
    from timm.scheduler import CosineLRScheduler
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    sched = CosineLRScheduler(opt, t_initial=3, lr_min=0.001)
    epoch_steps, lrs = 5, []
    for epoch in range(3):
        lrs += [opt.param_groups[0]["lr"]] * epoch_steps
        sched.step(epoch)  # main.py: lr_scheduler.step(epoch) after each epoch
    ours = [ds.learning_rate(s, 15, 0.01, 0.001, epoch_steps) for s in range(15)]
    assert ours == pytest.approx(lrs)
    assert lrs[0] == pytest.approx(0.01) and lrs[5] == pytest.approx(0.01) and lrs[10] < 0.009


def test_search_restores_mode_and_drop_path_and_trains_with_drop_path():
    model = toy()
    model.train()
    model.blocks[1].eval()
    original = [(b.drop_path1, b.drop_path2) for b in model.blocks]
    seen = []
    orig_forward = dsf.search_forward

    def spy(m, *args, **kwargs):
        seen.append((m.training, type(m.blocks[-1].drop_path1).__name__, m.blocks[-1].drop_path1.drop_prob))
        return orig_forward(m, *args, **kwargs)

    dsf.search_forward = spy
    try:
        ds.search(model, toy_batches(), 0.02, steps=2, progress=False)
    finally:
        dsf.search_forward = orig_forward
    assert seen[0] == (True, "DropPath", pytest.approx(0.1))
    assert model.training and not model.blocks[1].training and model.blocks[0].training
    assert [(b.drop_path1, b.drop_path2) for b in model.blocks] == original
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("distill", [False, True])
def test_short_search_moves_flops_toward_the_target(distill):
    model = toy()
    start = dsf.search_forward(model.requires_grad_(False), toy_batches(1)[0][0], dsf.DiffRateRates(4, 17, 1))[2].item()
    target = 0.6 * ds.full_gmacs(model)
    batches = [(x, None if distill else y) for x, y in toy_batches()]
    rates, history = ds.search(model, batches, target, steps=40, lr=0.2, flops_weight=1e5, distill=distill,
                               progress=False)
    assert abs(history[-1]["gmacs"] - target) < 0.5 * abs(start - target)
    assert all(p.requires_grad is False for p in model.parameters())  # as it was handed in


def test_search_with_timm_mixup():
    from timm.data import Mixup
    model = toy()
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=5)
    batches = toy_batches(2, batch=5)  # odd: the last image is left out
    rates, history = ds.search(model, batches, 0.02, steps=2, mixup=mixup, progress=False)
    assert len(history) == 2 and all(math.isfinite(h["loss"]) for h in history)


def test_searched_schedule_round_trips(tmp_path):
    model = toy()
    rates, _ = ds.search(model, toy_batches(), 0.6 * ds.full_gmacs(model), steps=10, lr=0.2, flops_weight=1e5,
                         progress=False)
    path = str(tmp_path / "s.json")
    written = ds.save_schedule(rates, path, gmacs=0.1)
    assert json.loads(open(path).read())["prune_kept_num"] == written["prune_kept_num"]
    tome_plus.patch(model, "diffrate", schedule=path)
    with torch.no_grad():
        model(toy_batches(1)[0][0])
    n, expected = 17, []
    for p, m in zip(written["prune_kept_num"], written["merge_kept_num"]):
        n = min(p, m, n)
        expected.append(n)
    assert list(tome_plus.inspect(model).tokens) == expected


def test_resume_checks_its_checkpoint(tmp_path):
    model, batches, ckpt = toy(), toy_batches(), str(tmp_path / "c.state")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        ds.search(model, batches, 0.02, steps=2, checkpoint=ckpt, resume=True, progress=False)
    ds.search(model, batches, 0.02, steps=2, checkpoint=ckpt, progress=False, about={"model": "a"})
    with pytest.raises(ValueError, match="other settings .*gflops"):
        ds.search(model, batches, 0.03, steps=3, checkpoint=ckpt, resume=True, progress=False, about={"model": "a"})
    with pytest.raises(ValueError, match="other settings .*model: 'a' there, 'b' here"):
        ds.search(model, batches, 0.02, steps=3, checkpoint=ckpt, resume=True, progress=False, about={"model": "b"})
    with pytest.raises(ValueError, match="holds step 2, more than steps=1"):
        ds.search(model, batches, 0.02, steps=1, checkpoint=ckpt, resume=True, progress=False, about={"model": "a"})
    _, history = ds.search(model, batches, 0.02, steps=2, checkpoint=ckpt, resume=True, progress=False,
                           about={"model": "a"})
    assert history == []
    _, history = ds.search(model, batches, 0.02, steps=3, checkpoint=ckpt, resume=True, progress=False,
                           about={"model": "a"})
    assert [h["step"] for h in history] == [3] and ds.read_checkpoint(ckpt)["step"] == 3


def test_ctrl_c_saves_and_says_where(tmp_path):
    model, ckpt = toy(), str(tmp_path / "c.state")

    def batches():
        for i, batch in enumerate(toy_batches(3)):
            if i == 2:
                raise KeyboardInterrupt
            yield batch

    with pytest.raises(ds.SearchInterrupted) as e:
        ds.search(model, batches(), 0.02, steps=10, checkpoint=ckpt, progress=False, lr_schedule="step")
    assert (e.value.done, e.value.saved) == (2, 2) and ds.read_checkpoint(ckpt)["step"] == 2


def _search_rank(rank, world, init, out):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model = toy()
        rates, _ = ds.search(model, toy_batches(2, seed=rank), 0.01, steps=3, lr=0.2, flops_weight=1e5,
                             progress=False)
        torch.save(rates.state_dict(), os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_search_keeps_ranks_equal(tmp_path):
    mp.start_processes(_search_rank, args=(2, f"file://{tmp_path / 'rdv'}", str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    a, b = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert all(torch.equal(a[k], b[k]) for k in a) and a["prune"].abs().sum() > 0


# ------------------------------------------------------------------------------- the command

def image_folder(root):
    from PIL import Image
    rng = torch.Generator().manual_seed(0)
    for c in range(2):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(4):
            pixels = (torch.rand(40, 40, 3, generator=rng) * 255).byte().numpy()
            Image.fromarray(pixels).save(root / f"c{c}" / f"{i}.png")
    return str(root)


def test_search_command_resume_overwrite_and_refusals(tmp_path, capsys):
    from tome_plus.tools import cli
    data = image_folder(tmp_path / "data")
    out = str(tmp_path / "out" / "s.json")

    def args(*extra, model="vit_tiny_patch16_224", target=("--flops", "0.6")):
        return ["diffrate-search", "--model", model, "--data", data, *target, "--batch-size", "4", "--workers", "0",
                "--no-progress", "--out", out, *extra]

    def refused(argv, match, code=2):
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        err = capsys.readouterr().err
        assert e.value.code == code and len(err.strip().splitlines()) == 1 and match in err, err

    refused(args("--steps", "2", "--resume"), "no checkpoint")  # nothing to resume
    assert cli.main(args("--steps", "2")) == 0
    assert ds.read_checkpoint(out + ".state")["step"] == 2
    printed = capsys.readouterr().out
    assert "GMACs" in printed and "kept after each block" in printed and "nan" not in printed
    refused(args("--steps", "3"), "--resume")  # an existing search is not silently replaced
    refused(args("--steps", "3", "--resume", target=("--flops", "0.5")), "flops: 0.6 there, 0.5 here")
    refused(args("--steps", "3", "--resume", target=("--gmacs", "0.5")), "other settings")
    refused(args("--steps", "3", "--resume", "--lr", "0.02"), "lr: 0.01 there, 0.02 here")
    refused(args("--steps", "3", "--resume", model="deit_tiny_patch16_224"), "model: 'vit_tiny_patch16_224' there")
    refused(args("--steps", "1", "--resume"), "holds step 2")
    assert cli.main(args("--steps", "3", "--resume")) == 0
    assert ds.read_checkpoint(out + ".state")["step"] == 3
    schedule = json.loads(open(out).read())
    assert len(schedule["prune_kept_num"]) == 12 and schedule["gmacs"] > 0
    capsys.readouterr()
    assert cli.main(args("--steps", "3", "--resume")) == 0  # done already: says so, no nan
    captured = capsys.readouterr()
    assert "nothing to search" in captured.err and "nan" not in captured.out
    assert cli.main(args("--steps", "2", "--overwrite", target=("--gflops", "0.5"))) == 0  # the old spelling
    assert ds.read_checkpoint(out + ".state")["step"] == 2
    assert json.loads(open(out).read())["gmacs"] == 0.5
    refused(["diffrate-search", "--dinov2", "--data", data, "--flops", "0.6", "--out", out], "fashion-mnist")


def test_search_command_ctrl_c_is_one_line(tmp_path, capsys, monkeypatch):
    from tome_plus.tools import cli
    data = image_folder(tmp_path / "data")
    out = str(tmp_path / "s.json")

    def interrupt(*args, **kwargs):
        raise ds.SearchInterrupted(3, 10, 3, out + ".state")

    monkeypatch.setattr(ds, "search", interrupt)
    with pytest.raises(SystemExit) as e:
        cli.main(["diffrate-search", "--model", "vit_tiny_patch16_224", "--data", data, "--flops", "0.6",
                  "--batch-size", "4", "--workers", "0", "--no-progress", "--out", out, "--steps", "10", "--distill"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 130 and len(err) == 1 and err[0].startswith("tome-plus diffrate-search: interrupted:")
    assert "step 3 of 10" in err[0] and "--resume" in err[0]


def test_training_transform_posterizes_to_zero_bits_as_old_pillow_did():
    """The authors' RandAugment (`inc1`) posterizes to 0 bits at magnitude 10, which its magnitude
    noise reaches now and then and which Pillow 10+ refuses: our transform gives the black image
    older Pillow gave, and keeps posterizing as before at other magnitudes."""
    from PIL import Image, ImageOps
    from tome_plus.tools.data import train_transform
    config = dict(input_size=(3, 32, 32), interpolation="bicubic", mean=(0.5,) * 3, std=(0.5,) * 3, crop_pct=1.0)
    transform = train_transform(config, {"auto_augment": "rand-m10-mstd0-inc1"})
    ops = [op for step in transform.transforms for op in getattr(step, "ops", []) if op.name.startswith("Posterize")]
    assert ops
    torch.manual_seed(0)
    image = Image.fromarray((torch.rand(32, 32, 3) * 255).to(torch.uint8).numpy())
    for op in ops:
        op.prob = 1.0
        assert op(image).getextrema() == ((0, 0),) * 3  # 0 bits: black
        op.magnitude = 5.0  # 2 bits kept
        assert list(op(image).getdata()) == list(ImageOps.posterize(image, 2).getdata())
