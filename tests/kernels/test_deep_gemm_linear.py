"""FP8Linear and the launch-configuration rules (unit tier, reference path on the CPU)."""

import pytest
import torch

from openinfra.kernels import deep_gemm as dg
from openinfra.kernels.deep_gemm.gemm import config as cfg

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    monkeypatch.setenv("OPENINFRA_KERNELS", "reference")


def test_fp8_linear_forward_and_backward_track_nn_linear():
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 384)
    layer = dg.FP8Linear.from_linear(lin)
    assert layer.weight is lin.weight and layer.bias is lin.bias
    x = torch.randn(3, 50, 256, requires_grad=True)  # 150 tokens: wgrad pads them to 256
    y, y0 = layer(x), lin(x)
    assert y.shape == (3, 50, 384) and dg.calc_diff(y, y0) < 1e-3
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, layer.weight, layer.bias), g)
    want = torch.autograd.grad(y0, (x, lin.weight, lin.bias), g)
    for a, b in zip(got, want):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert dg.calc_diff(a, b) < 1e-3


def test_fp8_linear_bf16_no_bias_ue8m0_and_training_step():
    torch.manual_seed(1)
    layer = dg.FP8Linear(128, 128, bias=False, use_ue8m0=True, dtype=torch.bfloat16)
    assert layer.bias is None and "use_ue8m0=True" in repr(layer)
    x = torch.randn(64, 128, dtype=torch.bfloat16)
    target = torch.randn(64, 128, dtype=torch.bfloat16)
    opt = torch.optim.SGD(layer.parameters(), lr=0.05)
    losses = []
    for _ in range(5):
        loss = (layer(x).float() - target.float()).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_fp8_linear_rejects_bad_shapes():
    with pytest.raises(ValueError, match="in_features must be a positive multiple of 128"):
        dg.FP8Linear(100, 128)
    with pytest.raises(ValueError, match="out_features must be a positive multiple of 128"):
        dg.FP8Linear(128, 0)
    with pytest.raises(ValueError, match="in_features must be a multiple of 128"):
        dg.FP8Linear.from_linear(torch.nn.Linear(64, 128))
    layer = dg.FP8Linear(128, 128)
    with pytest.raises(ValueError, match="x must end in in_features=128"):
        layer(torch.randn(4, 64))
    with pytest.raises(ValueError, match="bias must have shape"):
        dg.fp8_linear(torch.randn(2, 128), torch.randn(128, 128), torch.randn(3))


def test_choose_config_rules(monkeypatch):
    monkeypatch.setattr(cfg, "_device_sms", lambda index: 132)
    monkeypatch.setattr(cfg, "_gluon_ws_enabled", lambda device: False)
    dev = torch.device("cuda", 0)
    big = cfg.choose_config(4096, 7168, 16384, dev)
    assert (big.block_m, big.block_n, big.num_warps, big.split_k) == (128, 128, 8, 1) and not big.gluon_ws
    for m, n, k in [(64, 2112, 7168), (128, 7168, 16384), (64, 4096, 7168), (100, 24576, 1536)]:
        small = cfg.choose_config(m, n, k, dev)
        assert small.block_m == 64
        k_blocks = k // 128
        per = -(-k_blocks // small.split_k)
        assert (small.split_k - 1) * per < k_blocks, "every K split must be non-empty"
        assert (64 + small.block_n) * 128 * small.num_stages * small.programs_per_sm <= 227 * 1024
    assert cfg.choose_config(64, 24576, 1536, dev).programs_per_sm == 2  # short K: two programs per SM
    assert cfg.choose_config(64, 7168, 16384, dev).programs_per_sm == 1
    grouped = cfg.choose_config(8192, 4096, 7168, dev, groups=4, max_block_m=128)
    assert grouped.block_m <= 128 and 128 % grouped.block_m == 0 and grouped.split_k == 1
    bf16 = cfg.choose_config(4096, 2112, 7168, dev, element_size=2, allow_split_k=False)
    assert 2 * (bf16.block_m + bf16.block_n) * 128 * bf16.num_stages <= 227 * 1024
    assert cfg.choose_config(8, 8, 128, torch.device("cpu")) == cfg.INTERPRETER_CONFIG
    with pytest.raises(ValueError, match="block_n must be a power of two"):
        cfg.GemmConfig(block_n=96)


def test_choose_config_takes_the_gluon_kernel_for_large_dense_fp8(monkeypatch):
    """On Hopper, FP8 GEMMs from M = 512 (dense; 256 when the tiles fill 3/4 of the SMs) or 256 rows
    a group (masked, contiguous) take the
    warp-specialized Gluon kernel; small M and bf16 problems keep
    the Triton kernel; OPENINFRA_GEMM_GLUON=0 turns it off."""
    monkeypatch.setattr(cfg, "_device_sms", lambda index: 132)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (9, 0))
    dev = torch.device("cuda", 0)
    big = cfg.choose_config(4096, 7168, 16384, dev)
    assert big.gluon_ws and (big.block_m, big.block_n, big.split_k) == (128, 128, 1)
    assert cfg.choose_config(512, 4096, 7168, dev).gluon_ws
    assert not cfg.choose_config(256, 4096, 7168, dev).gluon_ws  # 64 tiles for 132 SMs
    mid = cfg.choose_config(256, 7168, 16384, dev)  # 112 tiles: >= 3/4 of the SMs
    assert mid.gluon_ws and mid.num_stages == 5 and big.num_stages == 4
    assert cfg.choose_config(384, 24576, 1536, dev).gluon_ws
    assert not cfg.choose_config(64, 4096, 7168, dev).gluon_ws
    assert cfg.choose_config(8192, 4096, 7168, dev, groups=4, max_block_m=128).gluon_ws  # contiguous
    assert not cfg.choose_config(8192, 4096, 7168, dev, groups=4, max_block_m=128, allow_gluon=False).gluon_ws
    assert cfg.choose_config(256, 4096, 7168, dev, groups=4).gluon_ws  # masked, 256 rows a group
    assert not cfg.choose_config(128, 4096, 7168, dev, groups=4).gluon_ws
    assert not cfg.choose_config(8192, 4096, 7168, dev, groups=4, max_block_m=64).gluon_ws
    assert not cfg.choose_config(4096, 2112, 7168, dev, element_size=2, allow_split_k=False).gluon_ws
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (10, 0))
    assert not cfg.choose_config(4096, 7168, 16384, dev).gluon_ws  # sm_100: Triton
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (9, 0))
    monkeypatch.setenv("OPENINFRA_GEMM_GLUON", "0")
    assert not cfg.choose_config(4096, 7168, 16384, dev).gluon_ws


def test_set_num_sms_caps_the_persistent_grid(monkeypatch):
    monkeypatch.setattr(cfg, "_device_sms", lambda index: 132)
    monkeypatch.setattr(cfg, "_sms_cap", None)  # restored after the test
    dev = torch.device("cuda", 0)
    assert cfg.num_sms(dev) == 132
    dg.set_num_sms(100)
    assert cfg.num_sms(dev) == 100 and dg.get_num_sms(dev) == 100
    dg.set_num_sms(500)
    assert cfg.num_sms(dev) == 132  # never more than the device has
    with pytest.raises(ValueError, match="count must be a positive int"):
        dg.set_num_sms(0)
    assert dg.get_col_major_tma_aligned_tensor is dg.get_mn_major_tma_aligned_tensor
