"""Argument checks shared by the GEMM entry points. Every failure names the argument, what was
expected and what came, as a ValueError (shapes, dtypes, values) or TypeError (kinds)."""

from __future__ import annotations

import torch

from openinfra.kernels.deep_gemm.utils import GROUP_SIZE, ceil_div

__all__ = [
    "FP8", "OUT_DTYPES", "split_pair", "check_tensor", "check_k", "check_sf", "sfb_granularity", "check_out",
    "check_same_device", "capturing",
]

FP8 = torch.float8_e4m3fn
OUT_DTYPES = (torch.bfloat16, torch.float32)


def split_pair(name: str, pair: object) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, sf)`` of an FP8 operand, checked for kind and dtype."""
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise TypeError(f"{name} must be a (tensor, scale_factors) pair, got {type(pair).__name__}")
    x, sf = pair
    check_tensor(name, x, (FP8,))
    check_tensor(f"{name} scale factors", sf, (torch.float32,))
    return x, sf


def check_tensor(name: str, x: object, dtypes: tuple[torch.dtype, ...], dim: int | None = None) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in dtypes:
        want = " or ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"{name} must be {want}, got {str(x.dtype).replace('torch.', '')}")
    if dim is not None and x.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(x.shape)}")
    return x


def check_k(k: int, what: str = "K") -> None:
    if k % GROUP_SIZE:
        raise ValueError(f"{what} must be a multiple of {GROUP_SIZE} for the FP8 GEMMs (one scale per 128 channels), got {k}")


def check_sf(name: str, sf: torch.Tensor, expected: tuple[int, ...]) -> None:
    if tuple(sf.shape) != tuple(expected):
        raise ValueError(f"{name} scale factors must have shape {tuple(expected)}, got {tuple(sf.shape)}")


def sfb_granularity(name: str, sfb: torch.Tensor, n: int, k: int, recipe: tuple[int, int, int] | None,
                    lead: tuple[int, ...] = ()) -> int:
    """Rows of B per scale: 128 (128x128 blocks, the default recipe (1, 128, 128)) or 1 (per-row
    1x128 scales, recipe (1, 1, 128)); read off sfb's shape, or taken from ``recipe``."""
    kg = ceil_div(k, GROUP_SIZE)
    if recipe is not None:
        if tuple(recipe) not in ((1, 128, 128), (1, 1, 128)):
            raise ValueError(f"recipe must be (1, 128, 128) or (1, 1, 128), got {tuple(recipe)}")
        gran = recipe[1]
        check_sf(name, sfb, (*lead, ceil_div(n, gran), kg))
        return gran
    for gran in (GROUP_SIZE, 1):
        if tuple(sfb.shape) == (*lead, ceil_div(n, gran), kg):
            return gran
    raise ValueError(
        f"{name} scale factors must have shape {(*lead, ceil_div(n, GROUP_SIZE), kg)} (128x128 blocks) or "
        f"{(*lead, n, kg)} (1x128), got {tuple(sfb.shape)}"
    )


def check_out(name: str, d: object, shape: tuple[int, ...], dtypes: tuple[torch.dtype, ...] = OUT_DTYPES) -> torch.Tensor:
    check_tensor(name, d, dtypes)
    if tuple(d.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(d.shape)}")
    return d


def check_same_device(**tensors: torch.Tensor | None) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{k} on {v}" for k, v in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")


def capturing(t: torch.Tensor) -> bool:
    """Whether a CUDA graph is being captured on the current stream (then no host syncs)."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()
