"""Model configuration: one typed dataclass and the named sizes from ``tiny`` to the full ``v3``.

Every mechanism of DeepSeek-V3 is a field here, so behaviour never depends on a magic dimension:
the gate's selection bias exists whenever ``score_func == "sigmoid"``, YaRN is on whenever
``rope_factor > 1`` and ``max_seq_len > original_seq_len``, and the dense-layer count is explicit.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["ModelConfig", "CONFIGS", "get_config", "config_names"]


@dataclass(frozen=True)
class ModelConfig:
    """Sizes and switches of a DeepSeek-V3-architecture model (field names follow DeepSeek-V3's ``ModelArgs``).

    Attention (MLA): queries go ``dim -> q_lora_rank -> n_heads * (nope + rope)`` (``q_lora_rank == 0``
    means one direct projection); keys/values go ``dim -> kv_lora_rank + rope`` (the cached latent),
    then ``kv_lora_rank -> n_heads * (nope + v)``.  MoE: ``n_routed_experts`` experts of width
    ``moe_inter_dim``, ``n_activated_experts`` per token chosen within ``n_limited_groups`` of
    ``n_expert_groups`` groups, plus ``n_shared_experts`` always-on experts; the first
    ``n_dense_layers`` layers use a dense SwiGLU MLP of width ``inter_dim`` instead.
    """

    vocab_size: int = 512
    dim: int = 64
    inter_dim: int = 128
    moe_inter_dim: int = 32
    n_layers: int = 2
    n_dense_layers: int = 1
    n_heads: int = 2
    # MoE
    n_routed_experts: int = 8
    n_shared_experts: int = 1
    n_activated_experts: int = 2
    n_expert_groups: int = 2
    n_limited_groups: int = 1
    score_func: Literal["sigmoid", "softmax"] = "sigmoid"
    route_scale: float = 1.0
    # MLA
    q_lora_rank: int = 32
    kv_lora_rank: int = 32
    qk_nope_head_dim: int = 16
    qk_rope_head_dim: int = 8
    v_head_dim: int = 16
    # RoPE / YaRN
    max_seq_len: int = 256
    original_seq_len: int = 4096
    rope_theta: float = 10000.0
    rope_factor: float = 40.0
    beta_fast: int = 32
    beta_slow: int = 1
    mscale: float = 1.0
    norm_eps: float = 1e-6
    # Linear layers: "bf16" keeps every GEMM in the parameter dtype; "fp8" runs them through
    # deep_gemm's block-scaled FP8 GEMM where a Hopper GPU and the kernels are present.
    gemm: Literal["bf16", "fp8"] = "bf16"
    # Multi-token prediction (V3: one module predicting the token after next); 0 = none.
    n_mtp_layers: int = 0

    def __post_init__(self) -> None:
        positive = ("vocab_size", "dim", "inter_dim", "moe_inter_dim", "n_layers", "n_heads", "kv_lora_rank",
                    "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "max_seq_len", "original_seq_len")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        if not 0 <= self.n_dense_layers <= self.n_layers:
            raise ValueError(f"ModelConfig.n_dense_layers must be in [0, n_layers={self.n_layers}], got {self.n_dense_layers}")
        if not isinstance(self.n_mtp_layers, int) or self.n_mtp_layers < 0:
            raise ValueError(f"ModelConfig.n_mtp_layers must be an int >= 0, got {self.n_mtp_layers!r}")
        if self.q_lora_rank < 0:
            raise ValueError(f"ModelConfig.q_lora_rank must be >= 0 (0 = no query compression), got {self.q_lora_rank}")
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"ModelConfig.qk_rope_head_dim must be even (RoPE rotates pairs), got {self.qk_rope_head_dim}")
        if self.score_func not in ("sigmoid", "softmax"):
            raise ValueError(f"ModelConfig.score_func must be 'sigmoid' or 'softmax', got {self.score_func!r}")
        if self.gemm not in ("bf16", "fp8"):
            raise ValueError(f"ModelConfig.gemm must be 'bf16' or 'fp8', got {self.gemm!r}")
        if self.n_dense_layers < self.n_layers or self.n_mtp_layers:  # MoE layers exist: check the routing shape
            e, g = self.n_routed_experts, self.n_expert_groups
            if e <= 0 or g <= 0 or e % g:
                raise ValueError(f"ModelConfig.n_routed_experts ({e}) must be a positive multiple of n_expert_groups ({g})")
            if not 1 <= self.n_limited_groups <= g:
                raise ValueError(f"ModelConfig.n_limited_groups must be in [1, n_expert_groups={g}], got {self.n_limited_groups}")
            kept = self.n_limited_groups * (e // g)
            if not 1 <= self.n_activated_experts <= kept:
                raise ValueError(f"ModelConfig.n_activated_experts must be in [1, {kept}] (experts in the kept groups), "
                                 f"got {self.n_activated_experts}")
            if g > 1 and self.score_func == "sigmoid" and e // g < 2:
                raise ValueError("group-limited sigmoid routing scores a group by its top-2 experts: "
                                 f"need n_routed_experts / n_expert_groups >= 2, got {e // g}")
            if self.n_shared_experts < 0:
                raise ValueError(f"ModelConfig.n_shared_experts must be >= 0, got {self.n_shared_experts}")

    # --- derived sizes --------------------------------------------------------------------------

    @property
    def qk_head_dim(self) -> int:
        """Per-head query/key width: nope + rope."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_dim(self) -> int:
        """Width of one cached token per layer: ``kv_lora_rank + qk_rope_head_dim`` (576 at V3 size)."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def yarn(self) -> bool:
        """Whether YaRN frequency interpolation (and its attention-scale correction) is on."""
        return self.rope_factor > 1 and self.max_seq_len > self.original_seq_len

    @property
    def softmax_scale(self) -> float:
        """Attention logit scale: ``qk_head_dim ** -0.5``, times YaRN's ``mscale ** 2`` when YaRN is on."""
        scale = self.qk_head_dim ** -0.5
        if self.yarn:
            m = 0.1 * self.mscale * math.log(self.rope_factor) + 1.0
            scale *= m * m
        return scale

    @property
    def n_moe_layers(self) -> int:
        return self.n_layers - self.n_dense_layers

    def kv_cache_bytes_per_token(self, bytes_per_value: int = 2) -> int:
        """Bytes of MLA latent cache per token across all layers (bf16 by default)."""
        return self.n_layers * self.latent_dim * bytes_per_value

    def num_params(self, active: bool = False, mtp: bool = False) -> int:
        """Values stored in a checkpoint (embedding, head and the gates' bias included; the MTP modules
        only with ``mtp=True``, V3's 671B excludes them); ``active=True`` counts only the routed
        experts a token uses, the figure papers quote as "activated parameters"."""
        d, h = self.dim, self.n_heads
        if self.q_lora_rank:
            q = d * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * h * self.qk_head_dim
        else:
            q = d * h * self.qk_head_dim
        kv = d * self.latent_dim + self.kv_lora_rank + self.kv_lora_rank * h * (self.qk_nope_head_dim + self.v_head_dim)
        attn = q + kv + h * self.v_head_dim * d + 2 * d  # + the two block norms
        dense = 3 * d * self.inter_dim
        experts = self.n_activated_experts if active else self.n_routed_experts
        moe = 3 * d * self.moe_inter_dim * (experts + self.n_shared_experts) + self.n_routed_experts * (d + 1)
        body = self.n_layers * attn + self.n_dense_layers * dense + self.n_moe_layers * moe
        if mtp:  # each MTP module: a MoE block, enorm, hnorm, eh_proj [d, 2d] and its final norm
            body += self.n_mtp_layers * (attn + moe + 2 * d * d + 3 * d)
        return body + 2 * self.vocab_size * d + d

    def replace(self, **changes: Any) -> "ModelConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        """Build from a dict of our field names; unknown keys raise ValueError naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {unknown}")
        return cls(**data)

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any], **overrides: Any) -> "ModelConfig":
        """Build from a Hugging Face DeepSeek-V3 ``config.json`` dict (``hidden_size``, ``n_routed_experts``, ...)."""
        try:
            rope = hf.get("rope_scaling") or {}
            fields = dict(
                vocab_size=hf["vocab_size"], dim=hf["hidden_size"], inter_dim=hf["intermediate_size"],
                moe_inter_dim=hf["moe_intermediate_size"], n_layers=hf["num_hidden_layers"],
                n_dense_layers=hf.get("first_k_dense_replace", 0), n_heads=hf["num_attention_heads"],
                n_routed_experts=hf.get("n_routed_experts") or 1, n_shared_experts=hf.get("n_shared_experts") or 0,
                n_activated_experts=hf.get("num_experts_per_tok") or 1, n_expert_groups=hf.get("n_group", 1),
                n_limited_groups=hf.get("topk_group", 1), score_func=hf.get("scoring_func", "sigmoid"),
                route_scale=float(hf.get("routed_scaling_factor", 1.0)), q_lora_rank=hf.get("q_lora_rank") or 0,
                kv_lora_rank=hf["kv_lora_rank"], qk_nope_head_dim=hf["qk_nope_head_dim"],
                qk_rope_head_dim=hf["qk_rope_head_dim"], v_head_dim=hf["v_head_dim"],
                max_seq_len=hf.get("max_position_embeddings", 4096), rope_theta=float(hf.get("rope_theta", 10000.0)),
                norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                n_mtp_layers=int(hf.get("num_nextn_predict_layers") or 0),
            )
        except KeyError as exc:
            raise ValueError(f"Hugging Face config is missing {exc.args[0]!r}") from None
        if rope:
            fields.update(
                rope_factor=float(rope.get("factor", 1.0)),
                original_seq_len=int(rope.get("original_max_position_embeddings", fields["max_seq_len"])),
                beta_fast=int(rope.get("beta_fast", 32)), beta_slow=int(rope.get("beta_slow", 1)),
                mscale=float(rope.get("mscale_all_dim", rope.get("mscale", 1.0))),
            )
        else:
            fields.update(rope_factor=1.0, original_seq_len=fields["max_seq_len"])
        if hf.get("quantization_config", {}).get("quant_method") == "fp8":
            fields["gemm"] = "fp8"
        fields.update(overrides)
        return cls(**fields)

    def to_hf_config(self) -> dict[str, Any]:
        """The Hugging Face ``config.json`` dict that :meth:`from_hf_config` reads back."""
        hf: dict[str, Any] = {
            "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
            "vocab_size": self.vocab_size, "hidden_size": self.dim, "intermediate_size": self.inter_dim,
            "moe_intermediate_size": self.moe_inter_dim, "num_hidden_layers": self.n_layers,
            "first_k_dense_replace": self.n_dense_layers, "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_heads, "n_routed_experts": self.n_routed_experts,
            "n_shared_experts": self.n_shared_experts, "num_experts_per_tok": self.n_activated_experts,
            "n_group": self.n_expert_groups, "topk_group": self.n_limited_groups, "scoring_func": self.score_func,
            "routed_scaling_factor": self.route_scale, "norm_topk_prob": True,
            "q_lora_rank": self.q_lora_rank or None, "kv_lora_rank": self.kv_lora_rank,
            "qk_nope_head_dim": self.qk_nope_head_dim, "qk_rope_head_dim": self.qk_rope_head_dim,
            "v_head_dim": self.v_head_dim, "max_position_embeddings": self.max_seq_len,
            "num_nextn_predict_layers": self.n_mtp_layers,
            "rope_theta": self.rope_theta, "rms_norm_eps": self.norm_eps, "tie_word_embeddings": False,
        }
        if self.rope_factor > 1:
            hf["rope_scaling"] = {
                "type": "yarn", "factor": self.rope_factor, "original_max_position_embeddings": self.original_seq_len,
                "beta_fast": self.beta_fast, "beta_slow": self.beta_slow, "mscale": self.mscale,
                "mscale_all_dim": self.mscale,
            }
        if self.gemm == "fp8":
            hf["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                         "weight_block_size": [128, 128]}
        return hf


# Named sizes. ``tiny`` trains on 2 CPU cores in minutes; ``small`` and ``medium`` are the GPU
# configs (kv_lora 512 + rope 64 so the decode kernel runs at its real 576-wide rows); ``v3`` is the
# published shape, for kernel shapes and memory planning (never instantiated in CI: 671B params).
CONFIGS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(),
    "small": ModelConfig(
        vocab_size=8192, dim=512, inter_dim=1536, moe_inter_dim=256, n_layers=4, n_dense_layers=1, n_heads=4,
        n_routed_experts=16, n_shared_experts=1, n_activated_experts=4, n_expert_groups=4, n_limited_groups=2,
        route_scale=1.0, q_lora_rank=256, kv_lora_rank=512, qk_nope_head_dim=64, qk_rope_head_dim=64,
        v_head_dim=64, max_seq_len=2048,
    ),
    "medium": ModelConfig(
        vocab_size=32768, dim=1024, inter_dim=2816, moe_inter_dim=512, n_layers=8, n_dense_layers=1, n_heads=16,
        n_routed_experts=64, n_shared_experts=1, n_activated_experts=6, n_expert_groups=8, n_limited_groups=3,
        route_scale=2.5, q_lora_rank=768, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
        v_head_dim=128, max_seq_len=4096,
    ),
    "v3": ModelConfig(
        vocab_size=129280, dim=7168, inter_dim=18432, moe_inter_dim=2048, n_layers=61, n_dense_layers=3, n_heads=128,
        n_routed_experts=256, n_shared_experts=1, n_activated_experts=8, n_expert_groups=8, n_limited_groups=4,
        route_scale=2.5, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
        v_head_dim=128, max_seq_len=16384, original_seq_len=4096, rope_factor=40.0, gemm="fp8", n_mtp_layers=1,
    ),
}


def config_names() -> list[str]:
    return list(CONFIGS)


def get_config(name: str, **overrides: Any) -> ModelConfig:
    """The named config (``tiny``, ``small``, ``medium``, ``v3``), optionally with fields replaced."""
    if not isinstance(name, str) or name not in CONFIGS:
        raise ValueError(f"unknown model config {name!r}; choose one of {config_names()}")
    cfg = CONFIGS[name]
    return cfg.replace(**overrides) if overrides else cfg
