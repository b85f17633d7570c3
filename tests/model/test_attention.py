"""MLA: absorbed decode over the paged latent cache equals the unabsorbed (training-path) attention."""

import math

import pytest
import torch

from openinfra.model import (KVCacheManager, PagedMLACache, Transformer, get_config, paged_latent_attention,
                             rope_frequencies)
from openinfra.model.attention import MLA, flash_mla_usable
from openinfra.model.kv_cache import CacheBatch

pytestmark = pytest.mark.unit


def _cfg(**kw):
    base = dict(dim=48, n_heads=3, q_lora_rank=24, kv_lora_rank=20, qk_nope_head_dim=12, qk_rope_head_dim=6,
                v_head_dim=10, max_seq_len=64)
    base.update(kw)
    return get_config("tiny", **base)


def _rope(cfg, positions):
    angles = positions.float()[..., None] * rope_frequencies(cfg)
    return angles.cos(), angles.sin()


@pytest.mark.parametrize("q_lora_rank", [24, 0])
def test_absorbed_decode_equals_unabsorbed_attention(q_lora_rank):
    torch.manual_seed(0)
    cfg = _cfg(q_lora_rank=q_lora_rank)
    attn = MLA(cfg).double()
    for p in attn.parameters():  # random weights everywhere, norms included
        torch.nn.init.normal_(p, std=0.3)
    b, s = 2, 11
    x = torch.randn(b, s, cfg.dim, dtype=torch.float64)
    cos, sin = _rope(cfg, torch.arange(s)[None])
    full = attn(x, cos, sin)  # training path: per-head K/V, causal SDPA
    # Decode token by token over a paged cache with 4-token pages in scrambled physical order.
    cache = PagedMLACache(cfg, num_blocks=9, page_size=4, dtype=torch.float64)
    table = torch.tensor([[7, 2, 5], [0, 8, 3]], dtype=torch.int32)
    outs = []
    for t in range(s):
        batch = CacheBatch(cache, table, torch.full((b,), t, dtype=torch.int32))
        c, sn = _rope(cfg, torch.full((b, 1), t))
        outs.append(attn(x[:, t:t + 1], c, sn, batch, layer=0, mode="decode"))
    assert attn.last_decode_backend == "reference"  # float64 never goes to the kernel
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-10, atol=1e-10)


def test_prefill_then_decode_matches_training_forward():
    torch.manual_seed(1)
    cfg = _cfg(n_layers=2, n_dense_layers=1)
    model = Transformer(cfg).double()
    tokens = torch.randint(0, cfg.vocab_size, (2, 13))
    full = model(tokens)
    cache = PagedMLACache(cfg, num_blocks=12, page_size=4, dtype=torch.float64)
    mgr = KVCacheManager(cache)
    for i in (0, 1):
        mgr.add(i)
        mgr.reserve(i, 13)
    pieces = [model(tokens[:, :7], cache=mgr.batch([0, 1]), mode="prefill")]
    mgr.advance([0, 1], 7)
    pieces.append(model(tokens[:, 7:10], cache=mgr.batch([0, 1]), mode="prefill"))  # prefix reuse: prefill on top of a cache
    mgr.advance([0, 1], 3)
    pieces.append(model(tokens[:, 10:11], cache=mgr.batch([0, 1])))  # auto -> decode (absorbed)
    mgr.advance([0, 1], 1)
    pieces.append(model(tokens[:, 11:13], cache=mgr.batch([0, 1])))  # two tokens at once (MTP-style), causal
    mgr.advance([0, 1], 2)
    assert model.layers[0].attn.last_decode_backend == "reference"
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-9, atol=1e-9)


def test_variable_length_requests_in_one_decode_batch():
    torch.manual_seed(2)
    cfg = _cfg()
    model = Transformer(cfg).double()
    a, b = torch.randint(0, cfg.vocab_size, (1, 9)), torch.randint(0, cfg.vocab_size, (1, 5))
    ref_a, ref_b = model(a)[:, -1], model(b)[:, -1]
    cache = PagedMLACache(cfg, num_blocks=8, page_size=4, dtype=torch.float64)
    cache.storage.fill_(float("nan"))  # nothing unwritten may leak into a result
    mgr = KVCacheManager(cache)
    for sid, toks in (("a", a), ("b", b)):
        mgr.add(sid)
        mgr.reserve(sid, toks.shape[1])
        model(toks[:, :-1], cache=mgr.batch([sid]), mode="prefill")
        mgr.advance([sid], toks.shape[1] - 1)
    last = torch.cat([a[:, -1:], b[:, -1:]])
    out = model(last, cache=mgr.batch(["a", "b"]), mode="decode")
    torch.testing.assert_close(out[:, 0], torch.cat([ref_a, ref_b]), rtol=1e-9, atol=1e-9)


