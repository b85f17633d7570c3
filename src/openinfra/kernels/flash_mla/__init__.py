"""FlashMLA in Triton: paged MLA decoding attention with FlashMLA's API.

- :func:`get_mla_metadata` / :func:`flash_mla_with_kvcache`: dense decoding over a paged bf16/fp16
  cache (64-token pages, any block stride, variable lengths, causal multi-token prediction,
  h_kv >= 1), the FP8 656-byte cache (``is_fp8_kvcache=True``), and sparse decoding (``indices``,
  ``topk_length``, ``attn_sink``);
- :func:`flash_mla_sparse_fwd`: sparse prefill;
- :func:`quantize_kv_cache_fp8` / :func:`dequantize_kv_cache_fp8`: the FP8 cache layout.

On a Hopper GPU the Triton kernels run (split-KV over a tile schedule, then a combine kernel);
elsewhere the exact PyTorch references in :mod:`.reference` run (see ``openinfra.kernels.backend``).
"""

from openinfra.kernels.flash_mla.api import flash_mla_sparse_fwd, flash_mla_with_kvcache
from openinfra.kernels.flash_mla.check import compare_outputs, cosine_diff
from openinfra.kernels.flash_mla.fp8_cache import dequantize_kv_cache_fp8, quantize_kv_cache_fp8
from openinfra.kernels.flash_mla.metadata import FlashMLASchedMeta, get_mla_metadata
from openinfra.kernels.flash_mla.reference import (
    mla_decode_reference, mla_sparse_decode_reference, mla_sparse_prefill_reference,
)

__all__ = [
    "get_mla_metadata", "flash_mla_with_kvcache", "flash_mla_sparse_fwd", "FlashMLASchedMeta",
    "quantize_kv_cache_fp8", "dequantize_kv_cache_fp8",
    "mla_decode_reference", "mla_sparse_decode_reference", "mla_sparse_prefill_reference",
    "compare_outputs", "cosine_diff",
]
