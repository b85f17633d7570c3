"""DeepEP on torch.distributed: MoE expert-parallel dispatch / combine, normal and low-latency modes.

    from openinfra.comm.deep_ep import Buffer
    buffer = Buffer(group)
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, num_experts)
    recv_x, recv_idx, recv_w, counts, handle, _ = buffer.dispatch(
        x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
        num_tokens_per_expert=per_expert, topk_idx=topk_idx, topk_weights=topk_weights)
    y, _, _ = buffer.combine(expert_mlp(recv_x, recv_idx, recv_w), handle)

See ``docs/deep_ep.md``.
"""

from openinfra.comm.deep_ep.buffer import Buffer
from openinfra.comm.deep_ep.config import Config
from openinfra.comm.deep_ep.event import EventHandle, EventOverlap
from openinfra.comm.deep_ep.kernels import gather_reduce, scatter_rows
from openinfra.comm.deep_ep.low_latency import LowLatencyHandle
from openinfra.comm.deep_ep.normal import DispatchHandle

__all__ = [
    "Buffer", "Config", "EventHandle", "EventOverlap", "DispatchHandle", "LowLatencyHandle",
    "scatter_rows", "gather_reduce",
]
