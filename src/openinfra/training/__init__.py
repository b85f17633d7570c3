"""System layer: the training job.

- ``openinfra.training.job``     :class:`TrainConfig`, :func:`train` (DualPipeV across pipeline
  ranks, aux-loss-free gate balancing, EPLB plans from observed expert loads, resumable
  checkpoints, the final model in DeepSeek-V3 safetensors naming, profiler traces).
- ``openinfra.training.stages``  cutting the model into pipeline stages.
- ``openinfra.training.data``    deterministic batches from token shards.
"""

from openinfra.training.job import TrainConfig, train, train_worker

__all__ = ["TrainConfig", "train", "train_worker"]
