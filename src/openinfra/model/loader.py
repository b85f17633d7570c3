"""Checkpoints in DeepSeek-V3's Hugging Face safetensors naming: load into our model, and write them.

The naming (``model.layers.{i}.self_attn.kv_a_proj_with_mqa.weight``, ``mlp.experts.{j}.gate_proj``,
``mlp.gate.e_score_correction_bias``, ...) maps one to one onto our parameters (the table is
:data:`HF_TO_OURS`); per-expert matrices are stacked into our [E, ...] grouped weights. FP8
checkpoints store e4m3 weights with ``weight_scale_inv`` [ceil(N/128), ceil(K/128)] float32 per
128x128 block (value = e4m3 * scale_inv); the loader dequantizes them into the model dtype. Layers
``n_layers .. n_layers + n_mtp_layers - 1`` are the multi-token-prediction modules (V3's layer 61:
``enorm``, ``hnorm``, ``eh_proj``, ``shared_head.norm`` and a MoE block; its ``embed_tokens`` and
``shared_head.head`` are copies of the main ones and are checked, not loaded); layers past those are
skipped and reported.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from pathlib import Path

import torch

from openinfra.model.config import ModelConfig
from openinfra.model.transformer import Transformer

__all__ = ["load_checkpoint", "save_checkpoint", "read_hf_state_dict", "convert_hf_state_dict", "to_hf_state_dict",
           "HF_TO_OURS", "dequantize_block_fp8", "quantize_block_fp8", "LoadReport"]

#: HF module name -> our module name inside a layer (or at the top).
HF_TO_OURS = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn.wq", "self_attn.q_a_proj": "attn.wq_a", "self_attn.q_a_layernorm": "attn.q_norm",
    "self_attn.q_b_proj": "attn.wq_b", "self_attn.kv_a_proj_with_mqa": "attn.wkv_a",
    "self_attn.kv_a_layernorm": "attn.kv_norm", "self_attn.kv_b_proj": "attn.wkv_b", "self_attn.o_proj": "attn.wo",
    "mlp.gate_proj": "ffn.w1", "mlp.down_proj": "ffn.w2", "mlp.up_proj": "ffn.w3",
    "mlp.shared_experts.gate_proj": "ffn.shared_experts.w1", "mlp.shared_experts.down_proj": "ffn.shared_experts.w2",
    "mlp.shared_experts.up_proj": "ffn.shared_experts.w3", "mlp.gate": "ffn.gate",
}
_EXPERT_PROJ = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|e_score_correction_bias)$")
_EXPERT_RE = re.compile(r"^mlp\.experts\.(\d+)\.(gate_proj|down_proj|up_proj)$")
_TOP = {"model.embed_tokens.weight": "embed.weight", "model.norm.weight": "norm.weight", "lm_head.weight": "head.weight"}
#: The MTP layer's own modules (beyond a regular block's), HF name -> ours inside ``mtp.{j}``.
_MTP_OWN = {"enorm": "enorm", "hnorm": "hnorm", "eh_proj": "eh_proj", "shared_head.norm": "norm"}
#: The MTP layer's copies of shared tensors -> the main model's name they must equal.
_MTP_SHARED = {"embed_tokens": "embed.weight", "shared_head.head": "head.weight"}
_BLOCK = 128


class LoadReport(dict):
    """What :func:`load_checkpoint` did: ``skipped`` (HF names not loaded, e.g. the MTP layer),
    ``dequantized`` (FP8 weights turned into the model dtype), ``files``."""


def dequantize_block_fp8(weight: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """e4m3 [N, K] * per-128x128-block ``scale_inv`` [ceil(N/128), ceil(K/128)] -> float32 [N, K]."""
    n, k = weight.shape
    expect = (math.ceil(n / _BLOCK), math.ceil(k / _BLOCK))
    if tuple(scale_inv.shape) != expect:
        raise ValueError(f"weight_scale_inv for a [{n}, {k}] weight must be {list(expect)}, got {list(scale_inv.shape)}")
    s = scale_inv.float().repeat_interleave(_BLOCK, 0)[:n].repeat_interleave(_BLOCK, 1)[:, :k]
    return weight.float() * s


def quantize_block_fp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float [N, K] -> (e4m3 [N, K], scale_inv [ceil(N/128), ceil(K/128)] float32), amax/448 per block."""
    n, k = weight.shape
    pn, pk = math.ceil(n / _BLOCK) * _BLOCK, math.ceil(k / _BLOCK) * _BLOCK
    w = torch.nn.functional.pad(weight.float(), (0, pk - k, 0, pn - n))
    blocks = w.view(pn // _BLOCK, _BLOCK, pk // _BLOCK, _BLOCK)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-4) / 448.0
    q = (blocks / scale[:, None, :, None]).view(pn, pk)[:n, :k].to(torch.float8_e4m3fn)
    return q, scale


def _files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / n for n in names]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {path}")
    return files


