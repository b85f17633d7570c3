"""Argument checks shared by every entry point: one clear ValueError / TypeError per mistake."""

from __future__ import annotations

import torch

__all__ = ["check_weight", "check_topology", "check_phy2log"]


def check_weight(weight: object, name: str = "weight") -> torch.Tensor:
    """Validate a load matrix and return it as float32 on the CPU.

    Args:
        weight: [layers, experts] real tensor (or nested list) of non-negative, finite loads.
    """
    if not isinstance(weight, torch.Tensor):
        try:
            weight = torch.as_tensor(weight)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise TypeError(f"{name} must be a torch.Tensor [layers, experts] of loads, got {type(weight).__name__}") from exc
    if weight.dtype == torch.bool or weight.is_complex():
        raise TypeError(f"{name} must hold real numbers, got dtype {weight.dtype}")
    if weight.dim() != 2:
        raise ValueError(f"{name} must be 2-D [layers, experts], got {weight.dim()}-D shape {tuple(weight.shape)}")
    if weight.shape[0] == 0 or weight.shape[1] == 0:
        raise ValueError(f"{name} must have at least one layer and one expert, got shape {tuple(weight.shape)}")
    w = weight.detach().to("cpu", torch.float32)
    if not bool(torch.isfinite(w).all()):
        bad = (~torch.isfinite(w)).nonzero()[0].tolist()
        raise ValueError(f"{name} must be finite; found {weight[bad[0], bad[1]].item()} at [layer {bad[0]}, expert {bad[1]}]")
    if bool((w < 0).any()):
        bad = (w < 0).nonzero()[0].tolist()
        raise ValueError(f"{name} must be non-negative; found {weight[bad[0], bad[1]].item()} at [layer {bad[0]}, expert {bad[1]}]")
    return w


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            import numpy as np

            if isinstance(value, np.integer):
                value = int(value)
        except ImportError:  # pragma: no cover - numpy is a torch dependency
            pass
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")
    return value


def check_topology(num_experts: int, num_replicas: object, num_groups: object, num_nodes: object, num_gpus: object) -> tuple[int, int, int, int]:
    """Validate the cluster shape against the number of logical experts."""
    num_replicas = _positive_int("num_replicas", num_replicas)
    num_groups = _positive_int("num_groups", num_groups)
    num_nodes = _positive_int("num_nodes", num_nodes)
    num_gpus = _positive_int("num_gpus", num_gpus)
    if num_replicas < num_experts:
        raise ValueError(f"num_replicas ({num_replicas}) must be >= the number of logical experts ({num_experts}): every expert needs a slot")
    if num_replicas % num_gpus:
        raise ValueError(f"num_replicas ({num_replicas}) must be a multiple of num_gpus ({num_gpus}) so every GPU holds the same number of slots")
    if num_gpus % num_nodes:
        raise ValueError(f"num_gpus ({num_gpus}) must be a multiple of num_nodes ({num_nodes})")
    if num_experts % num_groups:
        raise ValueError(f"num_groups ({num_groups}) must divide the number of logical experts ({num_experts})")
    return num_replicas, num_groups, num_nodes, num_gpus


def check_phy2log(phy2log: object, num_layers: int, num_replicas: int, num_experts: int, name: str = "phy2log") -> torch.Tensor:
    """Validate a placement [layers, replicas] of logical expert ids; every expert must appear."""
    if not isinstance(phy2log, torch.Tensor):
        try:
            phy2log = torch.as_tensor(phy2log)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise TypeError(f"{name} must be an integer torch.Tensor [layers, replicas], got {type(phy2log).__name__}") from exc
    if phy2log.is_floating_point() or phy2log.is_complex() or phy2log.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got dtype {phy2log.dtype}")
    if phy2log.dim() != 2:
        raise ValueError(f"{name} must be 2-D [layers, replicas], got {phy2log.dim()}-D shape {tuple(phy2log.shape)}")
    if tuple(phy2log.shape) != (num_layers, num_replicas):
        raise ValueError(f"{name} must have shape [layers={num_layers}, replicas={num_replicas}], got {tuple(phy2log.shape)}")
    p = phy2log.detach().to("cpu", torch.int64)
    if bool(((p < 0) | (p >= num_experts)).any()):
        raise ValueError(f"{name} holds expert ids outside [0, {num_experts})")
    present = torch.zeros(num_layers, num_experts, dtype=torch.int64).scatter_add_(1, p, torch.ones_like(p))
    if bool((present == 0).any()):
        layer, expert = (present == 0).nonzero()[0].tolist()
        raise ValueError(f"{name} leaves logical expert {expert} of layer {layer} without a replica")
    return p