def test_paged_reference_attention_against_dense_formula():
    torch.manual_seed(3)
    b, s, h, c, r, page = 3, 2, 4, 16, 8, 4
    lens = torch.tensor([5, 11, 2], dtype=torch.int32)
    dense = [torch.randn(int(n), c + r, dtype=torch.float64) for n in lens]
    k_cache = torch.full((10, page, 1, c + r), float("nan"), dtype=torch.float64)
    perm = torch.randperm(10)
    table = torch.full((b, 3), 2147480000, dtype=torch.int32)  # garbage in unused slots
    used = 0
    for i, rows in enumerate(dense):
        for p in range(math.ceil(len(rows) / page)):
            table[i, p] = int(perm[used])
            chunk = rows[p * page:(p + 1) * page]
            k_cache[perm[used], : len(chunk), 0] = chunk
            used += 1
    q = torch.randn(b, s, h, c + r, dtype=torch.float64)
    scale = 0.3
    out, used_backend = paged_latent_attention(q, k_cache, table.clamp(max=9), lens, c, scale, backend="reference")
    assert used_backend == "reference"
    for i, rows in enumerate(dense):
        n = len(rows)
        for j in range(s):
            visible = rows[: n - s + j + 1]
            p = torch.softmax(q[i, j] @ visible.T * scale, dim=-1)
            torch.testing.assert_close(out[i, j], p @ visible[:, :c], rtol=1e-12, atol=1e-12)


def test_decode_backend_errors_and_selection():
    q = torch.zeros(1, 1, 2, 576)
    cache = torch.zeros(4, 64, 1, 576)
    assert not flash_mla_usable(q, cache)  # fp32 is never sent to the kernel
    with pytest.raises(ValueError, match="backend"):
        paged_latent_attention(q, cache, torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, dtype=torch.int32), 512, 1.0, backend="fast")


def test_yarn_frequencies_and_softmax_scale():
    cfg = get_config("v3")
    assert cfg.yarn and cfg.latent_dim == 576
    base = 1.0 / (cfg.rope_theta ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64))
    f = rope_frequencies(cfg).double()
    # Fast dims (many turns over the original 4k context) unchanged, slow dims divided by the factor.
    torch.testing.assert_close(f[:5], base[:5], rtol=1e-6, atol=0)
    torch.testing.assert_close(f[-5:], base[-5:] / cfg.rope_factor, rtol=1e-6, atol=0)
    assert torch.all(f <= base * (1 + 1e-6)) and torch.all(f >= base / cfg.rope_factor * (1 - 1e-6))
    m = 0.1 * math.log(40) + 1
    assert cfg.softmax_scale == pytest.approx(192 ** -0.5 * m * m)
    plain = get_config("tiny")
    assert not plain.yarn and plain.softmax_scale == pytest.approx(plain.qk_head_dim ** -0.5)
    torch.testing.assert_close(rope_frequencies(plain).double(),
                               1.0 / (plain.rope_theta ** (torch.arange(0, 8, 2, dtype=torch.float64) / 8)), rtol=1e-6, atol=0)


def test_rope_is_a_rotation_and_relative():
    cfg = _cfg()
    from openinfra.model.rope import apply_rope
    x = torch.randn(1, 5, 2, cfg.qk_rope_head_dim, dtype=torch.float64)
    y = torch.randn(1, 5, 2, cfg.qk_rope_head_dim, dtype=torch.float64)
    c, s = _rope(cfg, torch.arange(5)[None])
    rx, ry = apply_rope(x, c.double(), s.double()), apply_rope(y, c.double(), s.double())
    torch.testing.assert_close(rx.norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(ry.norm(dim=-1), y.norm(dim=-1))
    # <R(p) x, R(p + 1) y> depends on the offset only: the same for every p when x and y are the
    # same vectors at every position
    x1, y1 = x[:, :1].expand(-1, 5, -1, -1), y[:, :1].expand(-1, 5, -1, -1)
    rx1, ry1 = apply_rope(x1, c.double(), s.double()), apply_rope(y1, c.double(), s.double())
    dots = (rx1[:, :-1] * ry1[:, 1:]).sum(-1)
    torch.testing.assert_close(dots, dots[:, :1].expand_as(dots))
    # and it is not the offset-0 product: the rotation is there
    assert not torch.allclose(dots, (x1 * y1).sum(-1)[:, :-1])


def test_cache_errors():
    cfg = _cfg()
    model = Transformer(cfg)
    cache = PagedMLACache(cfg, num_blocks=2, page_size=4)
    with pytest.raises(ValueError, match="block_table"):
        model(torch.zeros(1, 9, dtype=torch.long), cache=CacheBatch(cache, torch.zeros(1, 2, dtype=torch.int32), torch.zeros(1, dtype=torch.int32)))
    with pytest.raises(ValueError, match="cache_seqlens"):
        CacheBatch(cache, torch.zeros(2, 2, dtype=torch.int32), torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="token ids"):
        model(torch.full((1, 3), cfg.vocab_size))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, cfg.max_seq_len + 1, dtype=torch.long))


