"""Independent, deliberately plain references used by the tests (loops over tokens)."""
import torch


def naive_bipartite_merge(x, size, metric, r, n_prefix):
    """Bipartite soft matching for one image, written from METHODS.md section 1 with loops.

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
