"""Communication layer: ``openinfra.comm.deep_ep``, MoE all-to-all dispatch / combine in
normal and low-latency modes on torch.distributed (NCCL on GPUs, gloo on CPU)."""
