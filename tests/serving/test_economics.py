"""The cost arithmetic applied to a run of our own engine."""

import pytest

from openinfra.serving.cost import run_economics

pytestmark = pytest.mark.unit


def test_published_node_throughput_gives_a_profitable_node():
    # One H800 node at the overview's per-node figures: 73.7k input tok/s prefill, 14.8k output tok/s decode.
    e = run_economics(73_700, 14_800, cache_hit_share=342 / 608, gpus=8, gpu_hour_usd=2.0)
    assert e["cost_per_hour_usd"] == 16.0
    assert e["margin"] > 0
    # doubling both throughputs doubles income, not cost
    e2 = run_economics(2 * 73_700, 2 * 14_800, cache_hit_share=342 / 608, gpus=8, gpu_hour_usd=2.0)
    assert e2["income_per_hour_usd"] == pytest.approx(2 * e["income_per_hour_usd"])


def test_zero_throughput_is_refused():
    with pytest.raises(ValueError, match="tokens_per_s"):
        run_economics(0, 1, 0.5, 1, 2.0)
