"""A tiny model trains on CPU in seconds; expert load is tracked; the bias update runs in the loop."""

import pytest
import torch

from openinfra.model import Transformer, get_config

pytestmark = pytest.mark.unit


def test_tiny_model_trains_and_tracks_expert_load():
    torch.manual_seed(0)
    cfg = get_config("tiny")
    model = Transformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, 64, (4, 8), generator=g).repeat(1, 5)[:, :33]  # periodic: learnable in-context
    losses = []
    for _ in range(30):
        loss = model.loss(data[:, :-1], data[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        load = model.expert_load()
        model.update_router_bias(rate=1e-3)
    assert losses[0] > 5.5  # ~ln(512) at init
    assert losses[-1] < 0.5 * losses[0] and losses[-1] < 1.0, losses
    # one MoE layer, 4*32 tokens x 2 experts each routed in the last step
    assert load.shape == (cfg.n_moe_layers, cfg.n_routed_experts) and int(load.sum()) == 4 * 32 * 2
    assert int(model.expert_load().sum()) == 0  # update_router_bias consumed the tracked load
    bias = model.moe_layers()[0].gate.bias
    assert bias.dtype == torch.float32 and bias.abs().max() > 0


def test_bf16_model_keeps_fp32_router_bias_and_rope():
    cfg = get_config("tiny")
    model = Transformer(cfg).to(torch.bfloat16)
    assert model.rope_freqs.dtype == torch.float32
    assert all(m.gate.bias.dtype == torch.float32 for m in model.moe_layers())
    logits = model(torch.randint(0, cfg.vocab_size, (2, 9)))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


def test_phase_annotations_appear_in_a_profile():
    from torch.profiler import profile

    cfg = get_config("tiny")
    model = Transformer(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 16))
    with profile() as prof:
        model.loss(tokens, tokens).backward()
    names = {e.name for e in prof.events()}
    for p in ("attn", "mlp", "dispatch", "combine"):
        assert f"openinfra:{p}" in names


@pytest.mark.parametrize("name_kw", [dict(), dict(q_lora_rank=0, n_dense_layers=0, n_expert_groups=1, n_limited_groups=1)])
def test_model_equals_plain_pytorch_reference(name_kw):
    from openinfra.model.reference import plain_forward, plain_loss

    torch.manual_seed(0)
    model = Transformer(get_config("tiny", **name_kw)).double()
    for m in model.moe_layers():
        m.gate.bias.normal_(std=0.05)
    tokens = torch.randint(0, 512, (2, 12))
    torch.testing.assert_close(model(tokens), plain_forward(model, tokens), rtol=1e-10, atol=1e-10)
    model.loss(tokens, tokens).backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    plain_loss(model, tokens, tokens).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(ours[n], p.grad, rtol=1e-9, atol=1e-10, msg=n)


def test_multi_token_prediction_depths_are_causal_and_train():
    torch.manual_seed(0)
    cfg = get_config("tiny", n_mtp_layers=2)
    model = Transformer(cfg).double()  # float64: expert batch sizes shift with routing, rounding with them
    tokens = torch.randint(0, 64, (2, 12))
    logits = model.mtp_logits(tokens)
    assert [tuple(lg.shape) for lg in logits] == [(2, 11, cfg.vocab_size), (2, 10, cfg.vocab_size)]
    # depth k at position i sees tokens up to i + k only
    changed = tokens.clone()
    changed[:, 8] = (changed[:, 8] + 1) % 64
    after = model.mtp_logits(changed)
    for k, (a, b) in enumerate(zip(logits, after), start=1):
        cut = 8 - k  # positions < cut never see token 8
        torch.testing.assert_close(a[:, :cut], b[:, :cut], rtol=0, atol=1e-12)
        assert not torch.allclose(a[:, cut], b[:, cut])
    assert len(model.moe_layers()) == cfg.n_moe_layers + 2  # the MTP blocks are MoE blocks too
    model = model.float()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = torch.randint(0, 64, (4, 8), generator=torch.Generator().manual_seed(1)).repeat(1, 5)[:, :33]
    first = None
    for _ in range(25):
        loss = model.loss(data[:, :-1], data[:, 1:], mtp_weight=0.3)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    mtp_ce = torch.nn.functional.cross_entropy(model.mtp_logits(data[:, :-1])[0].flatten(0, 1), data[:, 2:].flatten())
    assert loss.item() < 0.5 * first and mtp_ce.item() < 2.0, (first, loss.item(), mtp_ce.item())
    assert model.mtp[0].eh_proj.weight.grad is not None
    with pytest.raises(ValueError, match="n_mtp_layers"):
        Transformer(get_config("tiny")).loss(data[:, :-1], data[:, 1:], mtp_weight=0.3)
