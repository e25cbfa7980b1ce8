"""Weighted PageRank over attention graphs (Zero-TPrune, docs/methods.md).

`weighted_pagerank(attn, iters, alive=None, init="cls", n_cls=1)` runs, for every (batch, head),
`s_t = A'^T s_{t-1}` where A' is the attention restricted to surviving tokens (rows renormalised
over surviving keys), and returns the final scores and each head's variance of `N s` (the
scale-free statistic of the variance head filter).

The Triton kernel (one kernel for every N) is a persistent grid: each program takes whole
(image, head) tasks, one after another, and runs all their iterations. Per task it
  1. reads A once (the only pass over the input), in its own dtype, and writes a packed copy to
     its own scratch: N x N zero-padded to NP x NP (NP = N rounded up to BLOCK), zero at dead
     queries and dead keys, rows 16-byte aligned. On the way it sums the rows over the alive keys:
     w = 1 / row sum (0 at dead queries) and u_0 = s_0 * w go to a small float32 scratch;
  2. per iteration streams the packed copy in [BLOCK, BLOCK] tiles, converting each tile to
     float32 as loaded (the copy is never upcast as a whole); no masks, no index clamps, vector
     loads; each row tile loads its slice of u straight from the scratch. s_t = A^T u_{t-1} goes to
     the other half of a double buffer as u_t = s_t * w, and a barrier publishes it;
  3. writes the scores and the variance of N_alive * s.
Nothing is held in registers across iterations (bounded registers for any N). The re-reads are
meant to hit on chip: the grid is sized so the packed heads in flight on an SM fit its L1 (224 x
224 fp16 = 98 KB for N = 197) and all of them fit L2.
"""
from __future__ import annotations

import functools
import numbers
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from . import check_launch, use_triton

# Launch tunables: module constants, so a GPU session can sweep them.
# Tile side: [BLOCK, BLOCK] tiles of the packed head; N is padded to a multiple of it. 32 keeps the
# padding small (N = 197 -> 224) and is the smallest tile that 4 warps cover with 16-byte loads.
BLOCK = 32
NUM_WARPS = 4
# Row tiles unrolled per step of the inner loop (independent loads in flight).
UNROLL = 2
# 1: no software pipelining (no shared-memory staging, which would take room from L1).
NUM_STAGES = 1
# Bytes of packed heads per SM that the grid sizing assumes stay in L1 across iterations
# (H100: 256 KB of L1 + shared memory per SM, and the kernel needs about 1 KB of shared memory).
L1_BYTES_PER_SM = 200 * 1024
MAX_PROGRAMS_PER_SM = 8
# Share of L2 that the packed heads in flight may fill.
L2_FRACTION = 0.75
# Under the Triton interpreter (CPU tensors, the tests) every tile step costs about a millisecond
# of Python whatever its size, so tiles are as large as N allows up to INTERPRET_BLOCK (the tests
# lower it to run the many-tile paths), and few programs run (each then takes several tasks).
INTERPRET_BLOCK = 256
INTERPRET_PROGRAMS = 3


CACHE_BYTES = 16 << 20  # the graph bytes the CPU twin iterates on at once (half of a typical L3)


def initial_scores(alive: torch.Tensor, init: str, n_cls: int) -> torch.Tensor:
    """`[B, N]` float32 start distribution over the alive tokens.

    "cls": the class token (position 0 when `n_cls` = 1) gets sqrt(N) times the mass of any other
    token, N = alive tokens; "uniform": 1/N each.
    """
    w = alive.float()
    if init == "cls" and n_cls > 0:
        n = w.sum(-1, keepdim=True)
        w = w.clone()
        w[:, :n_cls] = w[:, :n_cls] * n.sqrt()
    elif init != "uniform" and init != "cls":
        raise ValueError(f"init must be 'cls' or 'uniform', got {init!r}")
    return w / w.sum(-1, keepdim=True)


def cpu_group(n: int) -> int:
    """Heads of N tokens the CPU twin forms and iterates on at once: as many as CACHE_BYTES holds,
    a multiple of torch's threads where it holds that many (a batch of products is shared out
    by heads: with 2 threads, 3 heads at a time ran 1.4x slower than 2 or 4)."""
    fit, threads = CACHE_BYTES // max(n * n * 4, 1), torch.get_num_threads()
    return fit // threads * threads if fit >= threads else max(fit, 1)


