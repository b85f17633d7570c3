"""The model on the H200: FP8 vs bf16, flash_mla decode vs the reference, grouped GEMM paths."""

import pytest
import torch

from openinfra.model import (KVCacheManager, PagedMLACache, Transformer, contiguous_layout, get_config,
                             grouped_linear_contiguous, grouped_linear_masked, masked_layout)

pytestmark = pytest.mark.gpu


def calc_diff(x, y):
    x, y = x.double(), y.double()
    return float(1 - 2 * (x * y).sum() / (x * x + y * y).sum())


def _dense_pair(**kw):
    """A bf16 model and an FP8 twin with the same weights. All layers dense: MoE routing is a hard
    top-k, so a rounding difference upstream can flip an expert choice and swamp the comparison;
    the MoE layer is compared on its own below, with identical inputs."""
    torch.manual_seed(0)
    cfg = get_config("small", n_dense_layers=4, **kw)
    bf16 = Transformer(cfg).cuda().to(torch.bfloat16)
    fp8 = Transformer(cfg.replace(gemm="fp8")).cuda().to(torch.bfloat16)
    fp8.load_state_dict(bf16.state_dict())
    return cfg, bf16, fp8


def _need_fp8():
    """The FP8 GEMM is in the tree: a failed import fails the test. It is skipped only when the
    backend rule (openinfra.kernels.backend) does not run Triton kernels here, saying why."""
    import openinfra.kernels.deep_gemm as dg
    from openinfra.kernels.backend import describe_backend, use_triton
    from openinfra.model.layers import fp8_gemm_available

    # pytest.fail, not assert: the strict xfail below expects an AssertionError from its own bar only.
    if not hasattr(dg, "fp8_linear"):
        pytest.fail("openinfra.kernels.deep_gemm has no fp8_linear")
    x = torch.empty(1, device="cuda", dtype=torch.bfloat16)
    if not use_triton(x):
        pytest.skip(f"the FP8 GEMM runs only on the Triton backend; here: {describe_backend()}")
    if not fp8_gemm_available(x):
        pytest.fail("Linear(fp8=True) would not run the FP8 GEMM on this Hopper GPU")


def test_fp8_linear_layers_within_calc_diff_of_bf16():
    """Every FP8 projection of the model, on the activations that really flow through it, is within
    calc_diff 1e-3 of the same projection in fp32 (DeepGEMM's bar for one GEMM)."""
    from openinfra.model import Linear

    _need_fp8()
    cfg, bf16, fp8 = _dense_pair()
    tokens = torch.randint(0, cfg.vocab_size, (4, 256), device="cuda")
    diffs = {}

    def hook(name):
        def fn(mod, args, out):
            if mod.in_features % 128 == 0 and mod.out_features % 128 == 0:
                diffs[name] = calc_diff(out, args[0].float() @ mod.weight.float().t())
        return fn

    for name, mod in fp8.named_modules():
        if isinstance(mod, Linear):
            mod.register_forward_hook(hook(name))
    with torch.no_grad():
        fp8(tokens)
    assert len(diffs) >= 4 * 5  # wq_a, wq_b, wkv_b, wo, w1/w2/w3 per layer (wkv_a is 576 wide: bf16)
    worst = max(diffs, key=diffs.get)
    print(f"FP8 projections: worst calc_diff {diffs[worst]:.2e} ({worst}) over {len(diffs)} layers")
    assert diffs[worst] < 1e-3