def read_hf_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """All tensors of a checkpoint directory, FP8 weights dequantized (float32). Returns (tensors, files)."""
    from safetensors import safe_open

    path = Path(path)
    raw: dict[str, torch.Tensor] = {}
    files = _files(path)
    for f in files:
        with safe_open(str(f), framework="pt", device="cpu") as fh:
            for name in fh.keys():
                raw[name] = fh.get_tensor(name)
    out: dict[str, torch.Tensor] = {}
    for name, t in raw.items():
        if name.endswith("_scale_inv"):
            continue
        if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            scale = raw.get(name + "_scale_inv")
            if scale is None:
                raise ValueError(f"FP8 tensor {name} has no {name}_scale_inv in {path}")
            out[name] = dequantize_block_fp8(t, scale)
            out[name]._oi_fp8 = True  # type: ignore[attr-defined]
        else:
            out[name] = t
    return out, [f.name for f in files]


def convert_hf_state_dict(hf: dict[str, torch.Tensor], cfg: ModelConfig) -> tuple[dict[str, torch.Tensor], list[str]]:
    """HF-named tensors -> our state dict (experts stacked). Returns (state_dict, skipped HF names)."""
    ours: dict[str, torch.Tensor] = {}
    skipped: list[str] = []
    shared: dict[str, str] = {}
    experts: dict[tuple[str, str], dict[int, torch.Tensor]] = defaultdict(dict)
    for name, t in hf.items():
        if name in _TOP:
            ours[_TOP[name]] = t
            continue
        m = _LAYER_RE.match(name)
        if m is None:
            skipped.append(name)
            continue
        layer, module, kind = int(m.group(1)), m.group(2), m.group(3)
        if layer < cfg.n_layers:
            prefix = f"layers.{layer}."
        elif layer < cfg.n_layers + cfg.n_mtp_layers:
            prefix = f"mtp.{layer - cfg.n_layers}.block."
            if module in _MTP_OWN:
                ours[f"mtp.{layer - cfg.n_layers}.{_MTP_OWN[module]}.weight"] = t
                continue
            if module in _MTP_SHARED:
                shared[name] = _MTP_SHARED[module]
                continue
        else:
            skipped.append(name)
            continue
        em = _EXPERT_RE.match(module)
        if em is not None:
            j = int(em.group(1))
            if j >= cfg.n_routed_experts:
                raise ValueError(f"{name}: expert {j} is past n_routed_experts={cfg.n_routed_experts}")
            experts[(prefix, _EXPERT_PROJ[em.group(2)])][j] = t
            continue
        if module not in HF_TO_OURS:
            skipped.append(name)
            continue
        suffix = "bias" if kind == "e_score_correction_bias" else "weight"
        ours[f"{prefix}{HF_TO_OURS[module]}.{suffix}"] = t
    for (prefix, proj), per_expert in experts.items():
        missing = [j for j in range(cfg.n_routed_experts) if j not in per_expert]
        if missing:
            raise ValueError(f"{prefix}{proj}: experts {missing[:8]} missing from the checkpoint")
        ours[f"{prefix}ffn.experts.{proj}"] = torch.stack([per_expert[j] for j in range(cfg.n_routed_experts)])
    for name, main in shared.items():  # the MTP layer's copies must be the main model's tensors
        if main in ours and not torch.equal(hf[name].to(ours[main].dtype), ours[main]):
            raise ValueError(f"{name} differs from the main model's {main}; this model shares them")
    return ours, skipped


