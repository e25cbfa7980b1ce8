"""The fused weighted-PageRank kernel (Zero-TPrune, docs/methods.md).

Runs on CPU through the Triton interpreter (conftest sets TRITON_INTERPRET=1 before tome_plus is
imported). The interpreter is slow per tile of A and per iteration, so big-N cases use few
(batch, head) tasks and few iterations, and parameter products run as all-pairs cases
(`conftest.all_pairs`; the whole product with TOME_PLUS_TEST_FULL=1).
"""
import pytest
import torch

from tome_plus.triton_kernels import pagerank as P
from tome_plus.triton_kernels.pagerank import (weighted_pagerank, weighted_pagerank_torch,
                                               weighted_pagerank_triton)

from conftest import all_pairs

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def attention(batch, heads, n, dtype=torch.float32, seed=0):
    """Softmax of random logits over the keys, cast to `dtype` (rows = queries)."""
    g = torch.Generator().manual_seed(seed)
    logits = 2.0 * torch.randn(batch, heads, n, n, generator=g)
    return logits.softmax(-1).to(dtype)


def random_alive(batch, n, seed=0):
    """Random survivors, the class token always among them."""
    g = torch.Generator().manual_seed(seed + 1000)
    alive = torch.rand(batch, n, generator=g) > 0.4
    alive[:, 0] = True
    return alive


