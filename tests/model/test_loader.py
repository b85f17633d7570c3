"""The safetensors loader: DeepSeek-V3 naming, FP8 block dequantization, round trips."""

import json

import pytest
import torch
from safetensors.torch import save_file

from openinfra.model import Transformer, get_config
from openinfra.model.loader import (dequantize_block_fp8, load_checkpoint, quantize_block_fp8, save_checkpoint,
                                    to_hf_state_dict)

pytestmark = pytest.mark.unit


def _cfg():
    return get_config("tiny", n_layers=3, n_dense_layers=1, dim=64, inter_dim=96, moe_inter_dim=32, n_routed_experts=4,
                      n_activated_experts=2, n_expert_groups=2, n_limited_groups=1, n_heads=2, q_lora_rank=0)


def _hand_written_checkpoint(cfg, path, g):
    """Tensors named exactly as in DeepSeek-V3's released checkpoint, written without our saver."""
    d, h = cfg.dim, cfg.n_heads
    t = {"model.embed_tokens.weight": torch.randn(cfg.vocab_size, d, generator=g),
         "model.norm.weight": torch.rand(d, generator=g), "lm_head.weight": torch.randn(cfg.vocab_size, d, generator=g)}
    for i in range(cfg.n_layers + 1):  # + one layer past n_layers, like V3's MTP layer 61
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = torch.rand(d, generator=g)
        t[p + "post_attention_layernorm.weight"] = torch.rand(d, generator=g)
        t[p + "self_attn.q_proj.weight"] = torch.randn(h * cfg.qk_head_dim, d, generator=g)
        t[p + "self_attn.kv_a_proj_with_mqa.weight"] = torch.randn(cfg.latent_dim, d, generator=g)
        t[p + "self_attn.kv_a_layernorm.weight"] = torch.rand(cfg.kv_lora_rank, generator=g)
        t[p + "self_attn.kv_b_proj.weight"] = torch.randn(h * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank, generator=g)
        t[p + "self_attn.o_proj.weight"] = torch.randn(d, h * cfg.v_head_dim, generator=g)
        if i < cfg.n_dense_layers:
            for proj, shape in (("gate_proj", (cfg.inter_dim, d)), ("up_proj", (cfg.inter_dim, d)), ("down_proj", (d, cfg.inter_dim))):
                t[p + f"mlp.{proj}.weight"] = torch.randn(*shape, generator=g)
        else:
            t[p + "mlp.gate.weight"] = torch.randn(cfg.n_routed_experts, d, generator=g)
            t[p + "mlp.gate.e_score_correction_bias"] = torch.randn(cfg.n_routed_experts, generator=g)
            for j in range(cfg.n_routed_experts):
                for proj, shape in (("gate_proj", (cfg.moe_inter_dim, d)), ("up_proj", (cfg.moe_inter_dim, d)),
                                    ("down_proj", (d, cfg.moe_inter_dim))):
                    t[p + f"mlp.experts.{j}.{proj}.weight"] = torch.randn(*shape, generator=g)
            for proj, shape in (("gate_proj", (cfg.moe_inter_dim, d)), ("up_proj", (cfg.moe_inter_dim, d)),
                                ("down_proj", (d, cfg.moe_inter_dim))):
                t[p + f"mlp.shared_experts.{proj}.weight"] = torch.randn(*shape, generator=g)
    # FP8 on one projection, as the release stores them: e4m3 + 128x128 weight_scale_inv
    name = "model.layers.1.self_attn.kv_b_proj.weight"
    q, s = quantize_block_fp8(t[name])
    fp8_value = dequantize_block_fp8(q, s)
    t[name], t[name + "_scale_inv"] = q, s
    half = sorted(t)
    save_file({k: t[k] for k in half[::2]}, str(path / "a.safetensors"))
    save_file({k: t[k] for k in half[1::2]}, str(path / "b.safetensors"))
    (path / "config.json").write_text(json.dumps(cfg.to_hf_config()))
    return t, fp8_value


def test_loads_a_hand_written_deepseek_v3_checkpoint(tmp_path):
    cfg = _cfg()
    t, fp8_value = _hand_written_checkpoint(cfg, tmp_path, torch.Generator().manual_seed(0))
    model, report = load_checkpoint(tmp_path)
    assert model.cfg == cfg
    assert report["dequantized"] == ["model.layers.1.self_attn.kv_b_proj.weight"]
    assert report["skipped"] and all(n.startswith("model.layers.3.") for n in report["skipped"])
    sd = model.state_dict()
    assert torch.equal(sd["embed.weight"], t["model.embed_tokens.weight"])
    assert torch.equal(sd["layers.0.ffn.w3.weight"], t["model.layers.0.mlp.up_proj.weight"])
    assert torch.equal(sd["layers.2.attn.wq.weight"], t["model.layers.2.self_attn.q_proj.weight"])
    assert torch.equal(sd["layers.2.ffn.experts.w2"][3], t["model.layers.2.mlp.experts.3.down_proj.weight"])
    assert torch.equal(sd["layers.1.ffn.gate.bias"], t["model.layers.1.mlp.gate.e_score_correction_bias"])
    assert torch.equal(sd["layers.1.ffn.shared_experts.w1.weight"], t["model.layers.1.mlp.shared_experts.gate_proj.weight"])
    assert torch.equal(sd["layers.1.attn.wkv_b.weight"], fp8_value)
    logits = model(torch.randint(0, cfg.vocab_size, (1, 5)))
    assert torch.isfinite(logits).all()


