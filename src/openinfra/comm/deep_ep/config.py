"""``Config``: DeepEP's performance-tuning record, kept for API compatibility.

DeepEP's kernels pipeline each rank pair's traffic through NVLink/RDMA ring buffers in chunks of
``num_max_*_chunked_send_tokens`` tokens, with ``num_sms`` streaming multiprocessors. Our transport is
``torch.distributed`` collectives (and symmetric memory where available), which have no such knobs:
a ``Config`` is validated and accepted everywhere DeepEP takes one, and its size hints say how
large DeepEP's buffers would be, but it does not change what is computed.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Config"]


@dataclass(frozen=True)
class Config:
    """Tuning record of a dispatch or combine (positional order as DeepEP's ``Config``).

    Attributes:
        num_sms: streaming multiprocessors a DeepEP kernel would use (even, >= 2).
        num_max_nvl_chunked_send_tokens: NVLink send chunk, tokens.
        num_max_nvl_chunked_recv_tokens: NVLink receive ring buffer, tokens (> send chunk).
        num_max_rdma_chunked_send_tokens: RDMA send chunk, tokens.
        num_max_rdma_chunked_recv_tokens: RDMA receive ring buffer, tokens.
    """

    num_sms: int = 20
    num_max_nvl_chunked_send_tokens: int = 6
    num_max_nvl_chunked_recv_tokens: int = 256
    num_max_rdma_chunked_send_tokens: int = 6
    num_max_rdma_chunked_recv_tokens: int = 256

    def __post_init__(self) -> None:
        for name in ("num_sms", "num_max_nvl_chunked_send_tokens", "num_max_nvl_chunked_recv_tokens",
                     "num_max_rdma_chunked_send_tokens", "num_max_rdma_chunked_recv_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"Config.{name} must be a positive int, got {value!r}")
        if self.num_sms % 2:
            raise ValueError(f"Config.num_sms must be even (one send and one receive SM per channel), got {self.num_sms}")
        if self.num_max_nvl_chunked_send_tokens >= self.num_max_nvl_chunked_recv_tokens:
            raise ValueError(
                "Config.num_max_nvl_chunked_send_tokens must be smaller than num_max_nvl_chunked_recv_tokens, "
                f"got {self.num_max_nvl_chunked_send_tokens} >= {self.num_max_nvl_chunked_recv_tokens}"
            )

    def get_nvl_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """An estimate of DeepEP's NVLink buffer for rows of ``hidden_bytes`` over ``num_ranks`` (intranode):
        per channel and rank, a few counters and a ring of ``num_max_nvl_chunked_recv_tokens`` rows of
        payload, source index, top-k ids / weights (up to 128) and scales (up to 128). Nothing is
        allocated from it here; it is for sizing code that ports to DeepEP."""
        if hidden_bytes <= 0 or num_ranks <= 0:
            raise ValueError(f"hidden_bytes and num_ranks must be positive, got {hidden_bytes}, {num_ranks}")
        channels = self.num_sms // 2
        per_token = hidden_bytes + 8 + 128 * 8 + 128 * 4 + 128 * 4  # payload, source meta, top-k ids, weights, scales
        size = channels * num_ranks * (5 * 4 + self.num_max_nvl_chunked_recv_tokens * per_token)
        return (size + 127) // 128 * 128

    def get_rdma_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """0: this implementation is intranode (one NVLink domain or one gloo group), no RDMA buffer."""
        if hidden_bytes <= 0 or num_ranks <= 0:
            raise ValueError(f"hidden_bytes and num_ranks must be positive, got {hidden_bytes}, {num_ranks}")
        return 0
