"""GLM's CPU decode attention kernel (pipeline/engines/vllm/cpu_decode.py) against a float64
reference and against vLLM's own CPU kernel, on caches written by vLLM's `reshape_and_cache`."""

from __future__ import annotations

import pytest
import torch

from pipeline.engines.vllm import cpu_decode

pytest.importorskip("vllm")
from vllm import _custom_ops as ops  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16]
# key counts around block edges, one key, and a long one
LENGTHS = [1, 31, 32, 33, 64, 200, 257]


def needs_kernel(dtype: torch.dtype) -> None:
    if not cpu_decode.cpu_supports(dtype):
        pytest.skip(f"this CPU lacks the kernel's instructions for {dtype}")
    assert cpu_decode.kernel(dtype) is not None, "supported CPU but the kernel did not build"


def paged_cache(lengths: list[int], heads: int, head_dim: int, block_size: int,
                dtype: torch.dtype, seed: int = 0):
    """A cache as vLLM holds it, in its "vec" layout, with random keys (already scaled) and
    values of each request in shuffled blocks, unused slots NaN; the block table, lengths
    and the keys and values themselves."""
    generator = torch.Generator().manual_seed(seed)
    blocks_each = [-(-n // block_size) for n in lengths]
    total = sum(blocks_each) + 3
    cache = torch.full((total, heads, block_size, 2 * head_dim), float("nan"), dtype=dtype)
    key_cache, value_cache = cache.view(total, heads, 2 * block_size, head_dim).chunk(2, dim=2)
    order = torch.randperm(total, generator=generator)
    table = torch.zeros(len(lengths), max(blocks_each), dtype=torch.int32)
    keys, values, used = [], [], 0
    for r, (n, count) in enumerate(zip(lengths, blocks_each, strict=True)):
        table[r, :count] = order[used:used + count]
        used += count
        k = (torch.randn(n, heads, head_dim, generator=generator) / head_dim ** 0.5).to(dtype)
        v = torch.randn(n, heads, head_dim, generator=generator).to(dtype)
        slots = (table[r, :count].long()[:, None] * block_size
                 + torch.arange(block_size)).flatten()[:n]
        ops.cpu_attn_reshape_and_cache(k, v, key_cache, value_cache, slots, cpu_decode.KV_LAYOUT)
        keys.append(k)
        values.append(v)
    return cache, table, torch.tensor(lengths, dtype=torch.int32), keys, values


def strided_queries(requests: int, heads: int, head_dim: int, dtype: torch.dtype
                    ) -> torch.Tensor:
    """Queries as the model hands them over: the Q third of a fused QKV row."""
    qkv = torch.randn(requests, 3 * heads * head_dim, generator=torch.Generator().manual_seed(1))
    return qkv.to(dtype)[:, :heads * head_dim].view(requests, heads, head_dim)


def reference(query: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor]
              ) -> torch.Tensor:
    rows = []
    for q, k, v in zip(query.double(), keys, values, strict=True):
        scores = torch.einsum("hd,nhd->hn", q, k.double())
        rows.append(torch.einsum("hn,nhd->hd", scores.softmax(-1), v.double()))
    return torch.stack(rows)


def run_ours(query, cache, table, lengths) -> torch.Tensor:
    out = torch.empty(query.shape, dtype=query.dtype)
    cpu_decode.decode_attention(query, cache, table, lengths, out)
    return out


def run_vllm(query, cache, table, lengths) -> torch.Tensor:
    requests, heads, head_dim = query.shape
    out = torch.empty(query.shape, dtype=query.dtype)
    starts = torch.arange(requests + 1, dtype=torch.int32)
    schedule = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=requests, num_heads=heads, num_kv_heads=heads, head_dim=head_dim,
        seq_lens=lengths, dtype=query.dtype, query_start_loc=starts, causal=True,
        sliding_window_size=-1, isa=cpu_decode.KV_LAYOUT, enable_kv_split=True)
    blocks, heads, block_size, _ = cache.shape
    key_cache, value_cache = cache.view(blocks, heads, 2 * block_size, -1).chunk(2, dim=2)
    ops.cpu_attention_with_kv_cache(
        query=query, key_cache=key_cache, value_cache=value_cache, output=out,
        query_start_loc=starts, seq_lens=lengths, scale=1.0, causal=True, alibi_slopes=None,
        sliding_window=-1, block_table=table, softcap=0.0, scheduler_metadata=schedule,
        s_aux=None)
    return out


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    """float32: summation order; bfloat16: the output's rounding (half an ulp, 2^-9 of the
    value, and float32 sums of bfloat16 products before it)."""
    return {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2 ** -8,
                                                                         "atol": 1e-3}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("heads", "head_dim", "block_size"),
                         [(12, 64, 32), (4, 32, 128), (2, 128, 64), (20, 64, 32)])
