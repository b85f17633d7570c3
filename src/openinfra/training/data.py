"""Training batches from token shards: the data stage's output, on local disk or 3FS.

A shard is a Parquet file with a ``tokens`` column (a list of token ids per row) or a ``.npy`` file
of ids. All shards are concatenated into one token stream; batch ``step`` takes ``batch_size``
windows of ``seq_len + 1`` tokens at offsets drawn from a generator seeded by ``(seed, step)``, so
any step's batch can be recomputed — which is what makes a resumed run repeat the same loss curve.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

__all__ = ["TokenStream", "read_token_shards"]


def read_token_shards(paths: list[str | Path], filesystem=None) -> torch.Tensor:
    """One int64 tensor of every shard's tokens, in the order given.

    ``filesystem`` is an fsspec filesystem for remote paths (``3fs://...``); None reads local files.
    """
    if not paths:
        raise ValueError("no token shards given")
    parts = []
    for p in paths:
        name = str(p)
        if name.endswith(".npy"):
            if filesystem is not None:
                with filesystem.open(name, "rb") as f:
                    parts.append(np.load(f).astype(np.int64).ravel())
            else:
                parts.append(np.load(name).astype(np.int64).ravel())
        elif name.endswith(".parquet"):
            import pyarrow.parquet as pq

            table = pq.read_table(name, filesystem=filesystem)
            column = next((c for c in ("tokens", "token_ids", "ids") if c in table.column_names), None)
            if column is None:
                raise ValueError(f"{name}: no tokens column (looked for tokens, token_ids, ids; has {table.column_names})")
            parts.append(np.asarray(table.column(column).combine_chunks().flatten(), dtype=np.int64))
        else:
            raise ValueError(f"{name}: token shards must be .parquet or .npy")
    return torch.from_numpy(np.concatenate(parts))


class TokenStream:
    """Deterministic random windows over a token stream (see the module docstring)."""

    def __init__(self, tokens: torch.Tensor, seq_len: int, vocab_size: int, seed: int = 0):
        if tokens.dim() != 1:
            raise ValueError(f"tokens must be 1-D, got shape {tuple(tokens.shape)}")
        if tokens.numel() < seq_len + 2:
            raise ValueError(f"{tokens.numel()} tokens are too few for seq_len={seq_len}")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab_size):
            raise ValueError(f"token ids must lie in [0, {vocab_size}); shards hold [{int(tokens.min())}, {int(tokens.max())}]")
        self.tokens, self.seq_len, self.seed = tokens, seq_len, seed

    def batch(self, step: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each [batch_size, seq_len] int64."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        starts = torch.randint(0, self.tokens.numel() - self.seq_len - 1, (batch_size,), generator=g)
        idx = starts[:, None] + torch.arange(self.seq_len + 1)[None, :]
        windows = self.tokens[idx]
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()
