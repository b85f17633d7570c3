"""The training job: a small DeepSeek-V3 trained with DualPipeV across pipeline ranks, or with
its routed experts spread over expert-parallel ranks (DeepEP dispatch / combine).

One function, :func:`train_worker`, is what every rank runs (``torchrun`` on real machines sets
RANK / WORLD_SIZE; :func:`train` spawns local gloo ranks). With ``pp == ep == 1`` it is the plain
single-process loop over the same stage code, which is also the oracle the pipelined and the
expert-parallel runs must match. Expert parallelism (``ep > 1``, :mod:`.expert_parallel`): EP
index e runs micro-batches ``[e * C / ep, (e + 1) * C / ep)`` of the step's C through a replica of
the non-expert weights and its ``E / ep`` routed experts; replicated gradients and the gates' expert
loads are summed over the EP group. Both together: ``pp * ep`` ranks, ranks ``e * pp ... e * pp +
pp - 1`` are pipeline e (DualPipeV over its share of the micro-batches), and the ranks at one
pipeline index are an EP group (the same two stages, their experts split ``ep`` ways).

Per step: the batch for ``step`` (recomputable, see :mod:`openinfra.training.data`) is split into
micro-batches and run through DualPipeV (rank r holds stages r and 2·pp−1−r of a 2·pp-stage cut);
AdamW updates each rank's own parameters; every MoE gate nudges its selection bias toward balance
(aux-loss-free balancing); every ``eplb_every`` steps the expert loads observed since the last plan
are gathered and EPLB computes an expert placement for ``ep_gpus`` GPUs, reporting balancedness
before and after; every ``checkpoint_every`` steps each rank writes its stages and optimizer state.
A killed run restarted with ``resume=True`` continues from the last checkpoint and repeats the same
loss curve bit for bit. At the end rank 0 writes the whole model in DeepSeek-V3's safetensors naming
for serving.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from openinfra.model import Transformer, get_config
from openinfra.model.loader import save_checkpoint
from openinfra.training.data import TokenStream, read_token_shards
from openinfra.training.stages import TransformerStage, chunk_criterion, split_stages

__all__ = ["TrainConfig", "TrainResult", "train", "train_worker", "default_corpus_tokens"]


@dataclass
class TrainConfig:
    """Everything a run needs; paths are local directories (3FS paths go through the demo stage)."""

    model: str = "tiny"
    n_layers: int = 0                 # override the config's layer count (0: keep it)
    steps: int = 20
    batch_size: int = 8
    seq_len: int = 64
    lr: float = 3e-3
    seed: int = 0
    pp: int = 1                       # pipeline ranks (DualPipeV); 1 = single process
    ep: int = 1                       # expert-parallel ranks (DeepEP dispatch/combine); world = pp * ep
    num_chunks: int = 0               # micro-batches per step; 0 = 4 * pp (2 * pp * ep with ep), or ep
    shards: list[str] = field(default_factory=list)  # token shards (.parquet / .npy); empty = this package's source
    checkpoint_dir: str | None = None
    checkpoint_every: int = 10
    resume: bool = False
    eplb_every: int = 10
    ep_gpus: int = 4                  # GPUs the EPLB plan places experts on
    ep_redundant: int = 0             # extra expert replicas (0: one per GPU)
    bias_update_rate: float = 1e-3
    trace_dir: str | None = None      # schedule + profiler traces per rank
    stop_after_step: int | None = None  # simulate a crash after this step (tests)

    def validate(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "pp", "ep", "checkpoint_every", "eplb_every", "ep_gpus"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"TrainConfig.{name} must be an int >= 1, got {v!r}")
        if self.lr <= 0:
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr}")
        chunks = self.chunks()
        if self.batch_size % chunks:
            raise ValueError(f"batch_size={self.batch_size} must be divisible by num_chunks={chunks}")
        model_cfg = self.model_config()
        n_layers = model_cfg.n_layers
        if self.pp > 1 and 2 * self.pp > n_layers:
            raise ValueError(f"pp={self.pp} needs {2 * self.pp} stages but model {self.model!r} has {n_layers} layers")
        if self.pp > 1 and chunks < 2 * self.pp * self.ep:
            raise ValueError(f"num_chunks={chunks}: DualPipeV needs >= 2 * pp = {2 * self.pp} micro-batches a pipeline"
                             + (f", i.e. >= {2 * self.pp * self.ep} for ep={self.ep} pipelines" if self.ep > 1 else ""))
        if self.ep > 1:
            if chunks % self.ep:
                raise ValueError(f"num_chunks={chunks} must be divisible by ep={self.ep} (each rank runs "
                                 "an equal share of the step's micro-batches)")
            if model_cfg.n_dense_layers < n_layers and model_cfg.n_routed_experts % self.ep:
                raise ValueError(f"ep={self.ep} must divide the model's n_routed_experts="
                                 f"{model_cfg.n_routed_experts}")

    def world_size(self) -> int:
        return self.pp * self.ep

    def model_config(self):
        return get_config(self.model, **({"n_layers": self.n_layers} if self.n_layers else {}))

    def chunks(self) -> int:
        if self.num_chunks:
            return self.num_chunks
        if self.pp == 1:
            return self.ep
        return 4 * self.pp if self.ep == 1 else 2 * self.pp * self.ep  # DualPipeV's least a pipeline: 2 * pp


@dataclass
class TrainResult:
    losses: list[float]
    step_seconds: list[float]
    tokens_per_s: float
    start_step: int
    eplb: list[dict]
    checkpoint: str | None
    final_checkpoint: str | None
    traces: list[str]

    def to_dict(self) -> dict:
        return asdict(self)


def default_corpus_tokens() -> torch.Tensor:
    """Byte tokens of openinfra's own source files: a real text corpus that is on every machine."""
    from openinfra.serving.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    root = Path(__file__).resolve().parents[1]
    ids: list[int] = []
    for path in sorted(root.rglob("*.py"))[:200]:
        ids += tok.encode(path.read_text(errors="replace")) + [tok.EOS]  # the data stage's layout
    return torch.tensor(ids, dtype=torch.int64)


