"""System layer: the training job (DualPipe across pipeline ranks, DeepEP across expert ranks,
EPLB rebalancing, data from smallpond shards, checkpoints on 3FS)."""