def test_matches_reference_and_vllm(dtype, heads, head_dim, block_size) -> None:
    needs_kernel(dtype)
    cache, table, lengths, keys, values = paged_cache(LENGTHS, heads, head_dim, block_size,
                                                      dtype)
    query = strided_queries(len(LENGTHS), heads, head_dim, dtype)
    ours = run_ours(query, cache, table, lengths)
    assert torch.isfinite(ours.float()).all(), "a NaN in an unused slot leaked into the output"
    expected = reference(query, keys, values)
    torch.testing.assert_close(ours.double(), expected, **tolerance(dtype))
    # vLLM's kernel multiplies unused slots by zero, so it needs them finite (old keys are)
    junk = cache.nan_to_num(nan=1e4)
    torch.testing.assert_close(ours.float(), run_vllm(query, junk, table, lengths).float(),
                               **tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_many_heads_and_one_request(dtype) -> None:
    """glm-10b's 64 heads: more than one work item holds, whether the requests are one (its
    heads shared out over the threads) or many."""
    needs_kernel(dtype)
    for lengths in ([77], [77, 1, 33, 200, 5, 64, 31, 32, 100]):
        cache, table, lengths, keys, values = paged_cache(lengths, 64, 64, 32, dtype, seed=2)
        query = strided_queries(len(lengths), 64, 64, dtype)
        torch.testing.assert_close(run_ours(query, cache, table, lengths).double(),
                                   reference(query, keys, values), **tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("rows", "in_features", "out_features"),
                         [(1, 768, 2304), (5, 64, 48), (16, 3072, 768), (16, 128, 16),
                          (40, 768, 2304), (64, 3072, 768)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_decode_linear_matches_f_linear(dtype, rows, in_features, out_features,
                                        with_bias) -> None:
    """Against float64 sums of the same inputs: float32 up to summation order, bfloat16 up
    to the output's rounding; rows taken from a wider tensor as vLLM hands them over; 40 and
    64 rows: passes of 16 rows over each panel, the last one partly zeros (40)."""
    needs_kernel(dtype)
    generator = torch.Generator().manual_seed(rows)
    weight = (torch.randn(out_features, in_features, generator=generator)
              / in_features ** 0.5).to(dtype)
    bias = torch.randn(out_features, generator=generator).to(dtype) if with_bias else None
    x = torch.randn(rows, in_features + 8, generator=generator).to(dtype)[:, :in_features]
    out = cpu_decode.decode_linear(x, cpu_decode.pack_linear(weight), bias)
    assert out.dtype == dtype
    expected = torch.nn.functional.linear(x.double(), weight.double(),
                                          None if bias is None else bias.double())
    close = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else tolerance(dtype)
    torch.testing.assert_close(out.double(), expected, **close)


def test_decode_linear_refuses_what_it_cannot_do() -> None:
    needs_kernel(torch.float32)
    packed = cpu_decode.pack_linear(torch.zeros(32, 64))
    with pytest.raises(ValueError, match="up to 64"):
        cpu_decode.decode_linear(torch.zeros(65, 64), packed, None)
    with pytest.raises(ValueError, match="dtype"):
        cpu_decode.decode_linear(torch.zeros(4, 64, dtype=torch.bfloat16), packed, None)
    assert not cpu_decode.linear_packable(torch.zeros(40, 64))  # 40 outputs: not 16 | 40
    assert not cpu_decode.linear_packable(torch.zeros(32, 64, dtype=torch.float16))


def test_wrong_block_is_caught() -> None:
    """Negative control: reading one request's blocks through another's table is far off."""
    needs_kernel(torch.float32)
    cache, table, lengths, keys, values = paged_cache([40, 40], 4, 64, 32, torch.float32)
    query = strided_queries(2, 4, 64, torch.float32)
    swapped = run_ours(query, cache, table.flip(0).contiguous(), lengths)
    assert (swapped.double() - reference(query, keys, values)).abs().max() > 1e-2


def test_kernel_shares_torchs_openmp(tmp_path) -> None:
    """Loading the kernel maps no OpenMP runtime of its own: its libgomp is torch's (the same
    soname, already loaded), one thread pool rather than a second set of threads spinning on
    the same cores."""
    import ctypes

    def runtimes() -> set[str]:
        with open("/proc/self/maps") as maps:
            return {line.split()[-1] for line in maps if "libgomp" in line}

    needs_kernel(torch.float32)
    before = runtimes()
    assert any("torch" in path for path in before)
    ctypes.CDLL(str(cpu_decode.build(torch.float32, tmp_path)))  # a fresh copy, loaded now
    assert runtimes() == before


def test_build_is_cached_and_errors_name_the_compiler(tmp_path, monkeypatch) -> None:
    library = cpu_decode.build(torch.float32, tmp_path)
    built_at = library.stat().st_mtime_ns
    assert cpu_decode.build(torch.float32, tmp_path) == library
    assert library.stat().st_mtime_ns == built_at
    assert [p.name for p in tmp_path.iterdir()] == [library.name]  # no scratch left behind
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with pytest.raises(RuntimeError, match="no-such-cc"):
        cpu_decode.build(torch.bfloat16, tmp_path / "other")


def test_opt_out_and_a_failed_build_fall_back(monkeypatch, tmp_path) -> None:
    query = torch.zeros(1, 4, 64)
    cache = torch.zeros(2, 4, 32, 128)
    cpu_decode.kernel.cache_clear()
    try:
        monkeypatch.setenv(cpu_decode.OPT_OUT, "0")
        assert cpu_decode.kernel(torch.float32) is None
        assert not cpu_decode.usable(query, cache, cpu_decode.KV_LAYOUT)
        cpu_decode.kernel.cache_clear()
        monkeypatch.delenv(cpu_decode.OPT_OUT)
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
        monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
        assert cpu_decode.kernel(torch.float32) is None
    finally:
        cpu_decode.kernel.cache_clear()
    assert not cpu_decode.usable(query, cache, "amx")  # another layout: vLLM's kernel


def block_parameters(hidden: int, dtype: torch.dtype, seed: int = 3):
    """A GLM block's LayerNorms and (weight, bias) of QKV, dense, h -> 4h and 4h -> h."""
    generator = torch.Generator().manual_seed(seed)
    norms = []
    for _ in range(2):
        norm = torch.nn.LayerNorm(hidden, eps=1e-5)
        with torch.no_grad():
            norm.weight.copy_(1 + 0.1 * torch.randn(hidden, generator=generator))
            norm.bias.copy_(0.1 * torch.randn(hidden, generator=generator))
        norms.append(norm.to(dtype))
    linears = [((torch.randn(n, k, generator=generator) / k ** 0.5).to(dtype),
                (0.1 * torch.randn(n, generator=generator)).to(dtype))
               for n, k in ((3 * hidden, hidden), (hidden, hidden), (4 * hidden, hidden),
                            (hidden, 4 * hidden))]
    return norms, linears


def block_by_ops(x, norms, linears, cache, table, lengths, slots, heads):
    """GLMBlock.forward on a decode step as the model runs it op by op on these kernels:
    vLLM's `reshape_and_cache` stores K and V."""
    hidden = x.shape[1]
    (qkv_w, qkv_b), (dense_w, dense_b), (up_w, up_b), (down_w, down_b) = (
        (cpu_decode.pack_linear(w), b) for w, b in linears)
    q, k, v = cpu_decode.decode_linear(norms[0](x), qkv_w, qkv_b).split(hidden, dim=-1)
    blocks = cache.shape[0]
    key_cache, value_cache = cache.view(blocks, heads, -1, hidden // heads).chunk(2, dim=2)
    heads_of = (x.shape[0], heads, hidden // heads)
    ops.cpu_attn_reshape_and_cache(k.reshape(heads_of), v.reshape(heads_of), key_cache,
                                   value_cache, slots, cpu_decode.KV_LAYOUT)
    attended = run_ours(q.reshape(heads_of), cache, table, lengths).view(x.shape)
    x = x + cpu_decode.decode_linear(attended, dense_w, dense_b)
    wide = torch.nn.functional.gelu(cpu_decode.decode_linear(norms[1](x), up_w, up_b))
    return x + cpu_decode.decode_linear(wide, down_w, down_b)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("heads", "block_size", "lengths"),
                         [(2, 32, LENGTHS), (12, 64, [200] * 16), (4, 128, [1]),
                          (2, 32, [1, 30, 64, 100, 200] * 8)])
def test_decode_block_matches_the_ops(dtype, heads, block_size, lengths) -> None:
    """One call does what the model's ops do on a decode step: the same cache (each request's
    new K and V in its last slot, vLLM's layout: every other slot, the unused ones' NaN
    included, untouched) and the same hidden rows, up to float32 rounding (LayerNorm's sums,
    GELU's exp) or bfloat16's (a rounding flipped on the way)."""
    needs_kernel(dtype)
    head_dim = 64
    hidden = heads * head_dim
    cache, table, seq_lens, _, _ = paged_cache(lengths, heads, head_dim, block_size, dtype)
    last = seq_lens.long() - 1
    slots = table.long().gather(1, (last // block_size)[:, None])[:, 0] * block_size \
        + last % block_size
    norms, linears = block_parameters(hidden, dtype)
    x = torch.randn(len(lengths), hidden, generator=torch.Generator().manual_seed(4)).to(dtype)
    expected_cache = cache.clone()
    expected = block_by_ops(x, norms, linears, expected_cache, table, seq_lens, slots, heads)
    block = cpu_decode.DecodeBlock(tuple(norms), [(cpu_decode.pack_linear(w), b)
                                                  for w, b in linears], heads, head_dim)
    before = cache.clone()
    ours = block(x.clone(), cache, table, seq_lens, slots)
    close = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2 ** -7,
                                                                         "atol": 2e-2}
    torch.testing.assert_close(cache, expected_cache, equal_nan=True, **close)
    written = (cache != before) & ~before.isnan()  # NaN != NaN: a written unused slot counts
    assert int((written | (cache.isnan() != before.isnan())).sum()) <= 2 * hidden * len(lengths)
    torch.testing.assert_close(ours.float(), expected.float(), **close)
    if dtype == torch.bfloat16:  # flips are rare: nearly every element has the same bits
        assert (ours != expected).float().mean() < 0.02


def test_decode_block_gelu_and_norm_are_torchs() -> None:
    """The block's LayerNorm and GELU against torch's: a block whose attention adds zeros and
    whose MLP is the identity around the GELU, so that the output is x + GELU(LN(x)), on
    rows of different means and spreads and a LayerNorm that spreads GELU's input over
    [-6, 6] (erf's approximation is exercised where it bends and where it saturates)."""
    needs_kernel(torch.float32)
    hidden, heads, rows = 128, 2, 16
    norms, _ = block_parameters(hidden, torch.float32)
    with torch.no_grad():
        norms[1].weight.fill_(3.5)
    identity, zeros = torch.eye(hidden), torch.zeros(3 * hidden, hidden)
    linears = [(zeros, torch.zeros(3 * hidden)),
               (torch.zeros(hidden, hidden), torch.zeros(hidden)),
               (torch.cat([identity, zeros]), torch.zeros(4 * hidden)),
               (torch.cat([identity, zeros.T], 1), torch.zeros(hidden))]
    scale = 1 + 0.1 * torch.arange(rows)[:, None]
    x = torch.linspace(-6, 6, hidden) * scale + 0.5 * torch.arange(rows)[:, None]
    cache, table, seq_lens, _, _ = paged_cache([5] * rows, heads, 64, 32, torch.float32)
    slots = table[:, 0].long() * 32 + 4
    block = cpu_decode.DecodeBlock(tuple(norms), [(cpu_decode.pack_linear(w), b)
                                                  for w, b in linears], heads, 64)
    ours = block(x.clone(), cache, table, seq_lens, slots)
    expected = x + torch.nn.functional.gelu(norms[1](x))
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6)


def test_decode_block_refuses_what_it_cannot_do() -> None:
    needs_kernel(torch.float32)
    norms, linears = block_parameters(128, torch.float32)
    block = cpu_decode.DecodeBlock(tuple(norms), [(cpu_decode.pack_linear(w), b)
                                                  for w, b in linears], 2, 64)
    cache, table, seq_lens, _, _ = paged_cache([5, 5], 2, 64, 32, torch.float32)
    slots = torch.tensor([4, 36])
    with pytest.raises(ValueError, match="up to 64"):
        block(torch.zeros(65, 128), cache, table, seq_lens, slots)
    with pytest.raises(ValueError, match="int64"):
        block(torch.zeros(2, 128), cache, table, seq_lens, slots.int())
    with pytest.raises(ValueError, match="int32"):
        block(torch.zeros(2, 128), cache, table.long(), seq_lens, slots)
    with pytest.raises(ValueError, match="KV cache"):
        block(torch.zeros(2, 128), cache.to(torch.bfloat16), table, seq_lens, slots)
    assert not cpu_decode.DecodeBlock.fits(128, 1, 64)  # a tensor-parallel rank's heads
    assert cpu_decode.DecodeBlock.fits(128, 2, 64)