# --- checkpoints ---------------------------------------------------------------------------------

def _latest_step(ckpt: Path) -> int | None:
    marker = ckpt / "latest"
    return int(marker.read_text()) if marker.exists() else None


def _save(ckpt: Path, rank: int, step: int, modules, opt, losses, times, eplb, group) -> None:
    d = ckpt / f"step_{step:06d}"
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f"rank{rank}.pt.tmp"
    torch.save({"step": step, "modules": [m.state_dict() for m in modules], "opt": opt.state_dict(),
                "losses": losses, "times": times, "eplb": eplb}, tmp)
    os.replace(tmp, d / f"rank{rank}.pt")  # a crash mid-write never leaves a half file under the real name
    if group is not None:
        dist.barrier(group)
    if rank == 0:
        marker_tmp = ckpt / "latest.tmp"
        marker_tmp.write_text(str(step))
        os.replace(marker_tmp, ckpt / "latest")


def _load(ckpt: Path, rank: int, modules, opt) -> tuple[int, list, list, list]:
    step = _latest_step(ckpt)
    if step is None:
        return 0, [], [], []
    state = torch.load(ckpt / f"step_{step:06d}" / f"rank{rank}.pt", weights_only=False)
    for m, sd in zip(modules, state["modules"]):
        m.load_state_dict(sd)
    opt.load_state_dict(state["opt"])
    return step + 1, state["losses"], state["times"], state["eplb"]


# --- EPLB ----------------------------------------------------------------------------------------

def _moe_gates(modules: list[TransformerStage]):
    """``(model layer index, gate)`` of this rank's MoE layers, in module order."""
    return [(m.start + i, layer.ffn.gate) for m in modules for i, layer in enumerate(m.layers) if layer.is_moe]


