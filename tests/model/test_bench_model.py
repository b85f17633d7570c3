"""``openinfra bench model`` runs end to end at a tiny size (the smoke run of the benchmark)."""

import argparse

import pytest

pytestmark = pytest.mark.unit


def test_bench_model_smoke():
    from openinfra.bench.routines.model import bench_model

    args = argparse.Namespace(configs=["tiny"], batch=2, seq=16, device="cpu", fp8=True, repeat=1, threads=None)
    result = bench_model(args)
    ours, fp8 = result.rows
    assert ours["config"] == "tiny" and ours["tok/s"] > 0 and ours["x plain"] > 0
    assert fp8["gemm"] == "fp8" and "not available" in fp8["note"]  # no Hopper GPU here
    assert result.summary["tiny_fp32_tok_s"] > 0 and "tiny_x_plain" in result.summary
    with pytest.raises(ValueError, match="--threads"):
        bench_model(argparse.Namespace(**{**vars(args), "threads": 0}))
