"""The features site: a vision method (ToMe, PiToMe, Zero-TPrune) on the image features, once,
before the language model's first layer.

`reduce_features` finds each image's (or video's) run of placeholders in the embeddings HF built
(its features already scattered in, its positions, M-RoPE rows included, already computed) and
reduces it with `reduce.reduce_to` (the method's own `plan` and `merging.apply_plan`, repeated
until the budget is met); the decoder loop then drops the reduced slots as after an LLM method's
site. Zero-TPrune's attention graph there is the first decoder layer's attention among each
image's tokens (`image_attention`).
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
import torch.nn as nn

from ..backends.base import PatchInfo
from ..precision import fp32_logits
from ..reduce import reduce_to
from ..warn import warn_caller
from .context import LlmInputs
from .segments import Segment


def feature_count(config, reducer, n: int) -> int:
    """Tokens an image's (or a clip's) `n` reducible features keep under the features site's budget:
    `tokens` (at most n), `keep` (the method's rounding) or `r` (removed); at least one stays."""
    kind, value = config.budget
    if kind == "tokens":
        return min(value, n)
    if kind == "keep":  # a small image or clip keeps one token at least
        return max(n - reducer.keep_removal(n, value), 1)
    return max(n - value, 1)


def warn_tokens_once(info: PatchInfo, detail: str) -> None:
    """A `tokens=N` budget above what an image of this forward has: one warning per patched model.
    Where the count depends on the image (anyres tiles, Qwen's native resolution) `patch` cannot
    refuse N as it does a count it knows, so the forward warns, as timm's does at other input sizes."""
    if not info.parts.tokens_checked:
        info.parts.tokens_checked = True
        warn_caller(f"tokens={info.config.tokens} {detail} (warned once per patch)")


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding as the Llama family applies it (`[G, H, N, D]`, angles `[G, N, D]`)."""
    half = x.shape[-1] // 2
    turned = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.unsqueeze(1) + turned * sin.unsqueeze(1)


def heads(attn: nn.Module, which: str, x: torch.Tensor) -> torch.Tensor:
    """`[B, H, N, head_dim]` queries (`which="q"`) or keys ("k") of `x` (`[B, N, D]`) as the decoder's
    attention forms them before the rotary embedding: the projection, then its per-head RMS-norm
    where it has one (Qwen3, Gemma 3: `q_norm`, `k_norm`)."""
    batch, n, _ = x.shape
    out = getattr(attn, f"{which}_proj")(x).view(batch, n, -1, attn.head_dim)
    norm = getattr(attn, f"{which}_norm", None)
    return (norm(out) if norm is not None else out).transpose(1, 2)


class AttentionGraph:
    """`[G, H, N, N]` float32 attention among each set's tokens, `softmax(scale q k^T)` with every
    token seeing every other (Zero-TPrune's graph at the features site), formed a few heads at a
    time as it is read (`heads`), never whole. On a CPU the heads are written to one buffer that
    every reading reuses: a block of heads stays in the cache while PageRank iterates on it, and
    no graph-sized allocation (61 MB for 16 heads of 980 tokens) is page-faulted in at each
    reading, which cost more than the products themselves. Query head h reads KV head
    h // (H / KV)."""

    def __init__(self, q: torch.Tensor, k: torch.Tensor, scaling: float) -> None:
        self.q, self.k, self.scaling = q, k, scaling  # [G, H, N, D], [G, KV, N, D], after rotary
        self.shape = torch.Size((q.shape[0], q.shape[1], q.shape[2], k.shape[2]))
        self.device, self.is_cuda, self.dtype = q.device, q.is_cuda, torch.float32
        self._full: Optional[torch.Tensor] = None
        self._buffer: Optional[torch.Tensor] = None

    def _pair(self, start: int, stop: int) -> Tuple[torch.Tensor, torch.Tensor]:
        q = self.q[:, start:stop]
        kv = torch.arange(start, start + q.shape[1], device=self.k.device) // (self.q.shape[1] // self.k.shape[1])
        return q, self.k.index_select(1, kv)

    def heads(self, start: int, stop: int) -> torch.Tensor:
        """`[G, stop - start, N, N]` the probabilities of query heads `start .. stop - 1`. On a CPU
        this is the graph's buffer, overwritten by the next call: read it before asking again."""
        q, k = self._pair(start, stop)
        if q.is_cuda:
            return fp32_logits(q, k, self.scaling).softmax(dim=-1)
        shape = (*q.shape[:3], k.shape[2])
        size = shape[0] * shape[1] * shape[2] * shape[3]
        if self._buffer is None or self._buffer.numel() < 2 * size:
            self._buffer = torch.empty(2 * size, dtype=torch.float32, device=q.device)
        logits = fp32_logits(q, k, self.scaling, out=self._buffer[:size].view(shape))
        return torch.softmax(logits, dim=-1, out=self._buffer[size:2 * size].view(shape))

    def among(self, index: torch.Tensor) -> "AttentionGraph":
        """The graph among the tokens `index` (`[G, M]`, in order) alone: each row's softmax over
        those keys, which is the whole graph's row renormalised over them (Zero-TPrune's I-stage
        on the S-stage's survivors), formed from their queries and keys, never gathered."""
        pick = lambda t: t.gather(2, index[:, None, :, None].expand(t.shape[0], t.shape[1], index.shape[1], t.shape[3]))
        return AttentionGraph(pick(self.q), pick(self.k), self.scaling)

    def full(self) -> torch.Tensor:
        """The whole `[G, H, N, N]` graph (the Triton kernel's input; VisionZip's received
        attention), formed once and kept."""
        if self._full is None:
            q, k = self._pair(0, self.q.shape[1])
            self._full = fp32_logits(q, k, self.scaling).softmax(dim=-1)
        return self._full


def image_attention(layer: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> AttentionGraph:
    """The attention among each set's tokens (`x`: `[G, N, D]` embeddings) in the decoder's first
    layer, every token seeing every other (no causal order): Zero-TPrune's graph at the features
    site, formed as it is read (`AttentionGraph`)."""
    attn = layer.self_attn
    x = layer.input_layernorm(x)
    q, k = heads(attn, "q", x), heads(attn, "k", x)
    q, k = rotate(q, cos.to(q.dtype), sin.to(q.dtype)), rotate(k, cos.to(k.dtype), sin.to(k.dtype))
    return AttentionGraph(q, k, attn.scaling)


def query_attention(layer: nn.Module, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, query: torch.Tensor,
                    keys: torch.Tensor) -> torch.Tensor:
    """`[B, N]` float32: the probabilities of one query per row (`query`: `[B]` slots) over the
    current tokens (`keys`: `[B, N]` bool, those it may see), averaged over heads, as decoder
    `layer` would form them from `h` (`[B, N, D]`, its input) before it runs: PyramidDrop's rank
    with the next layer's norm, q and k."""
    attn = layer.self_attn
    x = layer.input_layernorm(h)
    batch, n, width = x.shape
    pick = lambda t: t.gather(1, query.view(batch, 1, 1).expand(batch, 1, t.shape[-1]))
    q, k = heads(attn, "q", pick(x)), heads(attn, "k", x)
    q = rotate(q, pick(cos).to(q.dtype), pick(sin).to(q.dtype))
    k = rotate(k, cos.to(k.dtype), sin.to(k.dtype))
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    logits = fp32_logits(q, k, attn.scaling).masked_fill(~keys[:, None, None, :], float("-inf"))
    return logits.softmax(dim=-1).mean(dim=1)[:, 0]


def reduce_sets(x: torch.Tensor, reducer, n_keep: int,
                attention: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
                width: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Each of G images' features (`x`: `[G, n, D]`) reduced to `n_keep` tokens by the vision
    method `reducer`, its signals read from the features themselves (the first `width` channels:
    the rest are carried along, merged or dropped with their token, as Qwen3-VL's DeepStack
    features); `attention(x, index)` gives the `[G, H, n', n']` attention among the current
    tokens where the method needs it (Zero-TPrune). Returns the kept `[G, n_keep, D]` and each
    one's input index (a merged token: its destination's), in input order. Shared by the HF
    features site and the vLLM plugin."""
    def signals(x: torch.Tensor, index: torch.Tensor) -> dict:
        x = x[..., :width]
        out = {"k": x.unsqueeze(1), "keys": x.float(), "x": x}
        if "attn" in reducer.needs:
            out["attn"] = attention(x, index)
        return out

    x, index, _ = reduce_to(x, reducer, n_keep, signals)
    order = index.argsort(dim=1)
    return x.gather(1, order.unsqueeze(-1).expand_as(x)), index.gather(1, order)


def reduce_features(model: nn.Module, h: torch.Tensor, seg: Segment, scope: LlmInputs, info: PatchInfo,
                    angles: Optional[Tuple[torch.Tensor, torch.Tensor]] = None, carry: Optional[torch.Tensor] = None
                    ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """The features site: each image's (or video's) visual tokens, newlines aside, reduced by a
    vision method (`reduce.reduce_to`) before the first decoder layer. Returns the hidden states
    (a merged token written at its destination's place), `[B, L]` which slots stay, and `carry`
    (`[B, L, C]` features that go with each token, DeepStack's: the same merge, with sizes) reduced
    alike; a kept token keeps its position (and M-RoPE angles), a merged one its destination's.
    `angles`: the first layer's `(cos, sin)` per slot (default the segment's)."""
    cos, sin = angles if angles is not None else (seg.cos, seg.sin)
    reducer, config = info.reducer, info.config
    reducible = seg.visual & (scope.runs >= 0)
    if scope.newline is not None:
        # the newline as the features carry it: the parameter, rounded to the features' dtype where
        # they came out in half precision (autocast) and were scattered into wider embeddings
        for dtype in (h.dtype, torch.bfloat16, torch.float16):
            reducible &= ~(h == scope.newline.to(dtype).to(h.dtype)).all(dim=-1)
    scope.newlines = (seg.visual & ~reducible).sum(dim=1)
    keep = ~reducible
    rows, cols = reducible.nonzero(as_tuple=True)
    if rows.numel() == 0:
        return h, keep, carry
    # one run per image: runs of a row are in column order, so equal keys are consecutive
    key = rows * (h.shape[1] + 1) + scope.runs[rows, cols]
    counts = torch.unique_consecutive(key, return_counts=True)[1].tolist()
    if config.tokens is not None and config.tokens > min(counts):
        warn_tokens_once(info, f"is more than the {min(counts)} tokens (newlines aside) an image or video of this "
                               f"forward has at site='features': it keeps all of them")
    starts = [0]
    for c in counts[:-1]:
        starts.append(starts[-1] + c)
    by_length: dict = {}
    for start, n in zip(starts, counts):
        by_length.setdefault(n, []).append(start)
    width = h.shape[-1]
    h = h.clone() if carry is None else torch.cat([h, carry.to(h.dtype)], dim=-1)
    for n, group in by_length.items():
        at = torch.tensor(group, device=h.device).unsqueeze(1) + torch.arange(n, device=h.device)
        r, c = rows[at], cols[at]  # [G, n] each set's tokens
        n_keep = feature_count(config, reducer, n)
        if n_keep >= n:
            keep[r, c] = True
            continue
        attention = lambda x, index, r=r, c=c: image_attention(
            model.layers[0], x, cos[r.gather(1, index), c.gather(1, index)], sin[r.gather(1, index), c.gather(1, index)])
        x, index = reduce_sets(h[r, c], reducer, n_keep, attention, width)
        rr, cc = r.gather(1, index), c.gather(1, index)
        h[rr, cc] = x.to(h.dtype)
        keep[rr, cc] = True
    if carry is None:
        return h, keep, None
    return h[..., :width].contiguous(), keep, h[..., width:].to(carry.dtype)