def load_checkpoint(path: str | Path, cfg: ModelConfig | None = None, dtype: torch.dtype = torch.float32,
                    device: torch.device | str = "cpu", strict: bool = True) -> tuple[Transformer, LoadReport]:
    """Build a :class:`Transformer` from a DeepSeek-V3-named safetensors directory.

    Args:
        path: directory with ``*.safetensors`` (and ``model.safetensors.index.json``, ``config.json``).
        cfg: the model config; read from ``config.json`` when omitted.
        dtype, device: where the parameters end up (the gate bias stays float32).
        strict: missing or unexpected parameters raise ValueError naming them.

    Returns:
        ``(model, report)``.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    if cfg is None:
        cfg_file = path / "config.json"
        if not cfg_file.exists():
            raise ValueError(f"no config.json in {path}: pass cfg=")
        cfg = ModelConfig.from_hf_config(json.loads(cfg_file.read_text()))
    hf, files = read_hf_state_dict(path)
    dequantized = sorted(n for n, t in hf.items() if getattr(t, "_oi_fp8", False))
    state, skipped = convert_hf_state_dict(hf, cfg)
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if strict and (missing or unexpected):
        raise ValueError(f"checkpoint does not match the config: missing {missing[:10]}, unexpected {unexpected[:10]}")
    for name, t in state.items():
        if name in expected and tuple(t.shape) != tuple(expected[name].shape):
            raise ValueError(f"{name}: checkpoint shape {tuple(t.shape)} != model shape {tuple(expected[name].shape)}")
    model = model.to_empty(device=device).to(dtype)
    with torch.no_grad():
        _reset_buffers(model, device)
        params = dict(model.state_dict(keep_vars=True))
        for name, t in state.items():
            if name in params:
                params[name].copy_(t.to(params[name].dtype))
    return model, LoadReport(skipped=skipped, dequantized=dequantized, files=files)


def _reset_buffers(model: Transformer, device) -> None:
    """Buffers that are not in the checkpoint (recomputed, not loaded) after ``to_empty``."""
    from openinfra.model.rope import rope_frequencies

    model.rope_freqs = rope_frequencies(model.cfg).to(device)
    for moe in model.moe_layers():
        if moe.gate.bias is not None:
            moe.gate.bias.zero_()  # overwritten by the checkpoint's e_score_correction_bias
        moe.gate.load.zero_()


def to_hf_state_dict(model: Transformer, fp8: bool = False) -> dict[str, torch.Tensor]:
    """Our parameters under DeepSeek-V3's names; ``fp8=True`` stores 2-D projection weights as e4m3
    with ``weight_scale_inv`` (as the released checkpoint does: not embeddings, norms, gate or head)."""
    cfg = model.cfg
    ours_to_hf = {v: k for k, v in HF_TO_OURS.items()}
    top = {v: k for k, v in _TOP.items()}
    out: dict[str, torch.Tensor] = {}

    def put(name: str, t: torch.Tensor, quantizable: bool) -> None:
        t = t.detach().cpu().contiguous()
        if fp8 and quantizable and t.dim() == 2:
            q, s = quantize_block_fp8(t)
            out[name], out[name + "_scale_inv"] = q, s
        else:
            out[name] = t

    for name, t in model.state_dict().items():
        if name in top:
            put(top[name], t, False)
            continue
        mt = re.match(r"^mtp\.(\d+)\.(enorm|hnorm|eh_proj|norm)\.weight$", name)
        if mt is not None:
            hf_own = {v: k for k, v in _MTP_OWN.items()}[mt.group(2)]
            put(f"model.layers.{cfg.n_layers + int(mt.group(1))}.{hf_own}.weight", t, mt.group(2) == "eh_proj")
            continue
        m = re.match(r"^layers\.(\d+)\.(.+)\.(weight|bias|w1|w2|w3)$", name)
        mb = re.match(r"^mtp\.(\d+)\.block\.(.+)\.(weight|bias|w1|w2|w3)$", name)
        if m is None and mb is None:
            raise ValueError(f"no DeepSeek-V3 name for parameter {name}")
        if m is not None:
            layer, module, kind = m.groups()
        else:
            layer, module, kind = str(cfg.n_layers + int(mb.group(1))), mb.group(2), mb.group(3)
        if module == "ffn.experts":
            hf_proj = {v: k for k, v in _EXPERT_PROJ.items()}[kind]
            for j in range(cfg.n_routed_experts):
                put(f"model.layers.{layer}.mlp.experts.{j}.{hf_proj}.weight", t[j], True)
            continue
        hf_module = ours_to_hf[module]
        if kind == "bias":
            out[f"model.layers.{layer}.{hf_module}.e_score_correction_bias"] = t.detach().cpu().float().contiguous()
        else:
            put(f"model.layers.{layer}.{hf_module}.weight", t, "norm" not in module and module != "ffn.gate")
    sd = model.state_dict()
    for j in range(cfg.n_mtp_layers):  # V3's MTP layer carries copies of the shared embedding and head
        for hf_name, main in _MTP_SHARED.items():
            out[f"model.layers.{cfg.n_layers + j}.{hf_name}.weight"] = sd[main].detach().cpu().clone()  # own storage: safetensors refuses aliases
    return out


def save_checkpoint(model: Transformer, path: str | Path, fp8: bool = False, max_shard_bytes: int = 2 * 2**30) -> list[Path]:
    """Write ``config.json``, ``model-0000i-of-0000n.safetensors`` shards and their index."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = to_hf_state_dict(model, fp8)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if size and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    files, weight_map = [], {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path / fname), metadata={"format": "pt"})
        files.append(path / fname)
        weight_map.update({n: fname for n in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (path / "config.json").write_text(json.dumps(model.cfg.replace(gemm="fp8" if fp8 else model.cfg.gemm).to_hf_config(), indent=2))
    return files
