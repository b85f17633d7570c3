"""The training job: DualPipeV over gloo ranks equals the single-process loop; resume repeats the
loss curve; EPLB plans from observed loads; the final checkpoint serves."""

import pytest
import torch

from openinfra.training.job import TrainConfig, train

SMALL = dict(batch_size=8, seq_len=16, num_chunks=8, n_layers=4, lr=1e-2)


def _tokens():
    g = torch.Generator().manual_seed(7)
    return torch.randint(0, 256, (4096,), generator=g)


@pytest.mark.distributed
def test_dualpipev_pp2_matches_single_process():
    tokens = _tokens()
    single = train(TrainConfig(steps=3, pp=1, eplb_every=3, **SMALL), tokens)
    piped = train(TrainConfig(steps=3, pp=2, eplb_every=3, **SMALL), tokens, timeout=600)
    assert single["losses"][0] == piped["losses"][0]  # same weights, same batch: bitwise
    # later steps go through AdamW on gradients accumulated in a different order
    assert piped["losses"] == pytest.approx(single["losses"], rel=1e-5)
    assert single["losses"][-1] < single["losses"][0]
    # the EPLB plan's rows are model layers in order, whichever pipeline rank holds them (rank 0
    # holds layers 0 and 3, rank 1 layers 1 and 2)
    assert piped["eplb"][-1]["phy2log"] == single["eplb"][-1]["phy2log"]


def _assert_export_equals_single_run(tmp_path, tokens, kw: dict, **parallel) -> None:
    """The final export of a parallel run puts every stage and every rank's experts back in place.
    Compared after one step at a learning rate too small to move a weight by 1e-7: after real AdamW
    steps, weights whose gradients are ~0 move by up to lr either way on rounding noise alone."""
    from openinfra.model.loader import load_checkpoint

    kw = dict(kw, lr=1e-9)
    a, _ = load_checkpoint(train(TrainConfig(steps=1, checkpoint_dir=str(tmp_path / "one"), **kw), tokens)["final_checkpoint"])
    b, _ = load_checkpoint(train(TrainConfig(steps=1, checkpoint_dir=str(tmp_path / "parallel"), **parallel, **kw), tokens,
                                 timeout=600)["final_checkpoint"])
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], rtol=0, atol=1e-7, msg=k)


@pytest.mark.distributed
def test_expert_parallel_ep2_matches_single_process(tmp_path):
    """ep = 2 gloo ranks, each with half the routed experts and half of every step's micro-batches,
    tokens moved by DeepEP dispatch / combine: the same losses as one process on the whole batch
    (same micro-batches), the same EPLB loads, and a final checkpoint with every expert in place."""
    tokens = _tokens()
    # EPLB every step: the EP run re-places its experts over the 2 ranks after every step (weights
    # and AdamW moments moved), which must not change what it computes
    kw = dict(SMALL, num_chunks=2, eplb_every=1)
    single = train(TrainConfig(steps=4, pp=1, **kw), tokens)
    ep = train(TrainConfig(steps=4, ep=2, **kw), tokens, timeout=600)
    # the MoE outputs are summed in another order (combine at the origin), so not bitwise
    assert ep["losses"] == pytest.approx(single["losses"], rel=1e-5)
    assert single["losses"][-1] < single["losses"][0]
    assert sum(p["ep_experts_moved"] for p in ep["eplb"][:-1]) > 0  # the placements did move experts
    assert ep["eplb"][-1]["tokens"] == single["eplb"][-1]["tokens"] > 0
    assert ep["eplb"][-1]["gpu_loads_after"] == single["eplb"][-1]["gpu_loads_after"]
    assert ep["eplb"][-1]["phy2log"] == single["eplb"][-1]["phy2log"]
    _assert_export_equals_single_run(tmp_path, tokens, kw, ep=2)


@pytest.mark.distributed
def test_pipeline_and_expert_parallel_pp2_ep2_matches_single_process(tmp_path):
    """4 gloo ranks: two DualPipeV pipelines of 2 ranks, each pipeline index an EP group of 2 (the
    same stages, experts split): the same losses as one process over the same 8 micro-batches, and
    a final checkpoint with every stage and expert in place."""
    tokens = _tokens()
    kw = dict(SMALL, eplb_every=1)  # experts re-placed over each EP group after every step
    single = train(TrainConfig(steps=3, pp=1, **kw), tokens)
    both = train(TrainConfig(steps=3, pp=2, ep=2, **kw), tokens, timeout=600)
    assert both["losses"] == pytest.approx(single["losses"], rel=1e-5)
    assert both["eplb"][-1]["phy2log"] == single["eplb"][-1]["phy2log"]  # loads summed over EP, in layer order
    _assert_export_equals_single_run(tmp_path, tokens, kw, pp=2, ep=2)


@pytest.mark.unit
def test_resume_after_a_crash_repeats_the_loss_curve(tmp_path):
    tokens = _tokens()
    straight = train(TrainConfig(steps=4, pp=1, **SMALL), tokens)
    ckpt = tmp_path / "ckpt"
    crashed = train(TrainConfig(steps=4, pp=1, checkpoint_dir=str(ckpt), checkpoint_every=2, stop_after_step=2, **SMALL), tokens)
    assert len(crashed["losses"]) == 3 and (ckpt / "latest").read_text() == "1"
    resumed = train(TrainConfig(steps=4, pp=1, checkpoint_dir=str(ckpt), checkpoint_every=2, resume=True, **SMALL), tokens)
    assert resumed["start_step"] == 2
    assert resumed["losses"] == straight["losses"]  # bit for bit, including the two replayed steps
    assert resumed["final_checkpoint"] is not None


@pytest.mark.unit
def test_eplb_plans_from_observed_loads_and_final_checkpoint_serves(tmp_path):
    from openinfra.model.loader import load_checkpoint
    from openinfra.serving.engine import Engine

    result = train(TrainConfig(steps=2, pp=1, eplb_every=1, ep_gpus=4, checkpoint_dir=str(tmp_path), **SMALL), _tokens())
    plan = result["eplb"][-1]
    assert plan["tokens"] > 0 and plan["replicas"] % 4 == 0
    assert plan["balancedness_after"] >= plan["balancedness_before"]
    model, _ = load_checkpoint(result["final_checkpoint"])
    out = Engine(model, num_blocks=4, page_size=16).generate([[1, 2, 3]], max_tokens=2)
    assert len(out[0]) == 2


@pytest.mark.unit
@pytest.mark.parametrize("kwargs, word", [
    (dict(steps=0), "steps"), (dict(batch_size=6, num_chunks=4), "divisible"),
    (dict(pp=2, n_layers=2), "stages"), (dict(lr=0.0), "lr"),
    (dict(ep=3, batch_size=6), "n_routed_experts"), (dict(pp=2, n_layers=4, num_chunks=2), "DualPipeV needs"),
    (dict(pp=2, ep=2, n_layers=4, num_chunks=4), "for ep=2 pipelines"),
    (dict(ep=2, batch_size=6, num_chunks=3), "divisible by ep"), (dict(ep=0), "ep"),
])
def test_bad_config_is_named(kwargs, word):
    with pytest.raises(ValueError, match=word):
        TrainConfig(**kwargs).validate()
