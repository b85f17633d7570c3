"""Compute layer: GPU kernels in Triton for Hopper, each with an exact PyTorch reference.

- ``openinfra.kernels.flash_mla``  paged MLA decoding attention (FlashMLA's API).
- ``openinfra.kernels.deep_gemm``  FP8 block-scaled GEMMs, dense and grouped for MoE (DeepGEMM's API),
  plus the FP8 cast helpers.

Kernels import nothing else of openinfra, so they can be taken alone. Every entry point picks the
Triton kernel on a Hopper GPU and the reference elsewhere (see ``openinfra.kernels.backend``).
"""
