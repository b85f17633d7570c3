"""System layer: the training job.

- ``openinfra.training.job``     :class:`TrainConfig`, :func:`train` (DualPipeV across pipeline
  ranks, expert parallelism across EP ranks, aux-loss-free gate balancing, EPLB plans from observed expert loads, resumable
  checkpoints, the final model in DeepSeek-V3 safetensors naming, profiler traces).
- ``openinfra.training.expert_parallel``  MoE layers with their routed experts split over EP ranks
  (DeepEP dispatch / combine), replicated-gradient all-reduce.
- ``openinfra.training.stages``  cutting the model into pipeline stages.
- ``openinfra.training.data``    deterministic batches from token shards.
"""

__all__ = ["TrainConfig", "train", "train_worker"]


def __getattr__(name: str):
    # Lazy: `openinfra train --help` should not pay for importing PyTorch.
    if name in __all__:
        from openinfra.training import job

        return getattr(job, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
