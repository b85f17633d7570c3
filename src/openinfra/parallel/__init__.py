"""Training-parallelism layer: ``openinfra.parallel.dualpipe`` (DualPipe / DualPipeV
bidirectional pipeline schedules) and ``openinfra.parallel.eplb`` (the expert-parallel load
balancer)."""
