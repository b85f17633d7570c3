"""per_token_cast_to_fp8: the Triton kernel equals the PyTorch reference bit for bit.

interpreter tier: the kernel under TRITON_INTERPRET=1 on the CPU at small shapes;
gpu tier: the kernel on the H200 at DeepSeek-V3 shapes.
"""

import pytest
import torch

from openinfra.kernels.deep_gemm import per_token_cast_to_fp8
from openinfra.kernels.deep_gemm.cast.reference import ceil_to_ue8m0, per_token_cast_to_fp8_reference


def _assert_bitwise(a, b):
    ya, sa = a
    yb, sb = b
    assert ya.dtype == yb.dtype == torch.float8_e4m3fn
    assert torch.equal(ya.view(torch.uint8), yb.view(torch.uint8))
    assert torch.equal(sa.view(torch.int32), sb.view(torch.int32))


def _inputs(m, n, dtype, device, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(m, n, generator=g) * torch.exp(torch.randn(m, 1, generator=g) * 3)
    x[0, : min(n, 128)] = 0.0  # an all-zero group exercises the 1e-4 amax floor
    return x.to(dtype).to(device)


@pytest.mark.unit
def test_reference_semantics():
    x = _inputs(5, 300, torch.float32, "cpu", 0)
    y, sf = per_token_cast_to_fp8_reference(x)
    assert y.shape == (5, 300) and sf.shape == (5, 3)
    groups = torch.nn.functional.pad(x, (0, 84)).view(5, 3, 128)
    amax = groups.abs().amax(-1).clamp(min=1e-4)
    torch.testing.assert_close(sf, amax / 448.0, rtol=0, atol=0)
    deq = (torch.nn.functional.pad(y.float(), (0, 84)).view(5, 3, 128) * sf[..., None]).view(5, 384)[:, :300]
    # e4m3 keeps 3 mantissa bits: relative error of each element <= 2^-4 of its group's amax scale
    assert ((deq - x).abs() <= amax.repeat_interleave(128, 1)[:, :300] / 16 + 1e-12).all()
    assert y.float().abs().max() <= 448


@pytest.mark.unit
def test_ue8m0_rounds_up_to_powers_of_two():
    s = torch.tensor([1.0, 0.75, 0.5000001, 3e-7, 2.0**-20, 448.0])
    r = ceil_to_ue8m0(s)
    expected = torch.tensor([1.0, 1.0, 1.0, 2.0**-21, 2.0**-20, 512.0])
    assert torch.equal(r, expected)


@pytest.mark.unit
def test_bad_input_is_named():
    with pytest.raises(ValueError, match="x must be 2-D"):
        per_token_cast_to_fp8(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="x must be bfloat16"):
        per_token_cast_to_fp8(torch.zeros(2, 128, dtype=torch.int32))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        per_token_cast_to_fp8([[1.0]])


@pytest.mark.interpreter
@pytest.mark.parametrize("m, n", [(1, 128), (7, 256), (33, 200), (64, 384)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("use_ue8m0", [False, True])
def test_kernel_matches_reference_in_interpreter(m, n, dtype, use_ue8m0):
    from openinfra.kernels.deep_gemm.cast.kernel import per_token_cast_to_fp8_triton

    x = _inputs(m, n, dtype, "cpu", m * n)
    _assert_bitwise(per_token_cast_to_fp8_triton(x, use_ue8m0), per_token_cast_to_fp8_reference(x, use_ue8m0))


@pytest.mark.interpreter
def test_kernel_honours_strides_in_interpreter():
    from openinfra.kernels.deep_gemm.cast.kernel import per_token_cast_to_fp8_triton

    x = _inputs(256, 48, torch.bfloat16, "cpu", 1).t()  # [48, 256], column-major
    assert not x.is_contiguous()
    _assert_bitwise(per_token_cast_to_fp8_triton(x), per_token_cast_to_fp8_reference(x))


@pytest.mark.gpu
@pytest.mark.parametrize("m, n", [(1, 7168), (128, 7168), (4096, 7168), (4097, 2112), (8192, 16384)])
@pytest.mark.parametrize("use_ue8m0", [False, True])
def test_kernel_matches_reference_on_gpu(m, n, use_ue8m0):
    x = _inputs(m, n, torch.bfloat16, "cuda", m + n)
    out = per_token_cast_to_fp8(x, use_ue8m0)  # dispatches to Triton on Hopper
    _assert_bitwise(out, per_token_cast_to_fp8_reference(x, use_ue8m0))


@pytest.mark.interpreter
@pytest.mark.parametrize("tile", [(1, 1, 4, 1, 1), (4, 2, 4, 2, 2), (2, 8, 4, 3, 1), (16, 4, 8, 1, 1)])
def test_kernel_tiles_cover_ragged_edges_in_interpreter(tile):
    from openinfra.kernels.deep_gemm.cast.kernel import per_token_cast_to_fp8_triton

    x = _inputs(9, 1000, torch.bfloat16, "cpu", 3)  # 9 rows, 8 groups, the last one partial
    _assert_bitwise(per_token_cast_to_fp8_triton(x, False, *tile), per_token_cast_to_fp8_reference(x))
