"""The DeepSeek-V3 transformer: embedding, blocks of MLA + (dense MLP | MoE), final norm, head.

Single-device code only: pipeline, expert and data parallelism live in ``openinfra.training``,
which uses :meth:`Transformer.embed_tokens`, the blocks and :meth:`Transformer.logits` as stages.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from openinfra.model.attention import MLA
from openinfra.model.config import ModelConfig
from openinfra.model.kv_cache import CacheBatch
from openinfra.model.layers import MLP, RMSNorm
from openinfra.model.moe import MoE
from openinfra.model.rope import rope_frequencies
from openinfra.profiling.annotate import phase

__all__ = ["Block", "Transformer"]

Mode = Literal["auto", "prefill", "decode"]


class Block(nn.Module):
    """Pre-norm residual block: ``x + attn(attn_norm(x))`` then ``x + ffn(ffn_norm(x))``."""

    def __init__(self, layer_id: int, cfg: ModelConfig):
        super().__init__()
        self.layer_id = layer_id
        self.attn = MLA(cfg)
        self.ffn: nn.Module = MLP(cfg.dim, cfg.inter_dim, cfg.gemm == "fp8") if layer_id < cfg.n_dense_layers else MoE(cfg)
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)

    @property
    def is_moe(self) -> bool:
        return isinstance(self.ffn, MoE)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: CacheBatch | None = None,
                mode: Literal["prefill", "decode"] = "prefill") -> torch.Tensor:
        with phase("attn"):
            x = x + self.attn(self.attn_norm(x), cos, sin, cache, self.layer_id, mode)
        if self.is_moe:
            mask = None
            if cache is not None and cache.new_lengths is not None:
                lens = torch.tensor(cache.new_lengths, device=x.device)
                mask = torch.arange(x.shape[1], device=x.device)[None, :] < lens[:, None]
            x = x + self.ffn(self.ffn_norm(x), "masked" if mode == "decode" else "contiguous", mask)
        else:
            with phase("mlp"):
                x = x + self.ffn(self.ffn_norm(x))
        return x


class Transformer(nn.Module):
    """A DeepSeek-V3-architecture language model built from a :class:`ModelConfig`.

    ``model(tokens)`` -> logits [b, s, vocab] (training: causal attention over ``tokens``).
    ``model(tokens, cache=batch)`` appends ``tokens`` to each request's paged latent cache and
    attends over it (prefill or absorbed decode, see :meth:`forward`).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        nn.init.normal_(self.embed.weight, std=1.0)
        self.layers = nn.ModuleList(Block(i, cfg) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        nn.init.normal_(self.head.weight, std=cfg.dim ** -0.5)
        from openinfra.model.mtp import MTPModule

        self.mtp = nn.ModuleList(MTPModule(k + 1, cfg) for k in range(cfg.n_mtp_layers))
        self.register_buffer("rope_freqs", rope_frequencies(cfg), persistent=False)

    def _apply(self, fn, recurse=True):
        # Rotary frequencies stay float32 whatever dtype the weights move to.
        super()._apply(fn, recurse)
        if self.rope_freqs.dtype != torch.float32:
            self.rope_freqs = rope_frequencies(self.cfg).to(self.rope_freqs.device)
        return self

    # --- pieces the training job stages across pipeline ranks -------------------------------------

    def rope_tables(self, positions: torch.Tensor, max_position: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [..., rope/2] float32 at integer ``positions`` [...] (each < max_seq_len).
        ``max_position``: the largest position when the caller knows it (saves a device sync)."""
        if max_position is None and positions.numel():
            max_position = int(positions.max())
        if max_position is not None and max_position >= self.cfg.max_seq_len:
            raise ValueError(f"position {max_position} is past max_seq_len={self.cfg.max_seq_len}")
        angles = positions.float()[..., None] * self.rope_freqs.to(positions.device)
        return angles.cos(), angles.sin()

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"tokens must be an integer tensor, got {tokens.dtype}")
        if tokens.numel():
            lo, hi = torch.stack([tokens.min(), tokens.max()]).tolist()  # one host sync, not two
            if lo < 0 or hi >= self.cfg.vocab_size:
                raise ValueError(f"token ids must lie in [0, vocab_size={self.cfg.vocab_size}), got [{lo}, {hi}]")
        return self.embed(tokens)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and output head: [..., dim] -> [..., vocab] (in the head's dtype)."""
        return self.head(self.norm(h))

    # --- forward -----------------------------------------------------------------------------------

    def forward(self, tokens: torch.Tensor, cache: CacheBatch | None = None, mode: Mode = "auto") -> torch.Tensor:
        """Logits [b, s, vocab] for tokens [b, s] (the main head; see :meth:`mtp_logits` for MTP depths).

        Args:
            tokens: int64 / int32 token ids.
            cache: None for training. With a :class:`CacheBatch`, token j of request i sits at
                position ``cache.cache_seqlens[i] + j`` and is written into the paged cache; the caller
                then advances its lengths by s (``KVCacheManager.advance``).
            mode: ``prefill`` (expand cached latents to per-head K/V), ``decode`` (weight absorption,
                flash_mla layout, MoE in the masked layout) or ``auto`` (decode when s <= 2).
        """
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [batch, seq], got shape {tuple(tokens.shape)}")
        b, s = tokens.shape
        h = self.embed_tokens(tokens)
        if cache is None:
            positions = torch.arange(s, device=tokens.device)[None, :]
            max_position = s - 1
            run_mode: Literal["prefill", "decode"] = "prefill"
        else:
            if cache.block_table.shape[0] != b:
                raise ValueError(f"cache has {cache.block_table.shape[0]} requests, tokens has {b}")
            positions = cache.cache_seqlens.to(tokens.device).long()[:, None] + torch.arange(s, device=tokens.device)[None, :]
            if mode not in ("auto", "prefill", "decode"):
                raise ValueError(f"mode must be 'auto', 'prefill' or 'decode', got {mode!r}")
            run_mode = ("decode" if s <= 2 else "prefill") if mode == "auto" else mode
            new = [s] * b
            if cache.new_lengths is not None:
                new = list(cache.new_lengths)
                if len(new) != b or any(not 1 <= n <= s for n in new):
                    raise ValueError(f"new_lengths must give 1..{s} tokens for each of the {b} requests, got {new}")
            if cache.lengths is not None:  # known on the host: no device sync
                max_position = max(cache.lengths) + s - 1
            else:
                max_position = int(positions.max())
            if cache.capacity is not None:
                ends = cache.lengths if cache.lengths is not None else cache.cache_seqlens.tolist()
                for i, (end, cap, n) in enumerate(zip(ends, cache.capacity, new)):
                    if end + n > cap:
                        raise ValueError(f"request {i}: writing tokens {end}..{end + n - 1} needs more than its "
                                         f"{cap} reserved token slots (call KVCacheManager.reserve first)")
            needed = (max_position if cache.new_lengths is None else max(
                e + n for e, n in zip(cache.lengths or cache.cache_seqlens.tolist(), new)) - 1) // cache.cache.page_size + 1
            if needed > cache.block_table.shape[1]:
                raise ValueError(f"block_table has {cache.block_table.shape[1]} pages per request, "
                                 f"position {max_position} needs {needed}")
        return self.logits(self._run_layers(h, positions, cache, run_mode, max_position))

    def _run_layers(self, h: torch.Tensor, positions: torch.Tensor, cache: CacheBatch | None,
                    mode: Literal["prefill", "decode"], max_position: int | None = None) -> torch.Tensor:
        cos, sin = self.rope_tables(positions, max_position)
        for layer in self.layers:
            h = layer(h, cos, sin, cache, mode)
        return h

    def hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        """Final hidden states [b, s, dim] (before the final norm) of the training path."""
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [batch, seq], got shape {tuple(tokens.shape)}")
        positions = torch.arange(tokens.shape[1], device=tokens.device)[None, :]
        return self._run_layers(self.embed_tokens(tokens), positions, None, "prefill", tokens.shape[1] - 1)

    def mtp_logits(self, tokens: torch.Tensor, h: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Logits of each MTP depth k = 1..n_mtp_layers: [b, s - k, vocab], position i predicting
        token ``tokens[:, i + k + 1]`` (i.e. ``targets[:, i + k]``). ``h`` = :meth:`hidden` when known."""
        if not len(self.mtp):
            return []
        h = self.hidden(tokens) if h is None else h
        emb = self.embed_tokens(tokens)
        out = []
        for k, module in enumerate(self.mtp, start=1):
            s = tokens.shape[1] - k
            if s <= 0:
                raise ValueError(f"MTP depth {k} needs sequences longer than {k} tokens, got {tokens.shape[1]}")
            cos, sin = self.rope_tables(torch.arange(s, device=tokens.device)[None, :], s - 1)
            h = module(h[:, :s], emb[:, k:k + s], cos, sin)
            out.append(self.head(module.norm(h)))
        return out

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
             mtp_weight: float = 0.0) -> torch.Tensor:
        """Mean next-token cross-entropy (float32) of logits(tokens) against targets [b, s], plus
        ``mtp_weight / D * sum_k CE_k`` over the D MTP depths when ``mtp_weight > 0``."""
        if mtp_weight < 0:
            raise ValueError(f"mtp_weight must be >= 0, got {mtp_weight}")
        if mtp_weight > 0 and not len(self.mtp):
            raise ValueError("mtp_weight > 0 needs a config with n_mtp_layers > 0")
        h = self.hidden(tokens)
        loss = F.cross_entropy(self.logits(h).float().flatten(0, 1), targets.flatten(), ignore_index=ignore_index)
        if mtp_weight > 0:
            extra = [F.cross_entropy(lg.float().flatten(0, 1), targets[:, k:].flatten(), ignore_index=ignore_index)
                     for k, lg in enumerate(self.mtp_logits(tokens, h), start=1)]
            loss = loss + mtp_weight * torch.stack(extra).mean()
        return loss

    # --- MoE bookkeeping ---------------------------------------------------------------------------

    def moe_layers(self) -> list[MoE]:
        """MoE layers of the main stack, then those of the MTP modules."""
        blocks = [*self.layers, *(m.block for m in self.mtp)]
        return [blk.ffn for blk in blocks if isinstance(blk.ffn, MoE)]

    def expert_load(self) -> torch.Tensor:
        """Tokens routed to each expert since the last reset: [n_moe_layers (+ n_mtp_layers),
        n_routed_experts] int64, rows in :meth:`moe_layers` order (the input of EPLB's load tracker)."""
        moes = self.moe_layers()
        if not moes:
            return torch.zeros(0, self.cfg.n_routed_experts, dtype=torch.int64)
        return torch.stack([m.gate.load.detach().clone() for m in moes])

    def reset_expert_load(self) -> None:
        for m in self.moe_layers():
            m.gate.reset_load()

    def update_router_bias(self, rate: float = 1e-3) -> torch.Tensor:
        """Apply the aux-loss-free bias update in every MoE layer from the tracked load, then reset it.
        Returns the loads used, [n_moe_layers, E]."""
        moes = self.moe_layers()
        if not moes:
            return torch.zeros(0, self.cfg.n_routed_experts, dtype=torch.int64)
        return torch.stack([m.gate.update_bias(rate) for m in moes])
