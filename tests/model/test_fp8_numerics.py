"""The model's FP8 linear layers on CPU, through deep_gemm's PyTorch reference: the gpu tier's
FP8-vs-bf16 comparison (``test_gpu.py``) at a CI-sized token count.

On CPU ``Linear`` keeps to its parameter dtype (``fp8_gemm_available`` wants a Hopper GPU); the
fixture below lets it take the FP8 path anyway. ``deep_gemm.fp8_linear`` then runs its reference:
the same 1x128 / 128x128 scales and the same e4m3 rounding as the kernels, products accumulated in
fp32 (the kernels promote every 128-deep K slice into fp32). It reproduces the H200's figure: 2.77e-3
logits calc_diff here at 4 x 256 tokens against 2.7e-3 measured there (docs/model.md, "FP8 numerics").
"""

import pytest
import torch

import openinfra.kernels.deep_gemm as dg
import openinfra.model.layers as layers
from openinfra.kernels.deep_gemm.gemm.reference import dequantize
from openinfra.model import Linear, Transformer, get_config

pytestmark = pytest.mark.unit


def calc_diff(x, y):
    x, y = x.double(), y.double()
    return float(1 - 2 * (x * y).sum() / (x * x + y * y).sum())


@pytest.fixture
def fp8_on_cpu(monkeypatch):
    """FP8 projections on CPU tensors through deep_gemm's reference; yields the count of FP8 calls."""
    calls = [0]
    real = dg.fp8_linear

    def counted(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(layers, "fp8_gemm_available", lambda x: layers._deep_gemm() is not None)
    monkeypatch.setattr(dg, "fp8_linear", counted)
    return calls


def _dense_pair(n_layers=4, dtype=torch.bfloat16):
    """The gpu tier's pair: ``small``, all layers dense (no routing flips), same weights, bf16."""
    torch.manual_seed(0)
    cfg = get_config("small", n_layers=n_layers, n_dense_layers=n_layers)
    bf16 = Transformer(cfg).to(dtype)
    fp8 = Transformer(cfg.replace(gemm="fp8")).to(dtype)
    fp8.load_state_dict(bf16.state_dict())
    return cfg, bf16, fp8


def _tokens(cfg, shape=(2, 128)):
    return torch.randint(0, cfg.vocab_size, shape, generator=torch.Generator().manual_seed(1))


def _fp8_projections(model):
    return [m for m in model.modules() if isinstance(m, Linear) and m.in_features % 128 == 0 and m.out_features % 128 == 0]


def test_fp8_model_on_cpu_reproduces_the_gpu_figure(fp8_on_cpu):
    """The whole-model comparison of the gpu tier on the reference path: one layer is within the
    issue's 1e-3, and each further layer adds about as much again (e4m3 rounding of ~7 GEMMs per
    layer, see docs/model.md), so 4 layers land near 4x one layer, under the 5e-3 regression guard."""
    figures = {}
    for n_layers in (1, 4):
        cfg, bf16, fp8 = _dense_pair(n_layers)
        tokens = _tokens(cfg)
        before = fp8_on_cpu[0]
        with torch.no_grad():
            ref, got = bf16(tokens), fp8(tokens)
        # wq_a, wq_b, wkv_b, wo, w1, w2, w3 per layer (wkv_a is 576 wide: bf16; the head stays bf16)
        assert fp8_on_cpu[0] - before == 7 * n_layers == len(_fp8_projections(fp8))
        figures[n_layers] = calc_diff(ref, got)
    print(f"fp8 vs bf16 logits on CPU: 1 layer {figures[1]:.2e}, 4 layers {figures[4]:.2e}")
    assert figures[1] < 1e-3
    assert 3 * figures[1] < figures[4] < 5e-3


def test_rounding_the_weights_alone_exceeds_the_bar():
    """Why the whole-model 1e-3 bar stays an xfail: rounding only the weights to e4m3 with 128x128
    scales (activations and GEMMs in bf16, i.e. an FP8 checkpoint run in bf16) already moves the
    4-layer model's logits by more than 1e-3. No recipe with FP8 weights in every projection, DeepSeek-V3's
    own inference included, can meet it on this model."""
    cfg, bf16, rounded = _dense_pair(4)
    with torch.no_grad():
        for m in _fp8_projections(rounded):
            m.weight.copy_(dequantize(*dg.per_block_cast_to_fp8(m.weight)).to(m.weight.dtype))
        tokens = _tokens(cfg)
        d = calc_diff(bf16(tokens), rounded(tokens))
    print(f"e4m3 weights, bf16 compute vs bf16: {d:.2e}")
    assert 1e-3 < d < 3e-3


@pytest.mark.xfail(strict=True, raises=AssertionError, reason="issue 11's bar is not met by FP8 in every projection: 3.0e-3 here "
                   "(4 layers x ~7e-4 each; e4m3 weight rounding alone 1.6e-3), see docs/model.md 'FP8 numerics'")
def test_fp8_model_meets_the_issue_bar_on_cpu(fp8_on_cpu):
    """CPU twin of the gpu tier's strict xfail, kept at 1e-3: the suite notices the day it passes."""
    cfg, bf16, fp8 = _dense_pair(4)
    tokens = _tokens(cfg)
    with torch.no_grad():
        assert calc_diff(bf16(tokens), fp8(tokens)) < 1e-3


def test_training_through_fp8_linear_on_cpu(fp8_on_cpu):
    """Backward through FP8Linear (FP8 dgrad and wgrad): weight gradients agree with the bf16 model's
    (the gpu tier's 2e-2 bound), and ten AdamW steps give the fp32 model's loss curve."""
    torch.manual_seed(0)
    cfg = get_config("small", n_layers=2, n_dense_layers=2, vocab_size=512, dim=256, inter_dim=512,
                     q_lora_rank=128, kv_lora_rank=128, n_heads=2)
    ref = Transformer(cfg)
    fp8 = Transformer(cfg.replace(gemm="fp8"))
    fp8.load_state_dict(ref.state_dict())
    data = torch.randint(0, 64, (4, 8), generator=torch.Generator().manual_seed(0)).repeat(1, 5)[:, :33]
    ref.loss(data[:, :-1], data[:, 1:]).backward()
    before = fp8_on_cpu[0]
    fp8.loss(data[:, :-1], data[:, 1:]).backward()
    assert fp8_on_cpu[0] - before == 7 * 2
    for name in ("layers.1.ffn.w1.weight", "layers.0.attn.wq_b.weight", "layers.1.attn.wo.weight"):
        a, b = ref.get_parameter(name).grad, fp8.get_parameter(name).grad
        assert b is not None, name
        print(f"weight gradient {name}: calc_diff {calc_diff(a, b):.2e}")
        assert calc_diff(a, b) < 2e-2, name
    losses = {}
    for label, model in (("fp32", ref), ("fp8", fp8)):
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        curve = []
        for _ in range(10):
            loss = model.loss(data[:, :-1], data[:, 1:])
            opt.zero_grad()
            loss.backward()
            opt.step()
            curve.append(loss.item())
        losses[label] = curve
    print("loss fp32", [f"{x:.3f}" for x in losses["fp32"]], "fp8", [f"{x:.3f}" for x in losses["fp8"]])
    # measured: 6.652 -> 1.349 -> 0.241 -> 0.077 ... 0.016 (fp32), 6.659 -> 1.372 -> 0.241 -> 0.077 ... 0.032 (fp8)
    assert losses["fp8"][-1] < 0.1
    assert all(abs(a - b) < 0.05 * max(a, 1.0) for a, b in zip(losses["fp32"], losses["fp8"]))