def weighted_pagerank_torch(attn: torch.Tensor, iters: int, alive: Optional[torch.Tensor] = None,
                            init: str = "cls", n_cls: int = 1) -> Tuple[torch.Tensor, torch.Tensor]:
    """PyTorch twin.

    Args:
        attn: `[B, H, N, N]` attention probabilities (rows = queries), or a graph formed as it is
            read: anything with that `shape` and `heads(start, stop)` giving heads start .. stop - 1
            (`llm.features.AttentionGraph`).
        iters: power iterations (>= 1).
        alive: `[B, N]` bool, tokens still in play (default: all).
        init: "cls" or "uniform" start.
        n_cls: class tokens at the front that the "cls" start favours.
    Returns:
        scores `[B, H, N]` float32 (sum 1 over alive tokens, 0 elsewhere) and
        variance `[B, H]` of `N_alive * scores` over the alive tokens.
    """
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    batch, heads, n, _ = attn.shape
    everyone = alive is None  # then the column mask is all ones, and no product needs it
    if alive is None:
        alive = torch.ones(batch, n, dtype=torch.bool, device=attn.device)
    read = attn.heads if hasattr(attn, "heads") else lambda start, stop: attn[:, start:stop]
    live = alive.float()[:, None, :]  # [B, 1, N]
    s0 = initial_scores(alive, init, n_cls)[:, None, :]
    # all iterations on a few heads at a time: their matrices stay in the CPU's cache between
    # iterations instead of streaming every head's from memory on each (the same products)
    step = heads if attn.device.type != "cpu" else cpu_group(n)
    out = []
    for h in range(0, heads, step):
        a = read(h, h + step).float()
        # A'[i, j] = alive_i alive_j A[i, j] / sum_{alive k} A[i, k] (rows renormalised over
        # surviving keys, dropped queries passing no mass), never formed: its row factors scale s
        # and its column mask the product, so each iteration reads A once
        # [B, h, N]: each row's mass on surviving keys, as live A^T (one vector times a matrix:
        # 10x faster on a CPU than the broadcast matrix-vector product A live)
        rows = (live.unsqueeze(-2) @ a.transpose(-2, -1)).squeeze(-2)
        scale = live / rows.clamp_min(1e-30)
        s = s0.expand(batch, a.shape[1], n)
        for _ in range(iters):
            s = ((s * scale).unsqueeze(-2) @ a).squeeze(-2)  # s_t(j) = sum_i A'[i, j] s_{t-1}(i)
            s = s if everyone else s * live
        out.append(s)
    s = torch.cat(out, dim=1) if len(out) > 1 else out[0]
    n_alive = alive.float().sum(-1)[:, None]
    mask = alive[:, None, :].float()
    scaled = s * n_alive[..., None]
    mean = (scaled * mask).sum(-1) / n_alive
    var = (((scaled - mean[..., None]) ** 2) * mask).sum(-1) / n_alive
    return s, var


