"""Independent, deliberately plain references used by the tests (loops over tokens)."""
import math
import os

import torch


def naive_bipartite_merge(x, size, metric, r, n_prefix):
    """Bipartite soft matching for one image, written from docs/methods.md (ToMe) with loops.

    x: [N, C], size: [N] floats, metric: [N, d]. Returns (x', size', groups) where groups[j] is the
    list of input positions merged into output token j. Output order: prefix, unmerged A, B.
    """
    n = x.shape[0]
    unit = metric / metric.norm(dim=-1, keepdim=True)
    a_pos = [i for i in range(n) if i % 2 == 0]
    b_pos = [i for i in range(n) if i % 2 == 1]
    best = {}
    for i in a_pos:
        if i < n_prefix:
            best[i] = (float("-inf"), None)
            continue
        top_score, top_j = float("-inf"), None
        for j in b_pos:
            if j < n_prefix:
                continue
            s = float(unit[i] @ unit[j])
            if s > top_score:
                top_score, top_j = s, j
        best[i] = (top_score, top_j)
    ranked = sorted(a_pos, key=lambda i: -best[i][0])
    sources = set(ranked[:r])
    into = {j: [j] for j in b_pos}
    for i in sources:
        into[best[i][1]].append(i)
    order = [i for i in range(n_prefix)]
    order += [i for i in a_pos if i >= n_prefix and i not in sources]
    order += [j for j in b_pos if j >= n_prefix]
    groups = [into.get(i, [i]) for i in order]
    new_x = torch.stack([sum(size[m] * x[m] for m in g) / sum(size[m] for m in g) for g in groups])
    new_size = torch.stack([sum(size[m] for m in g) for g in groups])
    return new_x, new_size, groups


def naive_energy(metric, margin, alpha, variant):
    """docs/methods.md (PiToMe) for one image with Python loops and float64 scalars. metric: [T, d]."""
    rows = [[float(v) for v in row] for row in metric]
    t = len(rows)
    units = []
    for row in rows:
        norm = max(math.sqrt(sum(v * v for v in row)), 1e-12)
        units.append([v / norm for v in row])
    energies = []
    for i in range(t):
        total = 0.0
        for j in range(t):
            w = sum(p * q for p, q in zip(units[i], units[j]))
            if variant == "paper":
                if j == i:
                    continue
                total += w if w >= margin else alpha * (math.exp(w - margin) - 1)
            else:
                z = w - margin
                total += z if z > 0 else alpha * (math.exp(z) - 1)
        energies.append(total / t)
    return torch.tensor(energies)


# Interpreted Triton kernels (the CPU test runs): `tl.dot` is numpy's matmul there, whose rounding
# depends on the machine's BLAS (bit-equal rows can get dot products an ulp apart), so a kernel's
# choices are compared with the twin's up to ties; on CUDA they must be the twin's exactly.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def loop_cosines(metric, a_idx, b_idx):
    """`[B, Na, Nb]` cosine of every A token to every B token of the split, one A token at a time,
    in float64."""
    feats = metric.double()
    out = torch.empty(a_idx.shape[0], a_idx.shape[1], b_idx.shape[1], dtype=torch.float64)
    for n in range(a_idx.shape[0]):
        others = feats[n, b_idx[n]]
        others = others / others.norm(dim=-1, keepdim=True)
        for i, token in enumerate(a_idx[n].tolist()):
            out[n, i] = others @ (feats[n, token] / feats[n, token].norm())
    return out


def assert_same_matches(i_tri, i_ref, s_tri, cosines):
    """The kernel picks the twin's B tokens. Under the interpreter `tl.dot` is numpy's matmul, whose
    rounding depends on the machine's BLAS: there the kernel's picks need only reach the best."""
    if INTERPRETED:
        assert_best_matches(s_tri, i_tri, cosines)
    else:
        assert torch.equal(i_tri, i_ref)


def assert_best_matches(scores, index, cosines, tol=1e-5):
    """`scores` are the best cosines and `index` points at a B token that reaches it (a near-tie
    within float32 rounding may go either way)."""
    best = cosines.max(dim=-1).values
    torch.testing.assert_close(scores.double(), best, rtol=tol, atol=tol)
    assert index.min() >= 0 and index.max() < cosines.shape[-1]
    assert (cosines.gather(-1, index.unsqueeze(-1)).squeeze(-1) >= best - tol).all()