def test_fp8_latent_cache_decode_close_to_bf16_cache():
    import openinfra.kernels.flash_mla  # noqa: F401 - the FP8 cache layout; in the tree, so a failed import fails
    torch.manual_seed(4)
    cfg = get_config("tiny", n_layers=1, n_dense_layers=1, dim=64, n_heads=2, kv_lora_rank=512, qk_rope_head_dim=64,
                     qk_nope_head_dim=16, v_head_dim=16, q_lora_rank=0)
    model = Transformer(cfg).to(torch.bfloat16)
    tokens = torch.randint(0, cfg.vocab_size, (2, 70))
    outs = {}
    for fp8 in (False, True):
        cache = PagedMLACache(cfg, num_blocks=6, page_size=64, dtype=torch.bfloat16, fp8=fp8)
        mgr = KVCacheManager(cache)
        for i in (0, 1):
            mgr.add(i)
            mgr.reserve(i, 70)
        model(tokens[:, :69], cache=mgr.batch([0, 1]), mode="prefill")
        mgr.advance([0, 1], 69)
        batch = mgr.batch([0, 1])
        for backend in ("reference", "flash_mla"):
            model.layers[0].attn.decode_backend = backend
            outs[fp8, backend] = model(tokens[:, 69:], cache=batch, mode="decode").detach().float()
        if fp8:
            assert cache.storage.dtype == torch.float8_e4m3fn and cache.storage.shape[-1] == 656
            assert cache.bytes() == 1 * 6 * 64 * 656
            assert cache.gather(0, batch.block_table, 69).dtype == torch.bfloat16

    def calc_diff(x, y):
        x, y = x.double(), y.double()
        return float(1 - 2 * (x * y).sum() / (x * x + y * y).sum())

    assert calc_diff(outs[True, "reference"], outs[True, "flash_mla"]) < 1e-5   # same FP8 rows, two readers
    assert calc_diff(outs[True, "reference"], outs[False, "reference"]) < 1e-3  # e4m3 latent vs bf16 latent
    with pytest.raises(ValueError, match="kv_lora_rank 512"):
        PagedMLACache(get_config("tiny"), num_blocks=2, fp8=True)


def test_ragged_prefill_equals_separate_requests():
    torch.manual_seed(5)
    cfg = _cfg(n_layers=2, n_dense_layers=1)
    model = Transformer(cfg).double()
    a, b = torch.randint(0, cfg.vocab_size, (1, 6)), torch.randint(0, cfg.vocab_size, (1, 10))
    ref_a, ref_b = model(a), model(b)
    cache = PagedMLACache(cfg, num_blocks=8, page_size=4, dtype=torch.float64)
    cache.storage.fill_(float("nan"))
    mgr = KVCacheManager(cache)
    for sid, n in (("a", 6), ("b", 10)):
        mgr.add(sid)
        mgr.reserve(sid, n)
    padded = torch.zeros(2, 9, dtype=torch.long)  # one call: a's 5 prompt tokens and b's 9, right-padded
    padded[0, :5], padded[1, :9] = a[0, :5], b[0, :9]
    model.reset_expert_load()
    out = model(padded, cache=mgr.batch(["a", "b"], new_lengths=[5, 9]), mode="prefill")
    assert int(model.expert_load().sum()) == (5 + 9) * cfg.n_activated_experts  # padding is not routed
    torch.testing.assert_close(out[0, :5], ref_a[0, :5], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(out[1, :9], ref_b[0, :9], rtol=1e-9, atol=1e-9)
    mgr.advance(["a", "b"], [5, 9])
    step = model(torch.cat([a[:, 5:], b[:, 9:]]), cache=mgr.batch(["a", "b"]), mode="decode")
    torch.testing.assert_close(step[:, 0], torch.cat([ref_a[:, 5], ref_b[:, 9]]), rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="new_lengths must give"):
        model(padded, cache=mgr.batch(["a", "b"], new_lengths=[0, 9]), mode="prefill")
    with pytest.raises(ValueError, match="prefill mode only"):
        model(padded[:, :1], cache=mgr.batch(["a", "b"], new_lengths=[1, 1]), mode="decode")
