"""The model on the H200: FP8 vs bf16, flash_mla decode vs the reference, grouped GEMM paths."""

import pytest
import torch

from openinfra.model import (KVCacheManager, PagedMLACache, Transformer, contiguous_layout, get_config,
                             grouped_linear_contiguous, grouped_linear_masked, masked_layout)

pytestmark = pytest.mark.gpu


def calc_diff(x, y):
    x, y = x.double(), y.double()
    return float(1 - 2 * (x * y).sum() / (x * x + y * y).sum())


def _pair(cfg_name="small", **kw):
    torch.manual_seed(0)
    cfg = get_config(cfg_name, **kw)
    bf16 = Transformer(cfg).cuda().to(torch.bfloat16)
    fp8 = Transformer(cfg.replace(gemm="fp8")).cuda().to(torch.bfloat16)
    fp8.load_state_dict(bf16.state_dict())
    return cfg, bf16, fp8


def test_fp8_model_within_calc_diff_of_bf16():
    from openinfra.model.layers import fp8_gemm_available

    cfg, bf16, fp8 = _pair()
    tokens = torch.randint(0, cfg.vocab_size, (4, 256), device="cuda")
    if not fp8_gemm_available(torch.empty(1, device="cuda", dtype=torch.bfloat16)):
        pytest.skip("openinfra.kernels.deep_gemm.fp8_linear is not available in this tree")
    with torch.no_grad():
        a, b = bf16(tokens), fp8(tokens)
    d = calc_diff(a, b)
    print(f"fp8 vs bf16 logits calc_diff {d:.2e}")
    assert d < 1e-3
    # and it trains: FP8 forward + backward give gradients close to bf16's
    bf16.loss(tokens, tokens).backward()
    fp8.loss(tokens, tokens).backward()
    g_a = bf16.layers[1].ffn.experts.w1.grad
    g_b = fp8.layers[1].ffn.experts.w1.grad
    assert calc_diff(g_a, g_b) < 1e-2


def test_bf16_model_equals_plain_reference_on_gpu():
    from openinfra.model.reference import plain_forward

    torch.manual_seed(0)
    cfg = get_config("small")
    model = Transformer(cfg).cuda().to(torch.bfloat16)
    tokens = torch.randint(0, cfg.vocab_size, (2, 512), device="cuda")
    with torch.no_grad():
        d = calc_diff(model(tokens), plain_forward(model, tokens))
    assert d < 1e-4, d


def test_decode_through_flash_mla_equals_reference_backend():
    from openinfra.model.attention import flash_mla_usable

    torch.manual_seed(0)
    cfg = get_config("small")
    model = Transformer(cfg).cuda().to(torch.bfloat16)
    cache = PagedMLACache(cfg, num_blocks=64, page_size=64, dtype=torch.bfloat16, device="cuda")
    if not flash_mla_usable(torch.empty(1, 1, 1, 576, device="cuda", dtype=torch.bfloat16), cache.k_cache(0)):
        pytest.skip("openinfra.kernels.flash_mla is not available in this tree")
    mgr = KVCacheManager(cache)
    lens = [300, 77, 1000, 5]
    prompts = [torch.randint(0, cfg.vocab_size, (1, n), device="cuda") for n in lens]
    with torch.no_grad():
        for i, p in enumerate(prompts):
            mgr.add(i)
            mgr.reserve(i, p.shape[1] + 1)
            model(p, cache=mgr.batch([i]), mode="prefill")
            mgr.advance([i], p.shape[1])
        nxt = torch.randint(0, cfg.vocab_size, (4, 1), device="cuda")
        batch = mgr.batch([0, 1, 2, 3])
        outs = {}
        for backend in ("flash_mla", "reference"):
            for blk in model.layers:
                blk.attn.decode_backend = backend
            saved = cache.storage.clone()
            outs[backend] = model(nxt, cache=batch, mode="decode")
            assert model.layers[0].attn.last_decode_backend == backend
            cache.storage.copy_(saved)
    d = calc_diff(outs["flash_mla"], outs["reference"])
    assert d < 1e-5, d


@pytest.mark.parametrize("fp8", [False, True])
def test_grouped_layouts_on_gpu(fp8):
    torch.manual_seed(0)
    e, k, n, t, topk = 8, 512, 256, 300, 2
    x = torch.randn(t, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(e, n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5
    idx = torch.stack([torch.randperm(e, device="cuda")[:topk] for _ in range(t)])
    ref = torch.einsum("tk,tjnk->tjn", x.float(), w.float()[idx])  # [t, topk, n]
    lay = contiguous_layout(idx, e, alignment=128 if fp8 else 16)
    rows = x[lay.row_token.clamp(min=0)] * (lay.row_token >= 0)[:, None].to(x.dtype)
    out = grouped_linear_contiguous(rows, w, lay, fp8=fp8)
    valid = lay.row_token >= 0
    got = out[valid].float()
    want = ref[lay.row_token[valid], lay.row_slot[valid]]
    assert calc_diff(got, want) < (1e-3 if fp8 else 1e-5)
    m = masked_layout(idx, e)
    groups = x[m.token_index.clamp(min=0)] * (m.token_index >= 0)[..., None].to(x.dtype)
    outm = grouped_linear_masked(groups, w, m.masked_m, fp8=fp8)
    vm = m.token_index >= 0
    assert calc_diff(outm[vm].float(), ref[m.token_index[vm], m.slot[vm]]) < (1e-3 if fp8 else 1e-5)
