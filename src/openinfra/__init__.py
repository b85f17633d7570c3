"""openinfra: the DeepSeek Open Infra stack rebuilt as one Python package.

Layers (see ``shared/design/architecture.md``); each component is usable alone:

- ``openinfra.kernels``   FlashMLA and DeepGEMM: Triton kernels for Hopper + PyTorch references.
- ``openinfra.comm``      DeepEP: MoE all-to-all dispatch / combine on torch.distributed.
- ``openinfra.parallel``  DualPipe / DualPipeV pipeline schedules and the EPLB load balancer.
- ``openinfra.fs``        3FS: cluster manager, metadata, CRAQ chain-replicated storage, clients.
- ``openinfra.smallpond`` smallpond: DuckDB-based distributed data processing.
- ``openinfra.model``     a small DeepSeek-V3-architecture model.
- ``openinfra.training``  the training job; ``openinfra.serving`` inference and the cost model.
- ``openinfra.profiling`` traces of overlap, bubble and load, and their pictures.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