def _eplb_plan(loads: torch.Tensor, cfg: TrainConfig, n_groups: int) -> dict:
    from openinfra.parallel.eplb import balancedness, rebalance_experts

    layers, experts = loads.shape
    gpus = cfg.ep_gpus
    replicas = experts + cfg.ep_redundant
    if replicas % gpus:
        replicas += gpus - replicas % gpus
    weight = loads.double()
    phy2log, _, logcnt = rebalance_experts(weight, replicas, n_groups, 1, gpus)
    static = torch.arange(experts).repeat(layers, 1)  # experts laid out in order, E / gpus per GPU
    before = balancedness(static, weight, gpus) if experts % gpus == 0 else None
    after = balancedness(phy2log, weight, gpus)
    from openinfra.parallel.eplb import gpu_loads

    return {
        "gpu_loads_before": gpu_loads(static, weight, gpus).tolist() if before is not None else None,
        "gpu_loads_after": gpu_loads(phy2log, weight, gpus).tolist(),
        "layers": layers, "experts": experts, "gpus": gpus, "replicas": replicas,
        "balancedness_before": float(before.mean()) if before is not None else None,
        "balancedness_after": float(after.mean()),
        "phy2log": phy2log.tolist(),
        "tokens": int(loads.sum()),
    }


# --- the worker ----------------------------------------------------------------------------------

def train_worker(rank: int, world_size: int, cfg: TrainConfig, tokens: torch.Tensor | None = None) -> dict:
    """Run the job on this rank (the process group is already initialised when world_size > 1)."""
    cfg.validate()
    if world_size != cfg.world_size():
        raise ValueError(f"world_size={world_size} must equal pp * ep = {cfg.pp} * {cfg.ep}")
    torch.manual_seed(cfg.seed)
    model_cfg = cfg.model_config()
    model = Transformer(model_cfg)
    group = dist.group.WORLD if world_size > 1 else None
    pp_index, ep_index, pipe_group, ep_group = _parallel_groups(cfg, rank)
    if cfg.pp == 1:
        modules = split_stages(model, 1)
        pipe = None
    else:
        from openinfra.parallel.dualpipe import DualPipeV, ScheduleRecorder

        stages = split_stages(model, 2 * cfg.pp)
        modules = [stages[pp_index], stages[2 * cfg.pp - 1 - pp_index]]
        recorder = ScheduleRecorder() if cfg.trace_dir else None
        mb = cfg.batch_size // cfg.chunks()
        pipe = DualPipeV(tuple(modules), p2p_shapes=[(mb, cfg.seq_len, model_cfg.dim)], p2p_dtypes=torch.float32,
                         recorder=recorder, process_group=pipe_group)
    if cfg.ep > 1:
        from openinfra.comm.deep_ep import Buffer
        from openinfra.training.expert_parallel import shard_experts

        buffer = Buffer(ep_group)
        for m in modules:
            shard_experts(m, buffer, ep_index, cfg.ep)
    del model
    params = [p for m in modules for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    stream = TokenStream(tokens if tokens is not None else _tokens(cfg), cfg.seq_len, model_cfg.vocab_size, cfg.seed)

    ckpt = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else None
    start, losses, times, eplb = (0, [], [], [])
    if ckpt is not None and cfg.resume:
        start, losses, times, eplb = _load(ckpt, rank, modules, opt)
    moe_gates = _moe_gates(modules)
    gate_layers, gates = [layer for layer, _ in moe_gates], [gate for _, gate in moe_gates]
    load_acc = torch.zeros(len(gates), model_cfg.n_routed_experts, dtype=torch.int64)
    criterion = chunk_criterion(cfg.chunks())
    traces: list[str] = []
    last_saved = None

    for step in range(start, cfg.steps):
        t0 = time.perf_counter()
        inputs, targets = stream.batch(step, cfg.batch_size)
        opt.zero_grad(set_to_none=True)
        profile = cfg.trace_dir is not None and step == cfg.steps - 1  # a warm step
        prof = _profiler() if profile else None
        if prof is not None:
            prof.__enter__()
        # This EP index's share of the step's micro-batches (all of them when ep == 1).
        share = cfg.chunks() // cfg.ep
        mine = slice(ep_index * share, (ep_index + 1) * share)
        xs, ys = inputs.chunk(cfg.chunks())[mine], targets.chunk(cfg.chunks())[mine]
        if pipe is None:
            loss = torch.zeros(())
            for x, y in zip(xs, ys):
                chunk_loss = criterion(modules[0](x), y)
                chunk_loss.backward()
                loss += chunk_loss.detach()
        else:
            first = pipe.is_first_rank
            loss_chunks, _ = pipe.step(torch.cat(xs) if first else None, num_chunks=share,
                                       criterion=criterion if first else None, labels=(torch.cat(ys),) if first else ())
            loss = loss_chunks.sum().detach() if first else torch.zeros(())
            dist.broadcast(loss, src=dist.get_global_rank(pipe_group, pipe.first_rank), group=pipe_group)
        if cfg.ep > 1:
            from openinfra.training.expert_parallel import all_reduce_replicated_grads

            all_reduce_replicated_grads(modules, ep_group)
            dist.all_reduce(loss, group=ep_group)
        opt.step()
        if prof is not None:
            prof.__exit__(None, None, None)
            traces.append(_export_traces(prof, pipe, cfg, rank))
        for i, gate in enumerate(gates):
            load = gate.load.clone()
            if cfg.ep > 1:  # the bias is replicated: every rank updates it from the whole batch's loads
                dist.all_reduce(load, group=ep_group)
            load_acc[i] += load.cpu()
            gate.update_bias(cfg.bias_update_rate, load=load)
            gate.reset_load()
        losses.append(float(loss))
        times.append(time.perf_counter() - t0)
        if (step + 1) % cfg.eplb_every == 0:
            # gathered over the pipeline (its ranks hold different layers); the EP replicas of a
            # stage hold the same summed loads already
            plan = _gather_eplb(load_acc, gate_layers, cfg, model_cfg.n_expert_groups, pipe_group)
            moved = _place_experts(modules, load_acc, model_cfg.n_expert_groups, cfg.ep, opt, ep_group) if cfg.ep > 1 else 0
            if plan is not None:
                plan["step"] = step
                if cfg.ep > 1:
                    plan["ep_experts_moved"] = moved  # on this rank, by the placement over the EP ranks
                eplb.append(plan)
            load_acc.zero_()
        if ckpt is not None and ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps):
            _save(ckpt, rank, step, modules, opt, losses, times, eplb, group)
            last_saved = step
        if cfg.stop_after_step is not None and step >= cfg.stop_after_step:
            break

    final = None
    if ckpt is not None and len(losses) == cfg.steps:
        final = _export_final(modules, model_cfg, ckpt / "final", rank, group, cfg.ep)
    measured = times[1:] or times
    tokens_per_s = cfg.batch_size * cfg.seq_len / (sum(measured) / len(measured)) if measured else 0.0
    return TrainResult(losses, times, tokens_per_s, start, eplb,
                       str(ckpt / f"step_{last_saved:06d}") if ckpt is not None and last_saved is not None else None,
                       final, traces).to_dict()