def test_fp8_model_end_to_end_against_bf16():
    """Whole-model and MoE-layer agreement. Each FP8 GEMM adds its own e4m3 rounding (6.8e-4 calc_diff
    for one Gaussian GEMM, half from each operand), each layer chains ~7 of them and the next layers
    carry the error on, so end to end the figure grows ~7e-4 per layer (measured on the H200: 2.7e-3
    logits, 2.0e-3 MoE layer; docs/model.md "FP8 numerics"); the bound 5e-3 guards against regressions."""
    from openinfra.model import MoE

    _need_fp8()
    cfg, bf16, fp8 = _dense_pair()
    tokens = torch.randint(0, cfg.vocab_size, (4, 256), device="cuda")
    with torch.no_grad():
        d = calc_diff(bf16(tokens), fp8(tokens))
    print(f"fp8 vs bf16 logits calc_diff {d:.2e}")
    assert d < 5e-3
    bf16.loss(tokens, tokens).backward()
    fp8.loss(tokens, tokens).backward()
    dg = calc_diff(bf16.layers[1].ffn.w1.weight.grad, fp8.layers[1].ffn.w1.weight.grad)
    print(f"fp8 vs bf16 weight-gradient calc_diff {dg:.2e}")
    assert dg < 2e-2
    torch.manual_seed(0)
    mcfg = get_config("small")
    a = MoE(mcfg).cuda().to(torch.bfloat16)
    b = MoE(mcfg.replace(gemm="fp8")).cuda().to(torch.bfloat16)
    b.load_state_dict(a.state_dict())
    x = torch.randn(1024, mcfg.dim, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        for layout in ("contiguous", "masked"):
            dm = calc_diff(a(x, layout), b(x, layout))
            print(f"fp8 vs bf16 MoE ({layout}) calc_diff {dm:.2e}")
            assert dm < 5e-3


@pytest.mark.xfail(strict=True, raises=AssertionError, reason="issue 11's bar (FP8 model within calc_diff 1e-3 of bf16) is not met: "
                   "measured 2.7e-3 on the logits on the H200 (2.77e-3 on the CPU reference path); e4m3 rounding "
                   "adds ~7e-4 per layer and rounding the weights alone costs 1.6e-3 (docs/model.md 'FP8 numerics')")
def test_fp8_model_meets_the_issue_bar_against_bf16():
    """The issue's bar itself, kept at 1e-3 (not loosened): it fails today, and strict xfail makes
    the suite notice the day it passes. The CPU tier runs the same comparison through deep_gemm's
    reference (tests/model/test_fp8_numerics.py), with the breakdown of where the error comes from."""
    _need_fp8()
    cfg, bf16, fp8 = _dense_pair()
    tokens = torch.randint(0, cfg.vocab_size, (4, 256), device="cuda")
    with torch.no_grad():
        assert calc_diff(bf16(tokens), fp8(tokens)) < 1e-3


def test_bf16_model_equals_plain_reference_on_gpu():
    from openinfra.model import MoE
    from openinfra.model.reference import _moe, plain_forward

    torch.manual_seed(0)
    cfg = get_config("small", n_dense_layers=4)
    model = Transformer(cfg).cuda().to(torch.bfloat16)
    tokens = torch.randint(0, cfg.vocab_size, (2, 512), device="cuda")
    with torch.no_grad():
        d = calc_diff(model(tokens), plain_forward(model, tokens))
        moe = MoE(get_config("small")).cuda().to(torch.bfloat16)
        x = torch.randn(2048, cfg.dim, device="cuda", dtype=torch.bfloat16)
        dm = calc_diff(moe(x, "contiguous"), _moe(moe, x))
    print(f"model vs plain calc_diff {d:.2e}, MoE grouped vs loop {dm:.2e}")
    assert d < 1e-4 and dm < 1e-5


def test_decode_through_flash_mla_equals_reference_backend():
    import openinfra.kernels.flash_mla  # noqa: F401 - in the tree: a failed import fails the test
    from openinfra.model import paged_latent_attention
    from openinfra.model.attention import flash_mla_usable

    torch.manual_seed(0)
    cache = torch.randn(80, 64, 1, 576, device="cuda", dtype=torch.bfloat16)
    assert flash_mla_usable(cache[:1, :1, :, :].expand(1, 1, 1, 576).reshape(1, 1, 1, 576), cache), \
        "openinfra.kernels.flash_mla does not take a bf16 cache of 64-token pages and 576-wide rows"
    lens = torch.tensor([300, 77, 1000, 5], dtype=torch.int32, device="cuda")
    table = torch.randperm(80, device="cuda", dtype=torch.int32)[:64].view(4, 16)
    q = torch.randn(4, 1, 16, 576, device="cuda", dtype=torch.bfloat16)
    a, used = paged_latent_attention(q, cache, table, lens, 512, 576 ** -0.5, backend="flash_mla")
    b, _ = paged_latent_attention(q, cache, table, lens, 512, 576 ** -0.5, backend="reference")
    d = calc_diff(a, b)
    print(f"flash_mla vs reference decode calc_diff {d:.2e}")
    assert used == "flash_mla" and d < 1e-5
    # and through the model: a dense-only model decodes the same with either backend
    torch.manual_seed(0)
    cfg = get_config("small", n_dense_layers=4)
    model = Transformer(cfg).cuda().to(torch.bfloat16)
    kv = PagedMLACache(cfg, num_blocks=64, page_size=64, dtype=torch.bfloat16, device="cuda")
    mgr = KVCacheManager(kv)
    with torch.no_grad():
        for i, n in enumerate([300, 77, 1000, 5]):
            p = torch.randint(0, cfg.vocab_size, (1, n), device="cuda")
            mgr.add(i)
            mgr.reserve(i, n + 1)
            model(p, cache=mgr.batch([i]), mode="prefill")
            mgr.advance([i], n)
        nxt = torch.randint(0, cfg.vocab_size, (4, 1), device="cuda")
        outs = {}
        for backend in ("flash_mla", "reference"):
            for blk in model.layers:
                blk.attn.decode_backend = backend
            outs[backend] = model(nxt, cache=mgr.batch([0, 1, 2, 3]), mode="decode")
            assert model.layers[0].attn.last_decode_backend == backend
    dm = calc_diff(outs["flash_mla"], outs["reference"])
    print(f"model decode flash_mla vs reference calc_diff {dm:.2e}")
    assert dm < 1e-4


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
