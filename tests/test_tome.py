"""ToMe against plain references: the matching step, and the whole model against the original
algorithm (explicit attention, proportional attention, cls protected by -inf)."""
import pytest
import torch

import tome_plus
from tome_plus.merging import merge_wavg
from tome_plus.methods.tome import bipartite_plan

from conftest import make
from naive import naive_bipartite_merge


@pytest.mark.parametrize("n,n_prefix,r", [(9, 0, 3), (12, 1, 5), (13, 2, 4), (21, 5, 8), (5, 1, 2), (8, 1, 1)])
def test_bipartite_plan_matches_naive_loops(n, n_prefix, r):
    torch.manual_seed(n * 10 + n_prefix)
    batch, dim = 3, 16
    x = torch.randn(batch, n, dim)
    metric = torch.randn(batch, n, 8)
    size = torch.randint(1, 5, (batch, n, 1)).float()
    plan = bipartite_plan(metric, r, n_prefix)
    out, out_size, _ = merge_wavg(plan, x, size)
    assert out.shape == (batch, n - r, dim)
    for b in range(batch):
        ref_x, ref_size, _ = naive_bipartite_merge(x[b], size[b, :, 0], metric[b], r, n_prefix)
        torch.testing.assert_close(out[b], ref_x, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out_size[b, :, 0], ref_size)


def tome_reference_logits(model, images, r):
    """The original ToMe forward on a timm ViT, written out: explicit softmax attention with
    log(size) added to the logits, merge after attention, cls token never merged."""
    x = model.norm_pre(model._pos_embed(model.patch_embed(images)))
    sizes = torch.ones(x.shape[0], x.shape[1])
    for blk in model.blocks:
        h = blk.norm1(x)
        batch, n, dim = h.shape
        attn = blk.attn
        q, k, v = attn.qkv(h).reshape(batch, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        logits = (q @ k.transpose(-2, -1)) * attn.scale + sizes.log()[:, None, None, :]
        y = (logits.softmax(-1) @ v).transpose(1, 2).reshape(batch, n, dim)
        x = x + attn.proj(y)
        rl = min(r, (n - 1) // 2)
        if rl > 0:
            metric = k.mean(1)
            merged = [naive_bipartite_merge(x[b], sizes[b], metric[b], rl, 1) for b in range(batch)]
            x = torch.stack([m[0] for m in merged])
            sizes = torch.stack([m[1] for m in merged])
        x = x + blk.mlp(blk.norm2(x))
    return model.head(model.norm(x)[:, 0])


@torch.no_grad()
def test_vit_base_matches_original_tome_algorithm():
    model = make("vit_base_patch16_224")
    torch.manual_seed(3)
    images = torch.randn(2, 3, 224, 224)
    ref = tome_reference_logits(model, images, r=16)
    tome_plus.patch(model, "tome", r=16, prop_attn=True)
    out = model(images)
    assert tome_plus.inspect(model).tokens[-1] == 11
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    # and the reference is not trivially equal to the unpatched model
    tome_plus.unpatch(model)
    assert not torch.allclose(model(images), ref, atol=1e-3)