def _place_experts(modules, load_acc: torch.Tensor, n_groups: int, ep: int, opt, group) -> int:
    """Re-place every local MoE layer's experts over the ``ep`` ranks of ``group`` for the loads seen
    since the last plan (EPLB, one slot per expert); weights and AdamW moments move with them. Every
    rank of the group computes the same plan from the same (all-reduced) loads. Returns how many of
    this rank's expert slots changed expert."""
    from openinfra.parallel.eplb import rebalance_experts
    from openinfra.training.expert_parallel import ExpertParallelMoE, apply_placement

    layers = [layer.ffn for m in modules for layer in m.layers if isinstance(layer.ffn, ExpertParallelMoE)]
    if not layers:
        return 0
    phy2log, _, _ = rebalance_experts(load_acc.double(), load_acc.shape[1], n_groups, 1, ep)
    return sum(apply_placement(moe, row.tolist(), opt, group) for moe, row in zip(layers, phy2log))


def _parallel_groups(cfg: TrainConfig, rank: int):
    """``(pipeline index, EP index, pipeline group, EP group)`` of global ``rank``: ranks
    ``e * pp .. e * pp + pp - 1`` form pipeline e; the ranks at one pipeline index form its EP group.
    A group is None where its size is 1 (every rank creates every group, in the same order)."""
    pp_index, ep_index = rank % cfg.pp, rank // cfg.pp
    if cfg.pp > 1 and cfg.ep > 1:
        pipes = [dist.new_group([e * cfg.pp + p for p in range(cfg.pp)]) for e in range(cfg.ep)]
        eps = [dist.new_group([e * cfg.pp + p for e in range(cfg.ep)]) for p in range(cfg.pp)]
        return pp_index, ep_index, pipes[ep_index], eps[pp_index]
    world = dist.group.WORLD if cfg.world_size() > 1 else None
    return pp_index, ep_index, world if cfg.pp > 1 else None, world if cfg.ep > 1 else None


