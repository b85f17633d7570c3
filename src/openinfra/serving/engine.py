"""A continuous-batching inference engine over the paged MLA latent cache.

Each :meth:`Engine.step`:
1. admits waiting requests while a batch slot and enough free pages exist, and prefills each one
   (reusing whole prompt pages from the prefix store when their keys hit, so only the rest of the
   prompt is computed);
2. decodes one token for every running request in one batched forward (absorbed MLA over the
   paged cache — ``flash_mla`` on a Hopper GPU, the reference elsewhere);
3. retires finished requests and frees their pages.

A request reserves pages for its prompt plus ``max_tokens`` when admitted, so a running request
never runs out of cache mid-generation; requests that cannot fit wait.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from openinfra.model import KVCacheManager, PagedMLACache, Transformer
from openinfra.serving.prefix_cache import BlockStore, page_keys

__all__ = ["Engine", "Request", "EngineStats"]


@dataclass
class Request:
    """One generation request and its measurements (times from ``time.perf_counter``, seconds)."""

    id: str
    prompt: list[int]
    max_tokens: int
    temperature: float = 0.0
    stop_tokens: frozenset[int] = frozenset()
    output: list[int] = field(default_factory=list)
    arrival: float = 0.0
    first_token_at: float | None = None
    finished_at: float | None = None
    reused_tokens: int = 0
    finish_reason: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.arrival

    @property
    def decode_tokens_per_s(self) -> float | None:
        if self.finished_at is None or self.first_token_at is None or len(self.output) < 2:
            return None
        return (len(self.output) - 1) / max(self.finished_at - self.first_token_at, 1e-9)


@dataclass
class EngineStats:
    """Totals since the engine started; prefill counts only tokens actually computed."""

    prompt_tokens: int = 0
    reused_tokens: int = 0
    prefill_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_tokens: int = 0
    decode_seconds: float = 0.0
    decode_steps: int = 0
    finished_requests: int = 0

    @property
    def prefix_hit_rate(self) -> float:
        return self.reused_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prefill_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds else 0.0

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d.update(prefix_hit_rate=self.prefix_hit_rate, prefill_tokens_per_s=self.prefill_tokens_per_s,
                 decode_tokens_per_s=self.decode_tokens_per_s)
        return d


class Engine:
    """Continuous batching for one :class:`~openinfra.model.Transformer`.

    Args:
        model: the model (its parameters' device and dtype are used for the cache).
        num_blocks: pages in the KV pool (each ``page_size`` tokens x all layers).
        page_size: tokens per page (64: what the flash_mla kernel takes).
        max_batch: most requests decoded together.
        block_store: prefix store (``get``/``put``/``exists``); None disables prefix reuse.
        seed: seeds sampling for temperature > 0.
    """

    def __init__(self, model: Transformer, *, num_blocks: int = 64, page_size: int = 64, max_batch: int = 8,
                 block_store: BlockStore | None = None, seed: int = 0):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.model = model.eval()
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.cfg = model.cfg
        self.cache = PagedMLACache(self.cfg, num_blocks, page_size, dtype=self.dtype, device=self.device)
        self.kv = KVCacheManager(self.cache)
        self.page_size = page_size
        self.max_batch = max_batch
        self.block_store = block_store
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.stats = EngineStats()
        self._ids = itertools.count()
        self._generator = torch.Generator(device="cpu").manual_seed(seed)

    # --- requests --------------------------------------------------------------------------------

    def submit(self, prompt: list[int], max_tokens: int = 16, temperature: float = 0.0,
               stop_tokens: tuple[int, ...] | frozenset[int] = (), request_id: str | None = None) -> Request:
        """Queue a request; bad input raises ValueError naming the argument."""
        if not isinstance(prompt, (list, tuple)) or not prompt:
            raise ValueError("prompt must be a non-empty list of token ids")
        if any(not isinstance(t, int) or t < 0 or t >= self.cfg.vocab_size for t in prompt):
            raise ValueError(f"prompt token ids must be ints in [0, vocab_size={self.cfg.vocab_size})")
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens must be an int >= 1, got {max_tokens!r}")
        if len(prompt) + max_tokens > self.cfg.max_seq_len:
            raise ValueError(f"prompt ({len(prompt)}) + max_tokens ({max_tokens}) exceeds the model's "
                             f"max_seq_len={self.cfg.max_seq_len}")
        if not (temperature >= 0.0):
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        pages = -(-(len(prompt) + max_tokens) // self.page_size)
        if pages > self.cache.num_blocks:
            raise ValueError(f"request needs {pages} pages; the KV pool has only {self.cache.num_blocks}")
        req = Request(request_id or f"req-{next(self._ids)}", list(prompt), max_tokens, float(temperature),
                      frozenset(stop_tokens), arrival=time.perf_counter())
        self.waiting.append(req)
        return req

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # --- the loop --------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[tuple[Request, int]]:
        """Admit + prefill, then one batched decode; returns the (request, token) pairs emitted."""
        emitted: list[tuple[Request, int]] = []
        while self.waiting and len(self.running) < self.max_batch:
            req = self.waiting[0]
            need = -(-(len(req.prompt) + req.max_tokens) // self.page_size)
            if need > self.cache.allocator.num_free:
                break
            self.waiting.popleft()
            emitted.append((req, self._prefill(req)))
            self._finish_if_done(req)
            if not req.finished:
                self.running.append(req)
        decoding = [r for r in self.running if not r.finished and len(r.output) < r.max_tokens]
        if decoding:
            emitted += self._decode(decoding)
        for req in list(self.running):
            if req.finished:
                self.running.remove(req)
        return emitted

    def run(self, max_steps: int = 100_000) -> None:
        """Step until every request finished (bounded by ``max_steps``)."""
        for _ in range(max_steps):
            if not self.has_work():
                return
            self.step()
        raise RuntimeError(f"requests still running after max_steps={max_steps}")

    def generate(self, prompts: list[list[int]], max_tokens: int = 16, temperature: float = 0.0) -> list[list[int]]:
        """Submit ``prompts``, run to completion, return each one's output tokens."""
        reqs = [self.submit(p, max_tokens, temperature) for p in prompts]
        self.run()
        return [r.output for r in reqs]

    # --- internals -------------------------------------------------------------------------------

    def _sample(self, logits: torch.Tensor, temperatures: list[float]) -> list[int]:
        logits = logits.float().cpu()
        out = []
        for row, t in zip(logits, temperatures):
            if t == 0.0:
                out.append(int(row.argmax()))
            else:
                probs = torch.softmax(row / t, dim=-1)
                out.append(int(torch.multinomial(probs, 1, generator=self._generator)))
        return out

    def _prefill(self, req: Request) -> int:
        start = time.perf_counter()
        self.kv.add(req.id)
        self.kv.reserve(req.id, len(req.prompt) + req.max_tokens)
        pages = self.kv.pages(req.id)
        reused = self._load_prefix(req, pages)
        if reused:
            self.kv.advance([req.id], reused)
        tokens = torch.tensor([req.prompt[reused:]], dtype=torch.int64, device=self.device)
        logits = self.model(tokens, cache=self.kv.batch([req.id]), mode="prefill")
        self.kv.advance([req.id], tokens.shape[1])
        token = self._sample(logits[:, -1], [req.temperature])[0]
        self._store_prefix(req, pages, reused)
        now = time.perf_counter()
        req.output.append(token)
        req.first_token_at = now
        req.reused_tokens = reused
        self.stats.prompt_tokens += len(req.prompt)
        self.stats.reused_tokens += reused
        self.stats.prefill_tokens += tokens.shape[1]
        self.stats.prefill_seconds += now - start
        return token

    def _load_prefix(self, req: Request, pages: list[int]) -> int:
        # Reuse at most the pages before the last prompt token: its logits must be computed.
        if self.block_store is None:
            return 0
        keys = page_keys(req.prompt[: len(req.prompt) - 1], self.page_size)
        reused = 0
        for i, key in enumerate(keys):
            rows = self.block_store.get(key)
            if rows is None:
                break
            self.cache.storage[:, pages[i]] = rows.to(self.device, self.dtype)
            reused += self.page_size
        return reused

    def _store_prefix(self, req: Request, pages: list[int], reused: int) -> None:
        if self.block_store is None:
            return
        keys = page_keys(req.prompt, self.page_size)
        for i in range(reused // self.page_size, len(keys)):
            if not self.block_store.exists(keys[i]):
                self.block_store.put(keys[i], self.cache.storage[:, pages[i]].contiguous())

    def _decode(self, reqs: list[Request]) -> list[tuple[Request, int]]:
        start = time.perf_counter()
        ids = [r.id for r in reqs]
        tokens = torch.tensor([[r.output[-1]] for r in reqs], dtype=torch.int64, device=self.device)
        logits = self.model(tokens, cache=self.kv.batch(ids), mode="decode")
        self.kv.advance(ids, 1)
        new = self._sample(logits[:, -1], [r.temperature for r in reqs])
        self.stats.decode_tokens += len(reqs)
        self.stats.decode_steps += 1
        self.stats.decode_seconds += time.perf_counter() - start
        emitted = []
        for r, t in zip(reqs, new):
            r.output.append(t)
            emitted.append((r, t))
            self._finish_if_done(r)
        return emitted

    def _finish_if_done(self, req: Request) -> None:
        if req.output and req.output[-1] in req.stop_tokens:
            req.finish_reason = "stop"
        elif len(req.output) >= req.max_tokens:
            req.finish_reason = "length"
        if req.finished:
            req.finished_at = time.perf_counter()
            self.kv.free(req.id)
            self.stats.finished_requests += 1
