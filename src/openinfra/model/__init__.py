"""System layer: a small DeepSeek-V3-architecture model (MLA + MoE) on openinfra's kernels."""