def _tokens(cfg: TrainConfig) -> torch.Tensor:
    return read_token_shards(cfg.shards) if cfg.shards else default_corpus_tokens()


def _gather_eplb(load_acc: torch.Tensor, layers: list[int], cfg: TrainConfig, n_groups: int, group) -> dict | None:
    """The EPLB plan (on the group's rank 0) of the loads ``load_acc`` [layers here, E] of model layers
    ``layers``, gathered over the pipeline ``group``, rows in model layer order (a pipeline rank's
    stages are not consecutive layers: DualPipeV's rank r holds stages r and 2 * pp - 1 - r)."""
    if group is None:
        rows = [(layer, row) for layer, row in zip(layers, load_acc)]
    else:
        parts: list = [None] * dist.get_world_size(group)
        dist.all_gather_object(parts, (layers, load_acc), group=group)
        if dist.get_rank(group) != 0:
            return None
        rows = [(layer, row) for ls, acc in parts for layer, row in zip(ls, acc)]
    if not rows:
        return None
    return _eplb_plan(torch.stack([row for _, row in sorted(rows, key=lambda r: r[0])]), cfg, n_groups)


def _export_final(modules, model_cfg, path: Path, rank: int, group, ep: int = 1) -> str | None:
    state: dict[str, torch.Tensor] = {}
    for m in modules:
        state.update(m.qualified_state_dict())
    if group is not None:
        parts: list = [None] * dist.get_world_size(group)
        dist.all_gather_object(parts, state)
        # Pipeline stages have disjoint names; EP replicas of a stage share every name, and the
        # routed experts' stacks are cut by EP index (parts come in global rank order: EP index major).
        merged: dict[str, list[torch.Tensor]] = {}
        for p in parts:
            for k, v in p.items():
                merged.setdefault(k, []).append(v)
        state = {k: torch.cat(v) if ep > 1 and ".ffn.experts.w" in k else v[0] for k, v in merged.items()}
        # Expert stacks come out in physical-slot order: put each logical expert e back at row e.
        for key in [k for k in state if k.endswith(".ffn.log2phy")]:
            log2phy = state.pop(key)
            for w in ("w1", "w2", "w3"):
                name = key[:-len("log2phy")] + f"experts.{w}"
                state[name] = state[name][log2phy]
    if rank != 0:
        return None
    model = Transformer(model_cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if "rope" not in k]:
        raise RuntimeError(f"final export: missing {missing}, unexpected {unexpected}")
    save_checkpoint(model, path)
    return str(path)


def _profiler():
    return torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])


def _export_traces(prof, pipe, cfg: TrainConfig, rank: int) -> str:
    """This rank's torch.profiler Chrome trace, and (rank 0) every rank's DualPipe schedule events."""
    from openinfra.profiling.trace import export_chrome_trace

    d = Path(cfg.trace_dir)
    d.mkdir(parents=True, exist_ok=True)
    path = export_chrome_trace(prof, d / f"train_rank{rank}.json", rank=rank)
    if pipe is not None and pipe.recorder is not None:
        events = pipe.recorder.gather(pipe.group)  # collective: every rank of this pipeline calls it
        if rank == 0:
            pipe.recorder.to_json(d / "schedule.json", events)
    return str(path)


# --- launching -----------------------------------------------------------------------------------

def train(cfg: TrainConfig, tokens: torch.Tensor | None = None, timeout: float = 1800.0) -> dict:
    """Run the job: in this process when ``pp == ep == 1``, else on ``pp * ep`` spawned gloo ranks.
    Returns rank 0's result."""
    cfg.validate()
    if cfg.world_size() == 1:
        return train_worker(0, 1, cfg, tokens)
    from openinfra.testing.distributed import run_on_ranks

    return run_on_ranks(train_worker, cfg.world_size(), cfg, tokens, timeout=timeout)[0]
