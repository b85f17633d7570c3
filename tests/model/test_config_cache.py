"""Named configs, validation, HF config round trip; the page allocator and KV cache manager."""

import pytest
import torch

from openinfra.model import BlockAllocator, KVCacheManager, ModelConfig, PagedMLACache, config_names, get_config

pytestmark = pytest.mark.unit


def test_named_configs():
    assert config_names()[0] == "tiny" and config_names()[-1] == "v3"
    v3 = get_config("v3")
    # DeepSeek-V3: 671B parameters, 37B activated (without the 14B multi-token-prediction module)
    assert v3.num_params() == pytest.approx(671e9, rel=0.01)
    assert v3.num_params(active=True) == pytest.approx(37e9, rel=0.03)
    # the released checkpoint: 685B with the MTP module and its stored copies of embedding and head
    assert v3.num_params(mtp=True) + 2 * v3.vocab_size * v3.dim == pytest.approx(685e9, rel=0.005)
    assert v3.kv_cache_bytes_per_token() == 61 * 576 * 2
    for name in ("small", "medium", "v3"):  # GPU configs keep the decode kernel's width
        cfg = get_config(name)
        assert (cfg.kv_lora_rank, cfg.qk_rope_head_dim) == (512, 64)
    assert get_config("tiny", n_layers=3).n_layers == 3


def test_hf_config_round_trip():
    for name in config_names():
        cfg = get_config(name)
        assert ModelConfig.from_hf_config(cfg.to_hf_config()) == cfg
    assert ModelConfig.from_dict(get_config("small").to_dict()) == get_config("small")


@pytest.mark.parametrize("bad,match", [
    (dict(dim=0), "dim"), (dict(n_dense_layers=5), "n_dense_layers"), (dict(qk_rope_head_dim=7), "even"),
    (dict(n_routed_experts=6, n_expert_groups=4), "multiple"), (dict(n_limited_groups=3), "n_limited_groups"),
    (dict(n_activated_experts=5), "n_activated_experts"), (dict(score_func="relu"), "score_func"),
    (dict(gemm="int4"), "gemm"),
])
def test_config_validation(bad, match):
    with pytest.raises(ValueError, match=match):
        get_config("tiny", **bad)


def test_config_name_and_field_errors():
    with pytest.raises(ValueError, match="unknown model config"):
        get_config("huge")
    with pytest.raises(ValueError, match="unknown ModelConfig fields"):
        ModelConfig.from_dict({"dims": 3})
    with pytest.raises(ValueError, match="missing"):
        ModelConfig.from_hf_config({"vocab_size": 3})


def test_block_allocator():
    a = BlockAllocator(4)
    assert a.allocate(2) == [0, 1] and a.num_free == 2
    with pytest.raises(RuntimeError, match="out of pages"):
        a.allocate(3)
    assert a.num_free == 2  # a failed allocation takes nothing
    a.free([0])
    assert a.allocate(1) == [0]
    with pytest.raises(ValueError, match="double free"):
        a.free([3])


def test_kv_cache_manager_pages_and_batch():
    cfg = get_config("tiny")
    cache = PagedMLACache(cfg, num_blocks=6, page_size=4, dtype=torch.float32)
    assert cache.k_cache(1).shape == (6, 4, 1, cfg.latent_dim)
    mgr = KVCacheManager(cache)
    mgr.add("a")
    mgr.add("b")
    mgr.reserve("a", 9)  # 3 pages
    mgr.reserve("b", 1)
    mgr.advance(["a", "b"], [9, 1])
    batch = mgr.batch(["a", "b"])
    assert batch.block_table.tolist() == [[0, 1, 2], [3, 0, 0]]
    assert batch.cache_seqlens.tolist() == [9, 1]
    with pytest.raises(ValueError, match="reserve"):
        mgr.advance(["b"], 4)
    mgr.free("a")
    assert cache.allocator.num_free == 5
    with pytest.raises(KeyError):
        mgr.length("a")
    with pytest.raises(ValueError, match="already exists"):
        mgr.add("b")
    rows = torch.arange(2 * cfg.latent_dim, dtype=torch.float32).view(1, 2, -1)
    cache.write(0, torch.tensor([[3, 4]]), torch.tensor([[3, 4]]), rows[..., : cfg.kv_lora_rank], rows[..., cfg.kv_lora_rank:])
    assert torch.equal(cache.gather(0, torch.tensor([[3, 4]]), 5)[0, 3:], rows[0])


def test_forward_refuses_to_write_past_reserved_pages():
    from openinfra.model import Transformer

    cfg = get_config("tiny")
    model = Transformer(cfg)
    mgr = KVCacheManager(PagedMLACache(cfg, num_blocks=4, page_size=4, dtype=torch.float32))
    mgr.add("a")
    mgr.add("b")
    mgr.reserve("a", 8)
    mgr.reserve("b", 4)  # one full page
    mgr.advance(["b"], 4)
    with pytest.raises(ValueError, match="request 1: writing tokens 4..5"):
        model(torch.zeros(2, 2, dtype=torch.long), cache=mgr.batch(["a", "b"]))
    mgr.reserve("b", 2)
    model(torch.zeros(2, 2, dtype=torch.long), cache=mgr.batch(["a", "b"]))


def test_reads_deepseek_v3_config_json():
    """The fields of DeepSeek-V3's published config.json (as released with the checkpoint)."""
    hf = {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "first_k_dense_replace": 3,
        "hidden_act": "silu", "hidden_size": 7168, "intermediate_size": 18432, "kv_lora_rank": 512,
        "max_position_embeddings": 163840, "moe_intermediate_size": 2048, "moe_layer_freq": 1, "n_group": 8,
        "n_routed_experts": 256, "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 128,
        "num_experts_per_tok": 8, "num_hidden_layers": 61, "num_key_value_heads": 128,
        "num_nextn_predict_layers": 1, "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
        "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                "weight_block_size": [128, 128]},
        "rms_norm_eps": 1e-06, "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid",
        "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                         "original_max_position_embeddings": 4096, "type": "yarn"},
        "tie_word_embeddings": False, "topk_group": 4, "topk_method": "noaux_tc", "v_head_dim": 128,
        "vocab_size": 129280,
    }
    cfg = ModelConfig.from_hf_config(hf)
    assert cfg == get_config("v3", max_seq_len=163840)
    assert cfg.yarn and cfg.gemm == "fp8" and cfg.n_mtp_layers == 1
