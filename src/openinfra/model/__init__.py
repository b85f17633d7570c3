"""System layer: a small DeepSeek-V3-architecture model (MLA + MoE) on openinfra's kernels.

    from openinfra.model import Transformer, get_config
    model = Transformer(get_config("tiny"))
    loss = model.loss(tokens, targets)

Decode over the paged latent cache: :class:`PagedMLACache` + :class:`KVCacheManager`; checkpoints in
DeepSeek-V3's safetensors naming: :func:`load_checkpoint` / :func:`save_checkpoint`.
"""

from openinfra.model.attention import MLA, flash_mla_usable, paged_latent_attention
from openinfra.model.config import CONFIGS, ModelConfig, config_names, get_config
from openinfra.model.gate import Gate, route
from openinfra.model.grouped import (ContiguousLayout, MaskedLayout, contiguous_layout, grouped_linear_contiguous,
                                     grouped_linear_masked, masked_layout)
from openinfra.model.kv_cache import BlockAllocator, CacheBatch, KVCacheManager, PagedMLACache
from openinfra.model.layers import MLP, Linear, RMSNorm, fp8_gemm_available
from openinfra.model.loader import load_checkpoint, save_checkpoint
from openinfra.model.moe import GroupedExperts, MoE
from openinfra.model.mtp import MTPModule
from openinfra.model.rope import apply_rope, rope_cos_sin, rope_frequencies
from openinfra.model.transformer import Block, Transformer

__all__ = [
    "ModelConfig", "CONFIGS", "get_config", "config_names",
    "Transformer", "Block", "MLA", "MoE", "Gate", "GroupedExperts", "MLP", "Linear", "RMSNorm", "MTPModule",
    "load_checkpoint", "save_checkpoint",
    "route", "paged_latent_attention", "flash_mla_usable", "fp8_gemm_available",
    "ContiguousLayout", "MaskedLayout", "contiguous_layout", "masked_layout",
    "grouped_linear_contiguous", "grouped_linear_masked",
    "PagedMLACache", "KVCacheManager", "CacheBatch", "BlockAllocator",
    "rope_frequencies", "rope_cos_sin", "apply_rope",
]