@triton.jit
def _wpr_kernel(attn_ptr, alive_ptr, vec_ptr, pack_ptr, scores_ptr, var_ptr,
                n_tasks, H, N, NP, n_cls, iters,
                stride_b, stride_h, stride_i, stride_j,
                BLOCK: tl.constexpr, UNROLL: tl.constexpr,
                HAS_ALIVE: tl.constexpr, CLS: tl.constexpr):
    """Persistent programs; each runs whole (image, head) tasks, all iterations, one after another.

    Scratch of one program: `vec_ptr` holds 4 float32 rows of NP (keep: 1 at alive tokens, 0 at
    dead ones and past N; the inverse row sums w; a double buffer for u = s * w); `pack_ptr` an
    NP x NP copy of the head in its own dtype, zero at dead queries, dead keys and the padding
    (NP = N rounded up to BLOCK), rows NP elements apart.
    """
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    keep_ptr = vec_ptr + pid.to(tl.int64) * (4 * NP)
    w_ptr = keep_ptr + NP
    buf_ptr = w_ptr + NP
    pack = pack_ptr + pid.to(tl.int64) * NP * NP
    idx = tl.arange(0, BLOCK)
    for task_i32 in range(pid, n_tasks, nprog):
        task = tl.cast(task_i32, tl.int64)
        b = task // H
        h = task % H
        base = attn_ptr + b * stride_b + h * stride_h
        alive_row = alive_ptr + b * N  # read only when HAS_ALIVE

        # Survivors (kept in the scratch), and how many class tokens survive (the "cls" start).
        cnt = tl.zeros([BLOCK], dtype=tl.float32)
        cnt_cls = tl.zeros([BLOCK], dtype=tl.float32)
        for c0 in range(0, NP, BLOCK):
            cols = c0 + idx
            keep = cols < N
            if HAS_ALIVE:
                keep = tl.load(alive_row + cols, mask=keep, other=0) != 0
            tl.store(keep_ptr + cols, keep.to(tl.float32))
            cnt += keep.to(tl.float32)
            cnt_cls += (keep & (cols < n_cls)).to(tl.float32)
        tl.debug_barrier()  # keep is read by other threads in pass 1
        n_alive = tl.sum(cnt, axis=0)
        top = tl.sqrt_rn(n_alive)  # weight of an alive class token under the "cls" start
        if CLS:
            total = n_alive + tl.sum(cnt_cls, axis=0) * (top - 1.0)
        else:
            total = n_alive

        # Pass 1, the only read of A: copy the head into the packed scratch with dead rows, dead
        # columns and the padding zeroed, and take the row sums over the alive keys on the way.
        # w = 1 / row sum at alive queries (0 at dead ones and past N); u_0 = s_0 * w.
        for r0 in range(0, NP, BLOCK):
            rows = r0 + idx
            keep_r = tl.load(keep_ptr + rows) != 0
            row_off = rows.to(tl.int64) * stride_i
            acc = tl.zeros([BLOCK, BLOCK], dtype=tl.float32)
            for c0 in range(0, NP, BLOCK):
                cols = c0 + idx
                keep_c = tl.load(keep_ptr + cols) != 0
                # Dead rows and columns (and everything past N) are neither read nor summed.
                a = tl.load(base + row_off[:, None] + cols[None, :].to(tl.int64) * stride_j,
                            mask=keep_r[:, None] & keep_c[None, :], other=0.0)
                tl.store(pack + rows[:, None] * NP + cols[None, :], a)
                acc += a.to(tl.float32)
            w = tl.where(keep_r, 1.0 / tl.maximum(tl.sum(acc, axis=1), 1e-30), 0.0)
            start = keep_r.to(tl.float32)
            if CLS:
                start = tl.where(rows < n_cls, start * top, start)
            tl.store(w_ptr + rows, w)
            tl.store(buf_ptr + rows, start / total * w)
        tl.debug_barrier()  # the packed head, w and u_0 are read by other threads next

        # s_t(j) = sum_i A[i, j] u_{t-1}(i) over the packed head: no masks, aligned vector loads,
        # one [BLOCK, BLOCK] float32 accumulator per column block, reduced once. Dead keys and the
        # padding get exactly 0 (their packed columns are 0); w = 0 keeps dead queries silent.
        for t in range(iters):
            src = buf_ptr + (t % 2) * NP
            dst = buf_ptr + ((t + 1) % 2) * NP
            last = t == iters - 1
            for c0 in range(0, NP, BLOCK):
                cols = c0 + idx
                acc = tl.zeros([BLOCK, BLOCK], dtype=tl.float32)
                for r0 in tl.range(0, NP, BLOCK, loop_unroll_factor=UNROLL):
                    rows = r0 + idx
                    u = tl.load(src + rows)
                    a = tl.load(pack + rows[:, None] * NP + cols[None, :])
                    acc += a.to(tl.float32) * u[:, None]
                s = tl.sum(acc, axis=0)
                w = tl.load(w_ptr + cols)
                tl.store(dst + cols, tl.where(last, s, s * w))  # the last iteration keeps s
            tl.debug_barrier()  # u_t (s_t) complete before anyone reads it or reuses the buffer

        # Scores and the population variance of N_alive * s over the alive tokens (two passes).
        s_ptr = buf_ptr + (iters % 2) * NP
        out_ptr = scores_ptr + task * N
        tot = tl.zeros([BLOCK], dtype=tl.float32)
        for c0 in range(0, N, BLOCK):
            cols = c0 + idx
            col_ok = cols < N
            s = tl.load(s_ptr + cols, mask=col_ok, other=0.0)
            tl.store(out_ptr + cols, s, mask=col_ok)
            tot += s * n_alive  # s is 0 at dead tokens
        mean = tl.sum(tot, axis=0) / n_alive
        sq = tl.zeros([BLOCK], dtype=tl.float32)
        for c0 in range(0, N, BLOCK):
            cols = c0 + idx
            col_ok = cols < N
            s = tl.load(s_ptr + cols, mask=col_ok, other=0.0)
            keep_c = tl.load(keep_ptr + cols, mask=col_ok, other=0.0) != 0
            dev = tl.where(keep_c, s * n_alive - mean, 0.0)
            sq += dev * dev
        tl.store(var_ptr + task, tl.sum(sq, axis=0) / n_alive)
        tl.debug_barrier()  # the next task overwrites this program's scratch