def _e4m3_half_step(w: torch.Tensor) -> torch.Tensor:
    """Per element of ``w`` [..., N, K]: the most e4m3 rounding can move it with the loader's scales.
    Each 128x128 block is scaled by amax/448 (clamped as the loader does) onto [-448, 448], where
    e4m3's steps are at most 32 (between 256 and 448); round-to-nearest moves a value by at most
    half of that, 16 times its block's scale. fp64 from float32 data."""
    n, k = w.shape[-2:]
    pn, pk = -(-n // 128) * 128, -(-k // 128) * 128
    blocks = torch.nn.functional.pad(w.double().abs(), (0, pk - k, 0, pn - n))
    amax = blocks.view(*w.shape[:-2], pn // 128, 128, pk // 128, 128).amax(dim=(-3, -1))
    scale = (amax.float().clamp(min=1e-4) / 448.0).double()
    return 16 * scale.repeat_interleave(128, -2)[..., :n, :].repeat_interleave(128, -1)[..., :k]


@pytest.mark.parametrize("fp8", [False, True])
def test_save_load_round_trip(tmp_path, fp8):
    cfg = get_config("tiny", dim=128, q_lora_rank=128, kv_lora_rank=128, moe_inter_dim=128, inter_dim=256)
    torch.manual_seed(0)
    model = Transformer(cfg)
    for m in model.moe_layers():
        m.gate.bias.normal_()
    files = save_checkpoint(model, tmp_path, fp8=fp8, max_shard_bytes=300_000)
    assert len(files) > 1 and (tmp_path / "model.safetensors.index.json").exists()
    loaded, report = load_checkpoint(tmp_path)
    assert bool(report["dequantized"]) == fp8
    tokens = torch.randint(0, cfg.vocab_size, (2, 7))
    a, b = model.state_dict(), loaded.state_dict()
    assert set(a) == set(b)
    for k in a:
        if fp8 and a[k].dim() >= 2 and "embed" not in k and "head" not in k and "gate" not in k:
            # e4m3 keeps 3 mantissa bits: each value within half an e4m3 step at its 128x128 block's
            # scale (the 2**-20 covers float32 rounding of w / scale and e4m3 * scale, nothing more)
            err = (a[k].double() - b[k].double()).abs()
            assert bool((err <= _e4m3_half_step(a[k]) * (1 + 2**-20)).all()), (k, float(err.max()))
        else:
            assert torch.equal(a[k], b[k]), k
    if not fp8:
        torch.testing.assert_close(loaded(tokens), model(tokens), rtol=0, atol=0)


def test_fp8_block_quantization_and_names():
    w = torch.randn(200, 300)
    q, s = quantize_block_fp8(w)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (2, 3)
    back = dequantize_block_fp8(q, s)
    # half an e4m3 step at the block's scale: steps are at most 32 scale units (values in [256, 448])
    assert ((back - w).abs() <= s.repeat_interleave(128, 0)[:200].repeat_interleave(128, 1)[:, :300] * 16 * (1 + 2**-20)).all()
    with pytest.raises(ValueError, match="weight_scale_inv"):
        dequantize_block_fp8(q, s[:1])
    names = to_hf_state_dict(Transformer(get_config("tiny")))
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in names
    assert "model.layers.0.self_attn.kv_a_proj_with_mqa.weight" in names
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in names


def test_loader_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_checkpoint(tmp_path, cfg=get_config("tiny"))
    save_file({"model.norm.weight": torch.ones(64)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match="config.json"):
        load_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="missing"):
        load_checkpoint(tmp_path, cfg=get_config("tiny"))


def test_round_trip_with_multi_token_prediction_layer(tmp_path):
    cfg = get_config("tiny", n_mtp_layers=1)
    torch.manual_seed(0)
    model = Transformer(cfg)
    save_checkpoint(model, tmp_path)
    names = set(json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"])
    n = cfg.n_layers  # V3 numbering: the MTP layer follows the main stack (layer 61 at V3 size)
    for own in ("enorm", "hnorm", "eh_proj", "shared_head.norm", "shared_head.head", "embed_tokens",
                "self_attn.kv_b_proj", "mlp.gate"):
        assert f"model.layers.{n}.{own}.weight" in names, own
    loaded, report = load_checkpoint(tmp_path)
    assert loaded.cfg.n_mtp_layers == 1 and not report["skipped"]
    a, b = model.state_dict(), loaded.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    tokens = torch.randint(0, cfg.vocab_size, (1, 9))
    torch.testing.assert_close(loaded.mtp_logits(tokens)[0], model.mtp_logits(tokens)[0], rtol=0, atol=0)
    # the MTP layer's head copy must equal the main head
    from safetensors.torch import load_file
    shard = next(f for f in tmp_path.glob("*.safetensors") if f"model.layers.{n}.shared_head.head.weight" in load_file(str(f)))
    tensors = load_file(str(shard))
    tensors[f"model.layers.{n}.shared_head.head.weight"] += 1
    save_file(tensors, str(shard))
    with pytest.raises(ValueError, match="differs from the main model"):
        load_checkpoint(tmp_path)
