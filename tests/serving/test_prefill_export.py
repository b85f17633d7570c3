"""Disaggregation pieces in one process: prefill_export + submit_prefilled equal a plain engine,
the wire protocol's framing and validation, and the directory block store."""

import socket
import struct

import pytest
import torch

from openinfra.model import Transformer, get_config
from openinfra.serving.engine import Engine, Prefilled, partial_page_key
from openinfra.serving.prefix_cache import FileBlockStore, MemoryBlockStore, open_block_store, page_keys
from openinfra.serving.protocol import (MAX_FRAME, FrameTooLarge, ProtocolError, recv_frame, send_frame,
                                        validate_prefill, validate_prefill_reply)

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(get_config("tiny")).eval()


@pytest.mark.parametrize("page_size", [16, 64])
def test_export_then_prefilled_decode_equals_one_engine(model, page_size):
    store = MemoryBlockStore()
    prefill = Engine(model, num_blocks=16, page_size=page_size, max_batch=1, block_store=store)
    decode = Engine(model, num_blocks=32, page_size=page_size, max_batch=4, block_store=store)
    prompts = [[4, 5, 6], list(range(page_size)), list(range(page_size + 7)), list(range(page_size + 3))]
    reqs = []
    for p in prompts:
        out = prefill.prefill_export(p, nonce=b"n")
        assert out.n_prompt_tokens == len(p) and len(out.prefilled.keys) == -(-len(p) // page_size)
        assert out.prefilled.partial == bool(len(p) % page_size) and out.seconds > 0
        reqs.append(decode.submit_prefilled(decode.new_request(p, 5), out.prefilled))
    assert prefill.cache.allocator.num_free == 16  # the worker's pages all came back
    assert prefill.stats.reused_tokens == 2 * page_size  # the last two reuse the first page of range(page_size)
    decode.run(max_steps=100)
    plain = Engine(model, num_blocks=32, page_size=page_size, max_batch=4).generate(prompts, max_tokens=5)
    assert [r.output for r in reqs] == plain
    assert decode.stats.prefill_tokens == 0 and decode.stats.loaded_tokens == sum(map(len, prompts))
    assert decode.cache.allocator.num_free == 32
    # partial pages were dropped once read; only the shared full pages remain
    assert len(store) == len({k for p in prompts for k in page_keys(p, page_size)})


def test_partial_keys_are_request_specific():
    full = page_keys(list(range(20)), 16)
    assert partial_page_key(full, [16, 17, 18, 19], b"a") != partial_page_key(full, [16, 17, 18, 19], b"b")
    assert partial_page_key(full, [16, 17, 18, 19], b"a") not in page_keys(list(range(32)), 16)


def test_frames_roundtrip_and_bad_frames_are_named():
    a, b = socket.socketpair()
    with a, b:
        send_frame(a, {"op": "ping", "x": [1, 2]})
        assert recv_frame(b) == {"op": "ping", "x": [1, 2]}
        a.sendall(struct.pack(">I", 3) + b"\xff\xfe\x00")
        with pytest.raises(ProtocolError, match="JSON"):
            recv_frame(b)
        a.sendall(struct.pack(">I", MAX_FRAME + 1))
        with pytest.raises(FrameTooLarge, match="outside"):
            recv_frame(b)
        a.sendall(struct.pack(">I", 10) + b"{}")
        a.shutdown(socket.SHUT_WR)
        with pytest.raises(ConnectionError, match="frame body"):
            recv_frame(b)
    a, b = socket.socketpair()
    with a, b:
        a.close()
        assert recv_frame(b) is None  # a clean close between frames


@pytest.mark.parametrize("msg, word", [
    ({"id": "x" * 129, "prompt": [1]}, "id"), ({"id": 5, "prompt": [1]}, "id"),
    ({"id": "x", "prompt": "abc"}, "prompt"), ({"id": "x", "prompt": [1.5]}, "prompt"),
    ({"id": "x", "prompt": [True]}, "prompt"), ({"id": "x", "prompt": [1] * 11}, "prompt"),
    ({"id": "x", "prompt": [1], "temperature": -1}, "temperature"),
])
def test_prefill_requests_are_validated(msg, word):
    with pytest.raises(ProtocolError, match=word):
        validate_prefill(msg, vocab_size=100, max_prompt=10)
    assert validate_prefill({"id": "x", "prompt": [1, 99]}, 100, 10) == ("x", [1, 99], 0.0)


def test_prefill_replies_are_validated():
    good = {"ok": True, "id": "r", "first_token": 3, "n_prompt_tokens": 20, "keys": ["ab" * 32] * 2,
            "partial": True, "reused_tokens": 0, "prefill_s": 0.1}
    assert validate_prefill_reply(dict(good), "r", 20, 16)["keys"] == [bytes.fromhex("ab" * 32)] * 2
    for bad, word in [({"id": "s"}, "expected"), ({"keys": ["ab" * 32]}, "keys"), ({"first_token": "3"}, "first_token"),
                      ({"ok": False, "error": "boom"}, "boom"), ({"keys": ["zz" * 32] * 2}, "hex")]:
        with pytest.raises(ProtocolError, match=word):
            validate_prefill_reply({**good, **bad}, "r", 20, 16)


def test_file_block_store(tmp_path):
    store = open_block_store({"kind": "dir", "path": str(tmp_path / "kv")})
    assert isinstance(store, FileBlockStore)
    t = torch.randn(2, 16, 1, 40)
    assert store.get(b"k") is None and not store.exists(b"k")
    store.put(b"k", t)
    store.put(b"k", torch.zeros(1))  # keys name content: the first value stays
    assert store.exists(b"k") and torch.equal(store.get(b"k"), t)
    assert store.delete(b"k") and not store.delete(b"k") and store.get(b"k") is None
    with pytest.raises(ValueError, match="kind"):
        open_block_store({"kind": "tape"})


def test_submit_prefilled_needs_a_store_and_a_valid_token(model):
    with pytest.raises(ValueError, match="block_store"):
        Engine(model, num_blocks=4, page_size=16).submit_prefilled(None, Prefilled(1, (b"k",), True))
    engine = Engine(model, num_blocks=4, page_size=16, block_store=MemoryBlockStore())
    with pytest.raises(ValueError, match="first_token"):
        engine.submit_prefilled(engine.new_request([1, 2], 2), Prefilled(10**6, (b"k",), True))