def programs_for(n_tasks: int, head_bytes: int, n_sm: int, l2_bytes: int) -> int:
    """Persistent grid size for heads whose packed copy takes `head_bytes`: as many per SM as fit
    L1_BYTES_PER_SM (1 to MAX_PROGRAMS_PER_SM), cut (not below a quarter of the SMs) when the
    copies in flight would overflow L2_FRACTION of L2.

    H100 (132 SMs, 50 MB L2): N = 197 fp16 (224 x 224 x 2 B) -> 264 programs; fp32 -> 132;
    N = 577 fp16 (608 x 608 x 2 B) -> 53.
    """
    head_bytes = max(1, head_bytes)
    per_sm = max(1, min(MAX_PROGRAMS_PER_SM, L1_BYTES_PER_SM // head_bytes))
    progs = n_sm * per_sm
    budget = int(L2_FRACTION * l2_bytes)
    if progs * head_bytes > budget:
        progs = min(progs, max(n_sm // 4, budget // head_bytes))
    return max(1, min(n_tasks, progs))


@functools.lru_cache(maxsize=None)
def _device_info(index: int) -> Tuple[int, int]:
    props = torch.cuda.get_device_properties(index)
    return props.multi_processor_count, getattr(props, "L2_cache_size", 50 * 2**20)


def block_size(attn: torch.Tensor, n: int) -> int:
    """Tile side: BLOCK on the GPU; under the interpreter up to next_power_of_2(N), at most
    INTERPRET_BLOCK."""
    if attn.is_cuda:
        return BLOCK
    return min(INTERPRET_BLOCK, max(BLOCK, triton.next_power_of_2(n)))


def num_programs(attn: torch.Tensor, n_tasks: int, padded: int) -> int:
    """Programs to launch for `n_tasks` (image, head) tasks of `attn` (no host sync)."""
    if not attn.is_cuda:
        return max(1, min(n_tasks, INTERPRET_PROGRAMS))
    index = attn.device.index if attn.device.index is not None else torch.cuda.current_device()
    return programs_for(n_tasks, padded * padded * attn.element_size(), *_device_info(index))


def weighted_pagerank_triton(attn: torch.Tensor, iters: int, alive: Optional[torch.Tensor] = None,
                             init: str = "cls", n_cls: int = 1) -> Tuple[torch.Tensor, torch.Tensor]:
    """Triton version of `weighted_pagerank_torch` (same signature, same answers).

    Every iteration of a (batch, head) runs in one program; float32 accumulation for any input
    dtype, which is read as given (never upcast as a whole).
    """
    check_launch(_wpr_kernel, attn)
    if isinstance(iters, bool) or not isinstance(iters, numbers.Integral) or iters < 1:
        raise ValueError(f"iters must be a positive int, got {iters!r}")
    if init not in ("cls", "uniform"):
        raise ValueError(f"init must be 'cls' or 'uniform', got {init!r}")
    if attn.dim() != 4 or attn.shape[-1] != attn.shape[-2]:
        raise ValueError(f"attn must be [B, H, N, N], got {tuple(attn.shape)}")
    batch, heads, n, _ = attn.shape
    if alive is not None:
        if tuple(alive.shape) != (batch, n):
            raise ValueError(f"alive must be [B, N] = {(batch, n)}, got {tuple(alive.shape)}")
        alive = alive.to(device=attn.device, dtype=torch.bool).contiguous().view(torch.uint8)
    scores = torch.empty(batch, heads, n, dtype=torch.float32, device=attn.device)
    var = torch.empty(batch, heads, dtype=torch.float32, device=attn.device)
    n_tasks = batch * heads
    if n_tasks == 0 or n == 0:
        return scores, var.fill_(float("nan"))
    block = block_size(attn, n)
    padded = triton.cdiv(n, block) * block
    if padded * padded >= 2**31:  # offsets inside a packed head are int32
        raise ValueError(f"N = {n} is too large for the packed copy of a head")
    progs = num_programs(attn, n_tasks, padded)
    vec = torch.empty(progs * 4 * padded, dtype=torch.float32, device=attn.device)
    pack = torch.empty(progs * padded * padded, dtype=attn.dtype, device=attn.device)
    alive_arg = alive if alive is not None else scores  # never read when HAS_ALIVE is False
    _wpr_kernel[(progs,)](
        attn, alive_arg, vec, pack, scores, var, n_tasks, heads, n, padded, int(n_cls), int(iters),
        *attn.stride(), BLOCK=block, UNROLL=UNROLL, HAS_ALIVE=alive is not None, CLS=init == "cls",
        num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    return scores, var


def weighted_pagerank(attn: torch.Tensor, iters: int, alive: Optional[torch.Tensor] = None,
                      init: str = "cls", n_cls: int = 1) -> Tuple[torch.Tensor, torch.Tensor]:
    """Dispatch: the fused Triton kernel on CUDA (or when forced), the PyTorch twin elsewhere."""
    if use_triton(attn):  # the kernel reads a whole graph
        return weighted_pagerank_triton(attn.full() if hasattr(attn, "full") else attn, iters, alive, init, n_cls)
    return weighted_pagerank_torch(attn, iters, alive, init, n_cls)
