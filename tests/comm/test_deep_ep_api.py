"""Single-process pieces of the DeepEP API: Config, EventOverlap / EventHandle on CPU, Buffer preconditions."""

from __future__ import annotations

import pytest
import torch

from openinfra.comm.deep_ep import Buffer, Config, EventHandle, EventOverlap

pytestmark = pytest.mark.unit


def test_config_positional_order_and_checks():
    c = Config(24, 8, 256)
    assert (c.num_sms, c.num_max_nvl_chunked_send_tokens, c.num_max_nvl_chunked_recv_tokens) == (24, 8, 256)
    with pytest.raises(ValueError, match="num_max_nvl_chunked_send_tokens must be smaller"):
        Config(24, 256, 256)
    with pytest.raises(ValueError, match="Config.num_sms must be a positive int"):
        Config(-2)
    small, large = Config(24, 8, 128), Config(24, 8, 256)
    assert 0 < small.get_nvl_buffer_size_hint(7168 * 2, 8) < large.get_nvl_buffer_size_hint(7168 * 2, 8)
    assert large.get_rdma_buffer_size_hint(7168 * 2, 8) == 0
    with pytest.raises(ValueError, match="hidden_bytes and num_ranks must be positive"):
        large.get_nvl_buffer_size_hint(0, 8)


def test_recommended_configs_and_static_helpers():
    assert Buffer.get_dispatch_config(8).num_max_nvl_chunked_recv_tokens == 256
    assert Buffer.get_combine_config(2).num_max_nvl_chunked_send_tokens == 10
    with pytest.raises(ValueError, match="no recommended dispatch config for 5 ranks"):
        Buffer.get_dispatch_config(5)
    with pytest.raises(ValueError, match="positive even int"):
        Buffer.set_num_sms(3)
    assert Buffer.get_low_latency_rdma_size_hint(128, 7168, 8, 256) > Buffer.get_low_latency_rdma_size_hint(64, 7168, 8, 256)
    assert Buffer.is_sm90_compiled()


def test_event_overlap_runs_the_pending_steps_once_when_waited():
    class Work:
        def __init__(self):
            self.waited = 0

        def wait(self):
            self.waited += 1

    work, steps = Work(), []
    event = EventOverlap(EventHandle(works=[work], finish=lambda: steps.append("unpacked")))
    assert not event.event.is_done() and steps == []
    with event:
        assert steps == []  # the body runs before the wait (the overlap window)
    assert steps == ["unpacked"] and work.waited == 1 and event.event.is_done()
    event.current_stream_wait()  # waiting again is a no-op
    assert steps == ["unpacked"] and work.waited == 1


def test_event_overlap_without_event():
    with pytest.raises(RuntimeError, match="not async_finish"):
        EventOverlap(None).current_stream_wait()
    with EventOverlap(None):
        pass
    captured = Buffer.capture()
    assert isinstance(captured, EventOverlap) and captured.event is not None
    if not torch.cuda.is_available():
        assert captured.event.is_done()


def test_buffer_needs_a_process_group():
    if torch.distributed.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(RuntimeError, match="initialised torch.distributed process group"):
        Buffer()


def test_symmetric_transport_alternates_two_buffer_sets_per_size():
    """The pull-based exchange ends without a barrier, so a buffer set may be reused only every
    other exchange of its size (symm_mem.SymmetricTransport's docstring): sets alternate per size."""
    from openinfra.comm.deep_ep.symm_mem import SymmetricTransport

    t = SymmetricTransport.__new__(SymmetricTransport)  # no NVSHMEM here: allocation is stubbed
    t._buffers, t._turn = {}, {}
    made = []
    t._allocate = lambda nbytes: made.append(nbytes) or (f"set{len(made)}",)
    a1, b1, a2, b2, a3 = t._get(64), t._get(128), t._get(64), t._get(128), t._get(64)
    assert made == [64, 64, 128, 128]  # two sets per size, allocated once, in call order
    assert a1 != a2 and a3 == a1 and b1 != b2
