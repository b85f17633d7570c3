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

Prefill/decode disaggregation (``openinfra.serving.disaggregated``) uses two more entries: a
prefill worker calls :meth:`Engine.prefill_export` (prefill one prompt, write all its pages to the
KV store), and the decode engine takes the result with :meth:`Engine.submit_prefilled` (its pages
are read from the store at admission instead of being computed).
"""

from __future__ import annotations

import hashlib
import itertools
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from openinfra.model import KVCacheManager, PagedMLACache, Transformer
from openinfra.serving.prefix_cache import BlockStore, page_keys

__all__ = ["Engine", "Request", "EngineStats", "Prefilled", "PrefillExport", "partial_page_key"]


@dataclass(frozen=True)
class Prefilled:
    """What a prefill worker hands the decode side for one request: the first token it sampled and
    the store keys of the prompt's pages in order (every full page, then the last partial page
    when the prompt length is not a multiple of the page size)."""

    first_token: int
    keys: tuple[bytes, ...]
    partial: bool  # keys[-1] is the request's own partial page (deleted once loaded, when the store can)


@dataclass(frozen=True)
class PrefillExport:
    """:meth:`Engine.prefill_export`'s result; ``seconds`` is wall time of the whole prefill
    (prefix load, compute, sampling, store writes)."""

    prefilled: Prefilled
    n_prompt_tokens: int
    reused_tokens: int
    seconds: float


def partial_page_key(full_keys: list[bytes], tail: list[int], nonce: bytes) -> bytes:
    """The store key of a request's last, partial prompt page: the prefix chain so far, the tail's
    tokens and a per-request ``nonce``, so it never collides with a full-page (shared) key or with
    another request's tail."""
    h = hashlib.sha256(b"openinfra-partial-v1" + (full_keys[-1] if full_keys else b"") + nonce)
    h.update(torch.tensor(tail, dtype=torch.int64).numpy().tobytes())
    return h.digest()


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
    prefilled: Prefilled | None = None  # set: the prompt's KV is in the store (disaggregated decode)
    error: str | None = None  # set with finish_reason "error" when the request failed (disaggregated front)

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
    """Totals since the engine started; prefill counts only tokens actually computed (seconds of wall
    time). ``loaded_tokens``: prompt tokens of prefilled requests whose KV was read from the store
    (computed by a prefill worker); ``fallback_prefills``: prefilled requests whose pages were
    missing from the store and were prefilled here instead."""

    prompt_tokens: int = 0
    reused_tokens: int = 0
    prefill_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_tokens: int = 0
    decode_seconds: float = 0.0
    decode_steps: int = 0
    finished_requests: int = 0
    loaded_tokens: int = 0
    fallback_prefills: int = 0

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
        req = self.new_request(prompt, max_tokens, temperature, stop_tokens, request_id)
        self.waiting.append(req)
        return req

    def submit_prefilled(self, req: Request, prefilled: Prefilled) -> Request:
        """Queue ``req`` (from :meth:`new_request`) whose prompt a prefill worker already ran: at
        admission its pages are read from the block store into this engine's cache (no model compute
        for the prompt) and ``prefilled.first_token`` is its first output token; then it decodes in
        the batch like any other request. If a page is missing from the store (evicted), the prompt
        is prefilled here instead (counted in ``stats.fallback_prefills``)."""
        if self.block_store is None:
            raise ValueError("submit_prefilled needs the engine's block_store (the store the prefill worker wrote to)")
        n = len(req.prompt)
        n_pages, partial = -(-n // self.page_size), bool(n % self.page_size)
        if len(prefilled.keys) != n_pages or prefilled.partial != partial:
            raise ValueError(f"prefilled.keys: a {n}-token prompt has {n_pages} pages of {self.page_size} tokens "
                             f"(last partial: {partial}), got {len(prefilled.keys)} keys (partial={prefilled.partial})")
        if not isinstance(prefilled.first_token, int) or not 0 <= prefilled.first_token < self.cfg.vocab_size:
            raise ValueError(f"prefilled.first_token must be an int in [0, vocab_size={self.cfg.vocab_size})")
        req.prefilled = prefilled
        self.waiting.append(req)
        return req

    def new_request(self, prompt: list[int], max_tokens: int = 16, temperature: float = 0.0,
                    stop_tokens: tuple[int, ...] | frozenset[int] = (), request_id: str | None = None) -> Request:
        """A validated request, not queued (``submit`` queues it; a disaggregated front holds it while
        a prefill worker runs its prompt). Bad input raises ValueError naming the argument."""
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
        return Request(request_id or f"req-{next(self._ids)}", list(prompt), max_tokens, float(temperature),
                       frozenset(stop_tokens), arrival=time.perf_counter())

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
            emitted.append((req, self._admit(req)))
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

    @torch.inference_mode()
    def prefill_export(self, prompt: list[int], temperature: float = 0.0, nonce: bytes = b"") -> PrefillExport:
        """Prefill one prompt and leave its whole KV in the block store (what a prefill worker does):
        full pages under their shared prefix keys (as every prefill does), the last partial page
        under :func:`partial_page_key` (``nonce`` makes it request-specific). Pages already in the
        store are read, not computed (prefix reuse). The engine's own pages are freed on return."""
        if self.block_store is None:
            raise ValueError("prefill_export needs a block_store to write the prompt's pages to")
        req = self.new_request(prompt, 1, temperature)
        start = time.perf_counter()
        try:
            token = self._prefill(req, reserve=len(req.prompt))
            keys = page_keys(req.prompt, self.page_size)
            tail = len(req.prompt) - len(keys) * self.page_size
            if tail:
                keys.append(partial_page_key(keys, req.prompt[-tail:], nonce))
                # The whole page goes (rows past the prompt are unused), so every block has one shape.
                self.block_store.put(keys[-1], self.cache.storage[:, self.kv.pages(req.id)[-1]].contiguous())
        finally:
            self.kv.free(req.id)
        return PrefillExport(Prefilled(token, tuple(keys), bool(tail)), len(req.prompt), req.reused_tokens,
                             time.perf_counter() - start)

    def _admit(self, req: Request) -> int:
        """Give an admitted request its prompt's KV and its first token (pages are free: checked)."""
        if req.prefilled is None:
            return self._prefill(req)
        rows = self._fetch_pages(list(req.prefilled.keys))
        delete = getattr(self.block_store, "delete", None)  # optional in the BlockStore protocol
        if req.prefilled.partial and delete is not None:
            delete(req.prefilled.keys[-1])  # nobody else reads a request's own tail page
        if len(rows) == len(req.prefilled.keys):
            return self._install_prefilled(req, rows)
        self.stats.fallback_prefills += 1  # a page was evicted: compute the prompt here instead
        return self._prefill(req)

    def _install_prefilled(self, req: Request, rows: list[torch.Tensor]) -> int:
        self.kv.add(req.id)
        self.kv.reserve(req.id, len(req.prompt) + req.max_tokens)
        for page, r in zip(self.kv.pages(req.id), rows):
            self.cache.storage[:, page] = r
        self.kv.advance([req.id], len(req.prompt))
        req.output.append(req.prefilled.first_token)
        req.first_token_at = time.perf_counter()
        self.stats.prompt_tokens += len(req.prompt)
        self.stats.loaded_tokens += len(req.prompt)
        return req.prefilled.first_token

    def _prefill(self, req: Request, reserve: int | None = None) -> int:
        """Prefill ``req`` into pages reserved for ``reserve`` tokens (default: prompt + max_tokens)."""
        start = time.perf_counter()
        self.kv.add(req.id)
        self.kv.reserve(req.id, len(req.prompt) + req.max_tokens if reserve is None else reserve)
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

    def _fetch_pages(self, keys: list[bytes]) -> list[torch.Tensor]:
        """Rows of the pages ``keys`` from the block store, in the cache's device and dtype, up to the
        first miss (so ``len(result) < len(keys)`` means a page is missing)."""
        want = tuple(self.cache.storage[:, 0].shape)
        get_many = getattr(self.block_store, "get_many", None)  # optional: one batched read (3FS KVCache)
        got = get_many(keys) if get_many is not None and len(keys) > 1 else map(self.block_store.get, keys)
        rows = []
        for key, r in zip(keys, got):
            if r is None:
                break
            if tuple(r.shape) != want:
                raise ValueError(f"block store page {key.hex()[:16]}.. has shape {tuple(r.shape)}, this engine's pages "
                                 f"are {want} (a different model or page_size wrote it)")
            rows.append(r.to(self.device, self.cache.storage.dtype))
        return rows

    def _load_prefix(self, req: Request, pages: list[int]) -> int:
        # Reuse at most the pages before the last prompt token: its logits must be computed.
        if self.block_store is None:
            return 0
        rows = self._fetch_pages(page_keys(req.prompt[: len(req.prompt) - 1], self.page_size))
        for page, r in zip(pages, rows):
            self.cache.storage[:, page] = r
        return len(rows) * self.page_size

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