def check_against_twin(attn, iters, alive, init, n_cls=1):
    """Kernel vs the PyTorch twin, plus the invariants of the result."""
    s, var = weighted_pagerank_triton(attn, iters, alive, init, n_cls)
    s_ref, var_ref = weighted_pagerank_torch(attn, iters, alive, init, n_cls)
    batch, heads, n, _ = attn.shape
    assert s.dtype == torch.float32 and var.dtype == torch.float32
    assert s.shape == (batch, heads, n) and var.shape == (batch, heads)
    # The twin upcasts the input exactly as the kernel does, so even for fp16/bf16 inputs the two
    # differ only by float32 summation order: the tolerance need not grow with the input dtype.
    torch.testing.assert_close(s, s_ref, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(var, var_ref, rtol=1e-4, atol=1e-6)
    mask = torch.ones(batch, n, dtype=torch.bool) if alive is None else alive
    torch.testing.assert_close(s.sum(-1), torch.ones(batch, heads), rtol=1e-5, atol=1e-5)
    assert (s * ~mask[:, None, :]).abs().max() == 0  # dead tokens hold no mass


# (a) against the twin ------------------------------------------------------------------------

@pytest.mark.parametrize("n,batch,dtype,masked,init",
                         all_pairs([1, 2, 3, 61], [1, 7], DTYPES, [False, True], ["cls", "uniform"]))
def test_small_n_matches_twin(n, batch, dtype, masked, init):
    heads = 2 if batch == 1 else 1
    attn = attention(batch, heads, n, dtype, seed=n)
    alive = random_alive(batch, n, seed=n) if masked else None
    for iters in (1, 30):
        check_against_twin(attn, iters, alive, init)


@pytest.mark.parametrize("dtype,masked,init,iters", all_pairs(DTYPES, [False, True], ["cls", "uniform"], [1, 30]))
def test_n197_matches_twin(dtype, masked, init, iters):
    attn = attention(7, 2, 197, dtype, seed=197)
    check_against_twin(attn, iters, random_alive(7, 197) if masked else None, init)


# Larger N: 2 x 2 (N = 257) and 3 x 3 (N = 577) tiles of 256 x 256 under the interpreter.
# Each case: (n, batch, heads, dtype, masked, init, iters).
STREAM_CASES = [
    *[(257, 1, 2, d, m, i, 1) for d, m, i in all_pairs(DTYPES, [False, True], ["cls", "uniform"])],
    (257, 7, 1, torch.float32, True, "cls", 1),
    (257, 1, 1, torch.float16, True, "cls", 30),
    (577, 1, 2, torch.float32, True, "cls", 1),
    (577, 1, 2, torch.bfloat16, False, "uniform", 1),
    (577, 1, 1, torch.float16, True, "uniform", 1),
    (577, 7, 1, torch.bfloat16, True, "cls", 1),
    (577, 1, 1, torch.float32, True, "cls", 30),
]


@pytest.mark.parametrize("n,batch,heads,dtype,masked,init,iters", STREAM_CASES)
def test_large_n_matches_twin(n, batch, heads, dtype, masked, init, iters):
    attn = attention(batch, heads, n, dtype, seed=n + batch)
    check_against_twin(attn, iters, random_alive(batch, n, seed=n) if masked else None, init)


@pytest.mark.parametrize("dtype,masked,init", all_pairs([torch.float32, torch.bfloat16], [False, True], ["cls", "uniform"]))
def test_small_tiles_many_ragged_blocks(monkeypatch, dtype, masked, init):
    """Many tiles at a size the interpreter runs quickly: N = 61 in 8 x 8 tiles, 8 row blocks and 8
    column blocks, the last of each 3 tokens past N."""
    monkeypatch.setattr(P, "INTERPRET_BLOCK", 8)
    attn = attention(2, 1, 61, dtype, seed=3)
    check_against_twin(attn, 5, random_alive(2, 61, seed=3) if masked else None, init)


def test_tile_sizes_agree(monkeypatch):
    """Tile size and unrolling change only the float32 summation order."""
    attn = attention(2, 2, 40, seed=8)
    alive = random_alive(2, 40, seed=8)
    default = weighted_pagerank_triton(attn, 12, alive)
    for block, unroll in [(8, 1), (16, 3), (32, 2)]:
        monkeypatch.setattr(P, "INTERPRET_BLOCK", block)
        monkeypatch.setattr(P, "UNROLL", unroll)
        torch.testing.assert_close(weighted_pagerank_triton(attn, 12, alive), default,
                                   rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("n", [61, 257])
def test_non_contiguous_attention(n):
    """Strided views (heads-major storage, a column slice) give the answers of contiguous copies."""
    batch, heads = 2, 2 if n < 256 else 1
    g = torch.Generator().manual_seed(5)
    stored = (2 * torch.randn(batch, n, heads, 2 * n, generator=g))[..., :n].softmax(-1)
    wide = torch.zeros(batch, n, heads, 2 * n)
    wide[..., :n] = stored
    attn = wide[..., :n].transpose(1, 2)  # [B, H, N, N] with strides (.., .., 2*H*N, 1)
    assert not attn.is_contiguous()
    alive = random_alive(batch, n, seed=5)
    iters = 20 if n < 256 else 1
    got = weighted_pagerank_triton(attn, iters, alive)
    want = weighted_pagerank_triton(attn.contiguous(), iters, alive)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    check_against_twin(attn, iters, alive, "cls")


@pytest.mark.parametrize("n", [61, 257])
def test_alive_none_equals_all_alive(n):
    attn = attention(1, 2, n, seed=4)
    iters = 10 if n < 256 else 1
    got = weighted_pagerank_triton(attn, iters, None)
    want = weighted_pagerank_triton(attn, iters, torch.ones(1, n, dtype=torch.bool))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


def test_two_class_tokens():
    attn = attention(3, 2, 33, seed=6)
    check_against_twin(attn, 7, random_alive(3, 33, seed=6), "cls", n_cls=2)
    check_against_twin(attn, 7, None, "cls", n_cls=0)


def test_dispatcher_uses_kernel_when_forced(monkeypatch):
    calls = []
    real = P.weighted_pagerank_triton

    def spy(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setenv("TOME_PLUS_KERNELS", "triton")
    monkeypatch.setattr(P, "weighted_pagerank_triton", spy)
    attn = attention(1, 2, 9, seed=2)
    s, var = weighted_pagerank(attn, 4)
    assert calls == [1]
    torch.testing.assert_close((s, var), weighted_pagerank_torch(attn, 4), rtol=1e-5, atol=1e-7)


def test_a_graph_formed_as_read_reaches_the_kernel_whole(monkeypatch):
    """The features site's graph (`AttentionGraph`, formed a few heads at a time on a CPU) goes to
    the kernel formed whole, and the kernel's answer is the twin's on the same graph."""
    from tome_plus.llm.features import AttentionGraph
    monkeypatch.setenv("TOME_PLUS_KERNELS", "triton")
    g = torch.Generator().manual_seed(3)
    graph = AttentionGraph(torch.randn(1, 4, 12, 8, generator=g), torch.randn(1, 2, 12, 8, generator=g), 0.3)
    alive = random_alive(1, 12)
    got = weighted_pagerank(graph, 5, alive, "uniform", 0)
    monkeypatch.setattr(P, "CACHE_BYTES", 1)  # the twin forms and iterates one head at a time
    torch.testing.assert_close(got, weighted_pagerank_torch(graph, 5, alive, "uniform", 0), rtol=1e-5, atol=1e-7)


# (b) against loops over tokens ----------------------------------------------------------------

def naive_pagerank(attn, iters, alive, init, n_cls=1):
    """One head, float64, written from docs/methods.md (Zero-TPrune) with loops: returns (scores list, variance)."""
    n = len(alive)
    live = [i for i in range(n) if alive[i]]
    a = [[0.0] * n for _ in range(n)]
    for i in live:
        row = sum(float(attn[i][j]) for j in live)
        for j in live:
            a[i][j] = float(attn[i][j]) / row
    weight = [0.0] * n
    for i in live:
        weight[i] = len(live) ** 0.5 if (init == "cls" and i < n_cls) else 1.0
    s = [w / sum(weight) for w in weight]
    for _ in range(iters):
        s = [sum(a[i][j] * s[i] for i in range(n)) for j in range(n)]
    scaled = [len(live) * s[j] for j in live]
    mean = sum(scaled) / len(live)
    return s, sum((x - mean) ** 2 for x in scaled) / len(live)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("init", ["cls", "uniform"])
@pytest.mark.parametrize("iters", [1, 6])
def test_matches_loop_reference(masked, init, iters):
    n = 5
    attn = attention(2, 3, n, seed=11)
    alive = torch.tensor([[1, 0, 1, 1, 0], [1, 1, 1, 0, 1]], dtype=torch.bool) if masked else None
    s, var = weighted_pagerank_triton(attn, iters, alive, init)
    for b in range(2):
        live = alive[b].tolist() if masked else [True] * n
        for h in range(3):
            ref_s, ref_var = naive_pagerank(attn[b, h].tolist(), iters, live, init)
            torch.testing.assert_close(s[b, h], torch.tensor(ref_s, dtype=torch.float32),
                                       rtol=1e-5, atol=1e-7)
            assert abs(var[b, h].item() - ref_var) <= 1e-5 * max(1.0, abs(ref_var))


def check_against_loops(attn, iters, alive, init, n_cls=1):
    """Kernel vs `naive_pagerank` on every head, in float64 from the very values stored in `attn`."""
    s, var = weighted_pagerank_triton(attn, iters, alive, init, n_cls)
    batch, heads, n, _ = attn.shape
    values = attn.double()
    for b in range(batch):
        live = alive[b].tolist() if alive is not None else [True] * n
        for h in range(heads):
            ref_s, ref_var = naive_pagerank(values[b, h].tolist(), iters, live, init, n_cls)
            torch.testing.assert_close(s[b, h].double(), torch.tensor(ref_s, dtype=torch.float64),
                                       rtol=1e-5, atol=1e-8)
            assert abs(var[b, h].item() - ref_var) <= 1e-5 * max(1.0, abs(ref_var))


@pytest.mark.parametrize("dtype,masked,init", all_pairs(DTYPES, [False, True], ["cls", "uniform"]))
def test_ragged_tiles_match_loop_reference(monkeypatch, dtype, masked, init):
    """N = 37 in 8 x 8 tiles: 5 row and 5 column blocks, the last of each mostly padding."""
    monkeypatch.setattr(P, "INTERPRET_BLOCK", 8)
    attn = attention(2, 2, 37, dtype, seed=12)
    check_against_loops(attn, 3, random_alive(2, 37, seed=12) if masked else None, init)


@pytest.mark.parametrize("dtype,masked,init", [
    (torch.bfloat16, True, "cls"), (torch.float16, True, "uniform"),
    (torch.float16, False, "cls"), (torch.float32, True, "cls")])
def test_gpu_tiles_match_loop_reference(monkeypatch, dtype, masked, init):
    """N = 70 at the GPU's 32 x 32 tiles (3 blocks each way, padded to 96), two class tokens."""
    assert P.BLOCK == 32
    monkeypatch.setattr(P, "INTERPRET_BLOCK", P.BLOCK)
    attn = attention(2, 2, 70, dtype, seed=13)
    check_against_loops(attn, 4, random_alive(2, 70, seed=13) if masked else None, init, n_cls=2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_vit_length_at_gpu_tiles(monkeypatch, dtype):
    """N = 197 as the GPU runs it: 32 x 32 tiles, 7 blocks each way, the last 27 tokens past N."""
    monkeypatch.setattr(P, "INTERPRET_BLOCK", P.BLOCK)
    attn = attention(1, 2, 197, dtype, seed=19)
    alive = random_alive(1, 197, seed=19)
    check_against_loops(attn, 2, alive, "cls")
    check_against_twin(attn, 2, alive, "uniform")


@pytest.mark.parametrize("n,block", [(32, 8), (32, 32), (48, 16)])
def test_unpadded_tiles_match_loop_reference(monkeypatch, n, block):
    """N a multiple of the tile: no padding at all."""
    monkeypatch.setattr(P, "INTERPRET_BLOCK", block)
    attn = attention(2, 1, n, torch.float16, seed=n)
    check_against_loops(attn, 3, random_alive(2, n, seed=n), "cls")


# (c) programs, scratch, inputs --------------------------------------------------------------

@pytest.mark.parametrize("iters", [3, 4])
def test_program_count_does_not_change_results(monkeypatch, iters):
    """Programs run tasks one after another on one scratch: any grid size gives the same bits
    (odd and even iteration counts end in different halves of the double buffer)."""
    attn = attention(3, 2, 21, torch.bfloat16, seed=14)
    alive = random_alive(3, 21, seed=14)
    alive[2] = False
    alive[2, :3] = True  # an image with few survivors between two with many
    results = []
    for programs in (1, 2, 4, 6, 50):
        monkeypatch.setattr(P, "INTERPRET_PROGRAMS", programs)
        results.append(weighted_pagerank_triton(attn, iters, alive))
    for got in results[1:]:
        torch.testing.assert_close(got, results[0], rtol=0, atol=0)
    check_against_twin(attn, iters, alive, "cls")


@pytest.mark.parametrize("dtype", DTYPES)
def test_inputs_not_mutated(dtype):
    attn = attention(2, 2, 37, dtype, seed=15)
    alive = random_alive(2, 37, seed=15)
    strided = torch.zeros(2, 2, 37, 40, dtype=dtype)
    strided[..., :37] = attn
    for a in (attn, strided[..., :37]):
        storage, alive_copy = a.clone(), alive.clone()
        whole = strided.clone()
        weighted_pagerank_triton(a, 3, alive)
        assert torch.equal(a, storage) and torch.equal(alive, alive_copy)
        assert torch.equal(strided, whole)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dead_rows_and_columns_are_never_used(dtype):
    """Whatever sits in dead queries' rows or dead keys' columns cannot change the result."""
    attn = attention(2, 2, 37, dtype, seed=16)
    alive = random_alive(2, 37, seed=16)
    junk = attn.clone()
    g = torch.Generator().manual_seed(16)
    noise = (1000 * torch.rand(junk.shape, generator=g)).to(dtype)
    dead = ~alive[:, None, :, None] | ~alive[:, None, None, :]
    junk[dead.expand_as(junk)] = noise[dead.expand_as(junk)]
    assert not torch.equal(junk, attn)
    torch.testing.assert_close(weighted_pagerank_triton(junk, 4, alive),
                               weighted_pagerank_triton(attn, 4, alive), rtol=0, atol=0)


def test_block_size():
    cpu = torch.zeros(1)
    assert P.block_size(cpu, 5) == 32 and P.block_size(cpu, 197) == 256
    assert P.block_size(cpu, 577) == 256  # INTERPRET_BLOCK
    if torch.cuda.is_available():
        assert P.block_size(torch.zeros(1, device="cuda"), 197) == P.BLOCK


def test_grid_sizing():
    h100 = dict(n_sm=132, l2_bytes=50 * 2**20)
    fp16_197 = 224 * 224 * 2  # the packed head: N = 197 padded to 224
    assert P.programs_for(3072, fp16_197, **h100) == 264  # two packed heads per SM fit L1
    assert P.programs_for(3072, 2 * fp16_197, **h100) == 132  # fp32
    assert P.programs_for(1024, 608 * 608 * 2, **h100) == 53  # N = 577: the copies in flight fit L2
    assert P.programs_for(3072, 64 * 64 * 2, **h100) == 132 * P.MAX_PROGRAMS_PER_SM
    assert P.programs_for(5, fp16_197, **h100) == 5
    assert P.programs_for(3, 4096 * 4096 * 4, n_sm=2, l2_bytes=2**20) == 1


# (d) the fixed point ----------------------------------------------------------------------------

@pytest.mark.parametrize("init", ["cls", "uniform"])
def test_converges_to_stationary_distribution(init):
    """With all tokens alive, s_t = A^T s_{t-1} converges to A^T's eigenvalue-1 eigenvector."""
    batch, heads, n = 2, 2, 12
    attn = attention(batch, heads, n, seed=21)
    s, var = weighted_pagerank_triton(attn, 200, None, init)
    for b in range(batch):
        for h in range(heads):
            a = attn[b, h].double()
            a = a / a.sum(-1, keepdim=True)  # exactly stochastic, like the kernel's renormalised rows
            vals, vecs = torch.linalg.eig(a.T)
            k = (vals - 1).abs().argmin()
            assert abs(vals[k] - 1) < 1e-9
            assert (vals.abs() < 0.9).sum() == n - 1  # spectral gap: 200 iterations have converged
            pi = vecs[:, k].real
            pi = pi / pi.sum()
            torch.testing.assert_close(s[b, h].double(), pi, rtol=1e-4, atol=1e-7)
            scaled = n * pi
            torch.testing.assert_close(var[b, h].double(), ((scaled - scaled.mean()) ** 2).mean(),
                                       rtol=1e-4, atol=1e-7)


# (e) errors -------------------------------------------------------------------------------------

@pytest.mark.parametrize("iters", [0, -3, 2.5, True])
def test_bad_iters(iters):
    with pytest.raises(ValueError, match="iters"):
        weighted_pagerank_triton(attention(1, 1, 4), iters)


def test_bad_init():
    with pytest.raises(ValueError, match="init"):
        weighted_pagerank_triton(attention(1, 1, 4), 3, init="random")


def test_float64_rejected():
    with pytest.raises(TypeError, match="float64"):
        weighted_pagerank_triton(attention(1, 1, 4).double(), 3)


def test_too_long_rejected():
    """Offsets inside a packed head are int32: N whose padded square reaches 2**31 is refused."""
    attn = torch.zeros(1).expand(1, 1, 46400, 46400)  # stride 0: no memory behind it
    with pytest.raises(ValueError, match="too large"):
        weighted_pagerank_triton(attn, 3)


def test_bad_shapes():
    with pytest.raises(ValueError, match="attn"):
        weighted_pagerank_triton(torch.rand(1, 4, 4), 3)
    with pytest.raises(ValueError, match="alive"):
        weighted_pagerank_triton(attention(2, 1, 4), 3, torch.ones(1, 4, dtype=torch.bool))
