"""The routines' options refuse bad values while parsing: an argparse error (exit status 2) naming
the flag and the value, before any benchmark runs. Parsed through ``build_parser("bench")``, the
parser ``openinfra bench`` uses; no routine is run."""

import argparse
import re

import pytest

from openinfra import argtypes as bench_args
from openinfra.cli import build_parser

pytestmark = pytest.mark.unit


def parse(*argv: str) -> argparse.Namespace:
    return build_parser("bench").parse_args(["bench", *argv])


def refused(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exc:
        parse(*argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize("argv, needles", [
    (["model", "--device", "bogus"], ["argument --device", "'bogus'", "cpu, cuda or cuda:N"]),
    (["model", "--device", "meta"], ["argument --device", "'meta'"]),
    (["model", "--device", "cuda:-1"], ["argument --device", "'cuda:-1'"]),
    (["model", "--batch", "0"], ["argument --batch", "'0'", ">= 1"]),
    (["model", "--seq", "-5"], ["argument --seq", "'-5'"]),
    (["model", "--repeat", "0"], ["argument --repeat"]),
    (["model", "--threads", "0"], ["argument --threads"]),
    (["model", "--batch", "two"], ["argument --batch", "expected an integer", "'two'"]),
    (["eplb", "--layers", "0"], ["argument --layers"]),
    (["eplb", "--seeds", "-1"], ["argument --seeds"]),
    (["eplb", "--budget", "1.5"], ["argument --budget", "from 0 to 1"]),
    (["eplb", "--drift", "nan"], ["argument --drift", "finite"]),
    (["eplb", "--drift", "-0.1"], ["argument --drift", ">= 0"]),
    (["eplb", "--repeat", "0"], ["argument --repeat"]),
    (["dualpipe", "--steps", "0"], ["argument --steps"]),
    (["dualpipe", "--pp", "0"], ["argument --pp"]),
    (["dualpipe", "--timeout", "-1"], ["argument --timeout", "> 0"]),
    (["dualpipe", "--timeout", "inf"], ["argument --timeout", "finite"]),
    (["fs", "--size-mib", "0"], ["argument --size-mib"]),
    (["fs", "--meta-concurrency", "-3"], ["argument --meta-concurrency"]),
    (["fs_clients", "--kv-batch", "0"], ["argument --kv-batch"]),
    (["fs_clients", "--tree-files", "-1"], ["argument --tree-files", ">= 0"]),
    (["fs_clients", "--storage-nodes", "0"], ["argument --storage-nodes"]),
    (["smallpond", "--gib", "0"], ["argument --gib", "> 0"]),
    (["smallpond", "--partitions", "0"], ["argument --partitions"]),
    (["smallpond", "--workers", "-2"], ["argument --workers"]),
    (["flash_mla", "--sk", "4096", "0"], ["argument --sk", "'0'"]),
    (["flash_mla", "--parts-per-sm", "0"], ["argument --parts-per-sm"]),
    (["deep_gemm", "--m", "64", "-1"], ["argument --m", "'-1'"]),
    (["deep_ep", "--tokens", "0"], ["argument --tokens"]),
    (["deep_ep", "--num-warps", "3"], ["argument --num-warps", "power of two"]),
    (["deep_ep", "--num-warps"], ["argument --num-warps"]),
    (["deep_ep", "--block-groups", "6"], ["argument --block-groups", "power of two"]),
    (["deep_ep", "--device", "gpu"], ["argument --device", "'gpu'"]),
    (["fp8_cast", "--variants", "8:4"], ["argument --variants", "'8:4'"]),
    (["fp8_cast", "--variants", "8:3:4"], ["argument --variants", "powers of two"]),
    (["fp8_cast", "--variants", "8:4:4:0:3"], ["argument --variants", "'8:4:4:0:3'"]),
])
def test_bad_values_are_argparse_errors_naming_the_flag(capsys, argv, needles):
    err = refused(capsys, *argv)
    assert f"openinfra bench {argv[0]}: error:" in err, err
    for needle in needles:
        assert needle in err, err


def test_cuda_device_needs_a_visible_gpu(capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    err = refused(capsys, "model", "--device", "cuda")
    assert "argument --device" in err and "no CUDA device is visible" in err
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    err = refused(capsys, "model", "--device", "cuda:2")
    assert "argument --device" in err and "only 2 CUDA device(s)" in err
    assert parse("model", "--device", "cuda:1").device == "cuda:1"


def test_deep_ep_default_device_does_not_need_a_gpu_to_parse(monkeypatch):
    """Its default ("cuda") goes through the type too; without a GPU the CLI's own refusal
    ("needs a CUDA GPU") must still be what the user sees, so parsing may not fail on it."""
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert parse("deep_ep").device == "cuda"
    assert parse("deep_ep", "--device", "cpu").device == "cpu"


def test_valid_values_parse_to_what_int_and_float_give():
    a = parse("model", "--device", "cpu", "--batch", "2", "--seq", "16", "--repeat", "1", "--threads", "1")
    assert (a.device, a.batch, a.seq, a.repeat, a.threads) == ("cpu", 2, 16, 1, 1)
    d = parse("model")
    assert (d.device, d.batch, d.seq, d.repeat, d.threads) == (None, None, None, 3, None)
    e = parse("eplb", "--drift", "0", "--budget", "1", "--layers", "4")
    assert (e.drift, e.budget, e.layers, e.seeds) == (0.0, 1.0, 4, 3)
    assert parse("fs_clients", "--tree-files", "0").tree_files == 0
    ep = parse("deep_ep", "--num-warps", "4", "8", "--block-groups", "1", "8")
    assert (ep.num_warps, ep.block_groups, ep.tokens) == ([4, 8], [1, 8], 4096)
    assert parse("deep_ep").block_groups == [None]
    assert parse("fp8_cast", "--variants", "auto", "8:4:4", "8:4:4:4:3").variants == ["auto", "8:4:4", "8:4:4:4:3"]
    dp = parse("dualpipe", "--timeout", "150", "--pp", "3")  # the routine checks that --pp is even
    assert (dp.timeout, dp.pp, dp.chunks) == (150.0, 3, 8)
    assert parse("smallpond", "--gib", "0.0005").gib == 0.0005


def test_fs_peer_keeps_its_own_checks():
    """fs_peer validates its numbers in ``validate`` (tests/bench/test_fs_peer.py parses 0 and -1
    and expects its messages), so its parser still takes them."""
    a = parse("fs_peer", "--size-mib", "0", "--time-limit", "-1")
    assert (a.size_mib, a.time_limit) == (0, -1.0)


@pytest.mark.parametrize("helper, bad, good", [
    (bench_args.positive_int, ["0", "-1", "1.5", "x", ""], [("1", 1), ("4096", 4096)]),
    (bench_args.non_negative_int, ["-1", "x"], [("0", 0), ("7", 7)]),
    (bench_args.power_of_two, ["0", "3", "-4", "x"], [("1", 1), ("64", 64)]),
    (bench_args.positive_float, ["0", "-1", "nan", "inf", "x"], [("0.5", 0.5), ("2", 2.0)]),
    (bench_args.non_negative_float, ["-0.1", "nan", "-inf"], [("0", 0.0), ("1e3", 1000.0)]),
    (bench_args.fraction, ["-0.01", "1.01", "nan"], [("0", 0.0), ("1", 1.0), ("0.25", 0.25)]),
    (bench_args.device_name, ["", "bogus", "meta", "CUDA", "cuda:x"], [("cpu", "cpu"), ("cuda", "cuda")]),
])
def test_helpers(helper, bad, good):
    for text in bad:
        with pytest.raises(argparse.ArgumentTypeError, match=re.escape(repr(text))):
            helper(text)
    for text, value in good:
        assert helper(text) == value and type(helper(text)) is type(value)
