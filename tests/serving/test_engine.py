"""The serving engine: continuous batching over the paged cache equals full recomputation."""

import json
import urllib.error
import urllib.request

import pytest
import torch

from openinfra.model import Transformer, get_config
from openinfra.serving.engine import Engine
from openinfra.serving.http_server import CompletionServer
from openinfra.serving.prefix_cache import MemoryBlockStore, page_keys

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(get_config("tiny")).eval()


def _greedy_by_recompute(model, prompt, n):
    tokens, out = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            t = int(model(torch.tensor([tokens]))[0, -1].argmax())
            out.append(t)
            tokens.append(t)
    return out


def _prompts():
    g = torch.Generator().manual_seed(1)
    shared = torch.randint(0, 256, (40,), generator=g).tolist()
    return [shared + [5, 6], torch.randint(0, 256, (7,), generator=g).tolist(), shared + [9], [3] * 17, shared]


@pytest.mark.parametrize("use_store", [False, True])
def test_batched_paged_generation_equals_recompute(model, use_store):
    engine = Engine(model, num_blocks=24, page_size=16, max_batch=3, block_store=MemoryBlockStore() if use_store else None)
    prompts = _prompts()
    outs = engine.generate(prompts, max_tokens=6)
    for p, o in zip(prompts, outs):
        assert o == _greedy_by_recompute(model, p, 6)
    assert engine.cache.allocator.num_free == 24  # every page came back
    if use_store:
        # the second and third users of the shared 40-token prefix reuse its two full pages
        assert engine.stats.reused_tokens == 2 * 32 and 0 < engine.stats.prefix_hit_rate < 1
    else:
        assert engine.stats.reused_tokens == 0


def test_requests_wait_for_pages_and_all_finish(model):
    engine = Engine(model, num_blocks=3, page_size=16, max_batch=8)
    reqs = [engine.submit([1, 2, 3] * 10, max_tokens=4) for _ in range(4)]  # 2 pages each: one at a time
    first = engine.step()
    assert len(engine.running) == 1 and len(engine.waiting) == 3 and len(first) == 2
    engine.run(max_steps=100)
    assert all(r.finish_reason == "length" and len(r.output) == 4 for r in reqs)
    assert all(r.ttft_s is not None and r.ttft_s >= 0 for r in reqs)


def test_stop_token_finishes_early(model):
    engine = Engine(model, num_blocks=8, page_size=16)
    expected = _greedy_by_recompute(model, [4, 5, 6], 5)
    req = engine.submit([4, 5, 6], max_tokens=5, stop_tokens=(expected[1],))
    engine.run()
    assert req.output == expected[: expected.index(expected[1]) + 1] and req.finish_reason == "stop"


@pytest.mark.parametrize("kwargs, word", [
    (dict(prompt=[]), "prompt"),
    (dict(prompt=[1, 10**6]), "vocab_size"),
    (dict(prompt=[1], max_tokens=0), "max_tokens"),
    (dict(prompt=[1] * 250, max_tokens=10), "max_seq_len"),
    (dict(prompt=[1], temperature=-1.0), "temperature"),
])
def test_bad_requests_are_named(model, kwargs, word):
    engine = Engine(model, num_blocks=8, page_size=16)
    with pytest.raises(ValueError, match=word):
        engine.submit(**kwargs)


def test_prefix_keys_depend_on_everything_before():
    a = page_keys([1] * 32 + [2] * 16, 16)
    b = page_keys([3] * 16 + [1] * 16 + [2] * 16, 16)
    assert len(a) == 3 and a[2] != b[2]  # same last page, different prefix
    assert page_keys([1] * 31, 16) == a[:1]


def test_memory_store_is_bounded():
    store = MemoryBlockStore(capacity_bytes=3 * 64 * 4)
    for i in range(5):
        store.put(bytes([i]), torch.zeros(64))
    assert len(store) == 3 and not store.exists(bytes([0])) and store.exists(bytes([4]))


def _post(url, payload, raw=None):
    data = raw if raw is not None else json.dumps(payload).encode()
    req = urllib.request.Request(url + "/v1/completions", data=data, headers={"Content-Type": "application/json"})
    return urllib.request.urlopen(req, timeout=60)


def test_http_completions_stream_and_bad_input(model):
    engine = Engine(model, num_blocks=16, page_size=16, max_batch=4, block_store=MemoryBlockStore())
    server = CompletionServer(engine, "127.0.0.1", 0).start()
    try:
        body = json.loads(_post(server.url, {"prompt": [7, 8, 9], "max_tokens": 4}).read())
        assert body["choices"][0]["token_ids"] == _greedy_by_recompute(model, [7, 8, 9], 4)
        assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
        text = _post(server.url, {"prompt": "hi", "max_tokens": 3, "stream": True}).read().decode()
        events = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and len(events) == 5  # 3 tokens, the finish event, DONE
        for payload, raw in [(None, b"{not json"), ({"prompt": 5}, None), ({"prompt": [1], "max_tokens": -2}, None)]:
            with pytest.raises(urllib.error.HTTPError) as err:
                _post(server.url, payload, raw)
            assert err.value.code == 400 and "message" in json.loads(err.value.read())["error"]
        # still serving after bad input
        assert json.loads(_post(server.url, {"prompt": [1, 2], "max_tokens": 1}).read())["usage"]["completion_tokens"] == 1
        metrics = json.loads(urllib.request.urlopen(server.url + "/metrics", timeout=30).read())
        assert metrics["finished_requests"] == 3 and metrics["decode_tokens"] > 0
    finally:
        server.stop()
