"""The DeepEP check suites, run on every rank by tests/comm/test_deep_ep_distributed.py.

``intranode_checks``: every check of DeepEP's tests/test_intranode.py; ``low_latency_checks``: every
check of tests/test_low_latency.py. Shapes and thresholds from parallel.md: T=64, H=256, K=4,
E=16*R; combine / (ranks the token went to) ~ x within calc_diff 5e-6, weights within 1e-9;
low-latency combine ~ x * sum(w) within 1e-5 (bf16) / 9e-4 (fp8). Added to the originals: -1 entries
in the normal-mode topk_idx, expert_alignment, two micro-batches overlapped through recv hooks.
Each suite returns its count of completed check rounds so the caller can tell it ran to the end.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from openinfra.comm.deep_ep import Buffer, Config
from openinfra.kernels.deep_gemm import per_token_cast_to_fp8
from tests.comm.deep_ep_helpers import calc_diff, cast_back, routing, unique_ranks

NUM_TOKENS, HIDDEN, NUM_TOPK = 64, 256, 4


def _all_reduce_(t: torch.Tensor) -> None:
    """Sum over ranks in place (gloo: through host memory, its CUDA support varies by collective)."""
    if dist.get_backend() == "nccl":
        dist.all_reduce(t)
        return
    host = t.cpu()
    dist.all_reduce(host)
    t.copy_(host)


def _all_gather(t: torch.Tensor) -> torch.Tensor:
    """[R, *t.shape]: every rank's t (gloo: through host memory)."""
    on = t.device if dist.get_backend() == "nccl" else "cpu"
    parts = [torch.empty_like(t, device=on) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.to(on))
    return torch.stack(parts).to(t.device)


def intranode_checks(rank: int, num_ranks: int, device: str, buffer: Buffer | None = None) -> int:
    gen = torch.Generator().manual_seed(1000 + rank)
    num_tokens, hidden, num_topk, num_experts = NUM_TOKENS, HIDDEN, NUM_TOPK, 16 * num_ranks
    buffer = buffer or Buffer(dist.group.WORLD)

    x = torch.ones(num_tokens, hidden, dtype=torch.bfloat16, device=device) * rank
    x_pure_rand = torch.randn(num_tokens, hidden, generator=gen).to(torch.bfloat16).to(device)
    x_e4m3 = per_token_cast_to_fp8(x)
    # DeepEP's test hands the scales over column-major; dispatch must accept any strides
    x_e4m3 = (x_e4m3[0], x_e4m3[1].T.contiguous().T)
    topk_idx = routing(num_tokens, num_experts, num_topk, 10, device, gen)
    topk_weights = torch.ones(num_tokens, num_topk, dtype=torch.float32, device=device) * rank
    topk_weights_pure_rand = torch.randn(num_tokens, num_topk, generator=gen).to(device)
    rank_idx = topk_idx // (num_experts // num_ranks)
    rank_idx.masked_fill_(topk_idx == -1, -1)
    rank_idx = unique_ranks(rank_idx.cpu(), num_ranks).to(device)

    # Expert meta
    num_tokens_per_expert = torch.zeros(num_experts, dtype=torch.int32, device=device)
    for i in range(num_experts):
        num_tokens_per_expert[i] = (topk_idx == i).sum()
    gbl_num_tokens_per_expert = num_tokens_per_expert.clone()
    _all_reduce_(gbl_num_tokens_per_expert)

    # Rank layout meta
    num_tokens_per_rank = torch.empty(num_ranks, dtype=torch.int32, device=device)
    token_idx_in_rank = torch.full((num_ranks, num_tokens), -1, dtype=torch.long, device=device)
    for i in range(num_ranks):
        num_tokens_per_rank[i] = (rank_idx == i).sum()
        token_sel = (rank_idx == i).max(dim=-1)[0]
        count = int(token_sel.sum())
        tokens = torch.sort(token_sel.to(torch.int), descending=True, stable=True)[1]
        tokens[:count] = torch.sort(tokens[:count])[0]
        token_idx_in_rank[i][tokens[:count]] = torch.arange(count, dtype=torch.long, device=device)
    token_idx_in_rank = token_idx_in_rank.T.contiguous().to(torch.int)
    is_token_in_rank = token_idx_in_rank >= 0
    gbl_num_tokens_per_rank = num_tokens_per_rank.clone()
    _all_reduce_(gbl_num_tokens_per_rank)

    ref_num_tokens_per_rank, ref_rdma, ref_num_tokens_per_expert, ref_is_token_in_rank, _ = \
        buffer.get_dispatch_layout(topk_idx, num_experts)
    assert ref_rdma is None
    assert torch.equal(ref_num_tokens_per_rank, num_tokens_per_rank)
    assert torch.equal(ref_num_tokens_per_expert, num_tokens_per_expert)
    assert torch.equal(ref_is_token_in_rank, is_token_in_rank)

    config = Config(24, 8, 256)

    def check_data(check_x, rank_prefix_matrix):
        assert torch.allclose(check_x.amin(dim=1), check_x.amax(dim=1))
        check_start = 0
        for i in range(num_ranks):
            check_end = int(rank_prefix_matrix[i][rank])
            assert int((check_x[check_start:check_end, :].int() - i).sum()) == 0
            check_start = check_end

    checks = 0
    for previous_mode in (False, True):
        for async_mode in (False, True):
            for current_x in (x_pure_rand, x, x_e4m3):
                for with_topk in (False, True):
                    dispatch_args = {"x": current_x, "num_tokens_per_rank": num_tokens_per_rank,
                                     "is_token_in_rank": is_token_in_rank, "num_tokens_per_expert": num_tokens_per_expert,
                                     "config": config, "async_finish": async_mode}
                    if with_topk:
                        dispatch_args.update({"topk_idx": topk_idx, "topk_weights":
                                              topk_weights_pure_rand if current_x is x_pure_rand else topk_weights})
                    if previous_mode:
                        dispatch_args.update({"previous_event": buffer.capture()})
                    recv_x, recv_topk_idx, recv_topk_weights, recv_num_tokens_per_expert_list, handle, event = \
                        buffer.dispatch(**dispatch_args)
                    event.current_stream_wait() if async_mode else ()
                    recv_x = cast_back(*recv_x) if isinstance(recv_x, tuple) else recv_x

                    rank_prefix_matrix = handle[0]
                    assert int(gbl_num_tokens_per_rank[rank]) == recv_x.size(0)
                    assert gbl_num_tokens_per_expert.view(num_ranks, -1)[rank].tolist() == recv_num_tokens_per_expert_list
                    if current_x is not x_pure_rand:
                        check_data(recv_x, rank_prefix_matrix)
                    recv_topk_weights_clone = None
                    if with_topk:
                        assert int((recv_topk_idx.eq(-1) | ((recv_topk_idx >= 0) & (recv_topk_idx < (num_experts // num_ranks)))).sum()) == recv_topk_idx.numel()
                        for i, count in enumerate(recv_num_tokens_per_expert_list):
                            assert int(recv_topk_idx.eq(i).sum()) == count
                        recv_topk_weights_clone = recv_topk_weights.clone()
                        if current_x is not x_pure_rand:
                            recv_topk_weights[recv_topk_idx.eq(-1)] = recv_topk_weights.amax(dim=1, keepdim=True).expand_as(recv_topk_weights)[recv_topk_idx.eq(-1)]
                            check_data(recv_topk_weights, rank_prefix_matrix)

                    # num_worst_tokens: fixed-size output, no host sync, same rows first, padding after
                    if with_topk:
                        num_worst_tokens = num_tokens * num_ranks
                        dispatch_args.update({"num_worst_tokens": num_worst_tokens})
                        recv_worst_x, recv_worst_topk_idx, recv_worst_topk_weights, empty_list, _, event = buffer.dispatch(**dispatch_args)
                        event.current_stream_wait() if async_mode else ()
                        recv_worst_x = cast_back(*recv_worst_x) if isinstance(recv_worst_x, tuple) else recv_worst_x
                        assert len(empty_list) == 0
                        assert num_worst_tokens == recv_worst_x.size(0)
                        assert num_worst_tokens == recv_worst_topk_idx.size(0)
                        assert num_worst_tokens == recv_worst_topk_weights.size(0)
                        assert torch.equal(recv_x, recv_worst_x[: recv_x.size(0)])
                        assert torch.equal(recv_topk_idx, recv_worst_topk_idx[: recv_x.size(0)])
                        assert torch.equal(recv_topk_weights_clone, recv_worst_topk_weights[: recv_x.size(0)])
                        assert bool(torch.all(recv_worst_topk_idx[recv_x.size(0):] == -1))

                    # cached dispatch (no top-k)
                    if not with_topk:
                        dispatch_args = {"x": current_x, "handle": handle, "config": config, "async_finish": async_mode}
                        if previous_mode:
                            dispatch_args.update({"previous_event": buffer.capture()})
                        recv_x, _, _, _, _, event = buffer.dispatch(**dispatch_args)
                        event.current_stream_wait() if async_mode else ()
                        recv_x = cast_back(*recv_x) if isinstance(recv_x, tuple) else recv_x
                        if current_x is not x_pure_rand:
                            check_data(recv_x, rank_prefix_matrix)

                    # combine
                    combine_args = {"x": recv_x, "handle": handle, "config": config, "async_finish": async_mode}
                    if with_topk:
                        combine_args.update({"topk_weights": recv_topk_weights})
                    if previous_mode:
                        combine_args.update({"previous_event": buffer.capture()})
                    combined_x, combined_topk_weights, event = buffer.combine(**combine_args)
                    event.current_stream_wait() if async_mode else ()
                    check_x = combined_x.float() / is_token_in_rank.sum(dim=1).unsqueeze(1)
                    ref_x = x_pure_rand if current_x is x_pure_rand else x
                    assert calc_diff(check_x, ref_x) < 5e-6
                    if with_topk:
                        check_topk_weights = combined_topk_weights if (current_x is x_pure_rand) else (combined_topk_weights / is_token_in_rank.sum(dim=1).unsqueeze(1))
                        # a -1 slot selects no expert, so its weight comes back as 0 (DeepEP does the same)
                        ref_topk_weights = topk_weights_pure_rand.masked_fill(topk_idx < 0, 0) if current_x is x_pure_rand else topk_weights
                        assert calc_diff(check_topk_weights, ref_topk_weights) < 1e-9
                    checks += 1

    # expert_alignment rounds each local expert's count up
    _, _, _, aligned, _, _ = buffer.dispatch(x, num_tokens_per_rank=num_tokens_per_rank, is_token_in_rank=is_token_in_rank,
                                             num_tokens_per_expert=num_tokens_per_expert, topk_idx=topk_idx,
                                             topk_weights=topk_weights, expert_alignment=8)
    exact = gbl_num_tokens_per_expert.view(num_ranks, -1)[rank].tolist()
    assert aligned == [(c + 7) // 8 * 8 for c in exact]
    return checks



def low_latency_checks(rank: int, num_ranks: int, device: str, buffer: Buffer | None = None) -> int:
    gen = torch.Generator().manual_seed(2000 + rank)
    num_tokens, hidden, num_topk, num_experts = NUM_TOKENS, HIDDEN, NUM_TOPK, 16 * num_ranks
    num_local_experts = num_experts // num_ranks
    buffer = buffer or Buffer(dist.group.WORLD, low_latency_mode=True)
    # as DeepEP's intranode test does before reusing a normal-mode buffer for low latency
    buffer.clean_low_latency_buffer(num_tokens, hidden, num_experts)

    # integers above 256 are not exact in bf16: sources are told apart by (rank - 128)
    rank_offset = 128
    x = torch.ones(num_tokens, hidden, dtype=torch.bfloat16) * (rank - rank_offset)
    x[:, -128:] = torch.arange(num_tokens).to(torch.bfloat16).view(-1, 1)
    x = x.to(device)
    x_pure_rand = (torch.randn(num_tokens, hidden, generator=gen) * 0.1).to(torch.bfloat16).to(device)
    scores = torch.randn(num_tokens, num_experts, generator=gen).abs() + 1
    topk_idx = torch.topk(scores, num_topk, dim=-1, largest=True, sorted=True)[1]
    topk_weights = torch.randn(num_tokens, num_topk, generator=gen).abs()
    for _ in range(10):  # randomly mask some positions
        topk_idx[int(torch.randint(num_tokens, (1,), generator=gen)), int(torch.randint(num_topk, (1,), generator=gen))] = -1
    topk_idx, topk_weights = topk_idx.to(device), topk_weights.to(device)
    all_topk_idx = _all_gather(topk_idx)

    rounds, num_times = 0, 0
    for current_x in (x, x_pure_rand):
        for return_recv_hook in (False, True):
            for dispatch_use_fp8 in (False, True):
                for round_scale in (False, True) if dispatch_use_fp8 else (False,):
                    for use_ue8m0 in (False, True) if round_scale else (False,):
                        num_times += 1
                        previous = None
                        for _ in range((num_times % 2) + 1):
                            stats = torch.zeros(num_local_experts, dtype=torch.int32, device=device)
                            packed_recv_x, packed_recv_count, handle, event, hook = buffer.low_latency_dispatch(
                                current_x, topk_idx, num_tokens, num_experts, use_fp8=dispatch_use_fp8,
                                round_scale=round_scale, use_ue8m0=use_ue8m0, cumulative_local_expert_recv_stats=stats,
                                async_finish=not return_recv_hook, return_recv_hook=return_recv_hook)
                            hook() if return_recv_hook else event.current_stream_wait()
                            # a repeated dispatch is deterministic (DeepEP's hash check): same valid rows, bit for bit
                            values = packed_recv_x[0] if dispatch_use_fp8 else packed_recv_x
                            valid = [values[i, : int(packed_recv_count[i])].contiguous().view(torch.uint8)
                                     for i in range(num_local_experts)]
                            if previous is not None:
                                assert all(torch.equal(a, b) for a, b in zip(previous, valid))
                            previous = valid
                        if dispatch_use_fp8:
                            assert packed_recv_x[1].stride(1) == 1 or packed_recv_x[1].stride(-2) == 1  # column-major scales
                            packed_recv_x = (packed_recv_x[0], packed_recv_x[1].contiguous())
                            simulated_gemm_x = cast_back(packed_recv_x[0].view(-1, hidden), packed_recv_x[1].view(packed_recv_x[0].shape[0] * packed_recv_x[0].shape[1], -1)).view(packed_recv_x[0].shape)
                        else:
                            simulated_gemm_x = packed_recv_x.clone()
                        for i in range(num_local_experts):
                            expert_id = rank * num_local_experts + i
                            recv_x = cast_back(packed_recv_x[0][i], packed_recv_x[1][i]) if dispatch_use_fp8 else packed_recv_x[i]
                            recv_count, recv_src_info, recv_layout_range = packed_recv_count[i], handle[0][i], handle[1][i]
                            int_mask = (2**32) - 1
                            num_valid_tokens = int(recv_count)
                            assert int(stats[i]) == num_valid_tokens
                            assert num_valid_tokens == int((recv_layout_range & int_mask).sum())
                            assert num_valid_tokens == int((all_topk_idx == expert_id).sum())
                            if current_x is not x_pure_rand:
                                recv_x = recv_x[:num_valid_tokens]
                                recv_x_amin = recv_x[:, :-128].amin(dim=-1)
                                recv_src_info = recv_src_info[:num_valid_tokens]
                                assert torch.equal(recv_x_amin, recv_x[:, :-128].amax(dim=-1))
                                if round_scale:
                                    assert calc_diff(recv_x[:, -1], recv_src_info.view(-1)) < 0.007
                                else:
                                    assert int((recv_x[:, -128:] - recv_src_info.view(-1, 1) % num_tokens).sum()) == 0
                                for j in range(num_ranks):
                                    begin_idx, count = int(recv_layout_range[j] >> 32), int(recv_layout_range[j] & int_mask)
                                    assert count == int((all_topk_idx[j] == expert_id).sum())
                                    if not round_scale:
                                        assert int((recv_x_amin == j - rank_offset).sum()) == count
                                        # the block of source j holds exactly its rows
                                        assert bool((recv_x_amin[begin_idx:begin_idx + count] == j - rank_offset).all())
                        for zero_copy in (False, True):
                            if zero_copy:
                                buffer.get_next_low_latency_combine_buffer(handle)[:, :, :] = simulated_gemm_x
                            out = torch.empty(num_tokens, hidden, dtype=torch.bfloat16, device=device)
                            combined_x, event, hook = buffer.low_latency_combine(
                                simulated_gemm_x, topk_idx, topk_weights, handle, async_finish=not return_recv_hook,
                                zero_copy=zero_copy, return_recv_hook=return_recv_hook, out=out)
                            hook() if return_recv_hook else event.current_stream_wait()
                            assert combined_x.data_ptr() == out.data_ptr()
                            diff = calc_diff(current_x * topk_weights.masked_fill(topk_idx == -1, 0).sum(dim=1).view(-1, 1), combined_x)
                            assert int(torch.isnan(combined_x).sum()) == 0
                            assert diff < (9e-4 if dispatch_use_fp8 else 1e-5), f"{diff=} {zero_copy=}"
                        rounds += 1

    # Two micro-batches overlapped: both sends issued before either receive, hooks called out of order.
    half = num_tokens // 2
    stats = torch.zeros(num_local_experts, dtype=torch.int32, device=device)
    a = buffer.low_latency_dispatch(x_pure_rand[:half], topk_idx[:half], num_tokens, num_experts, use_fp8=False,
                                    cumulative_local_expert_recv_stats=stats, return_recv_hook=True)
    b = buffer.low_latency_dispatch(x_pure_rand[half:], topk_idx[half:], num_tokens, num_experts, use_fp8=False,
                                    cumulative_local_expert_recv_stats=stats, return_recv_hook=True)
    b[4]()
    a[4]()
    assert int(stats.sum()) == int((all_topk_idx // num_local_experts == rank).sum())
    ca = buffer.low_latency_combine(a[0], topk_idx[:half], topk_weights[:half], a[2], return_recv_hook=True)
    cb = buffer.low_latency_combine(b[0], topk_idx[half:], topk_weights[half:], b[2], return_recv_hook=True)
    ca[2]()
    cb[2]()
    combined = torch.cat([ca[0], cb[0]])
    assert calc_diff(x_pure_rand * topk_weights.masked_fill(topk_idx == -1, 0).sum(dim=1).view(-1, 1), combined) < 1e-5
    return rounds


def _layout(buffer, topk_idx, num_experts):
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, num_experts)
    return dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)


def _global_dot(a: torch.Tensor, b: torch.Tensor) -> float:
    v = (a.double() * b.double()).sum().reshape(1)
    _all_reduce_(v)
    return float(v)


def autograd_checks(rank: int, num_ranks: int, device: str) -> int:
    """Dispatch and combine are each other's adjoints: <D(x), g> = <x, C(g)> summed over ranks, and
    autograd's gradients are exactly those maps."""
    gen = torch.Generator().manual_seed(3000 + rank)
    num_tokens, hidden, num_topk, num_experts = 24, 128, 3, 8 * num_ranks
    buffer = Buffer(dist.group.WORLD)
    topk_idx = routing(num_tokens, num_experts, num_topk, 4, device, gen)
    layout = _layout(buffer, topk_idx, num_experts)
    checks = 0
    for worst in (0, num_tokens * num_ranks):
        x = torch.randn(num_tokens, hidden, generator=gen, dtype=torch.float32).to(device).requires_grad_()
        w = torch.rand(num_tokens, num_topk, generator=gen).to(device).requires_grad_()
        recv_x, recv_idx, recv_w, _, handle, _ = buffer.dispatch(x, topk_idx=topk_idx, topk_weights=w,
                                                                 num_worst_tokens=worst, **layout)
        assert recv_x.requires_grad and recv_w.requires_grad and not recv_idx.requires_grad
        g = torch.randn(recv_x.shape, generator=gen).to(device)
        gw = torch.randn(recv_w.shape, generator=gen).to(device)
        ((recv_x * g).sum() + (recv_w * gw).sum()).backward()
        # the dispatch adjoint: x.grad = combine(g); weights only through the local (unmasked) slots
        with torch.no_grad():
            expect_x, expect_w, _ = buffer.combine(g, handle, topk_weights=gw.masked_fill(recv_idx < 0, 0))
        assert torch.equal(x.grad, expect_x) and torch.equal(w.grad, expect_w)
        lhs = _global_dot(recv_x.detach(), g) + _global_dot(recv_w.detach(), gw)
        rhs = _global_dot(x.detach(), x.grad) + _global_dot(w.detach(), w.grad)
        assert abs(lhs - rhs) <= 1e-6 * max(1.0, abs(lhs)), (lhs, rhs)  # fp32 sums vs float64 dots

        # combine: y = C(z) + b0 + b1, grads z -> cached dispatch of h, bias -> h
        z = torch.randn(recv_x.shape, generator=gen).to(device).requires_grad_()
        zw = torch.randn(recv_w.shape, generator=gen).to(device).requires_grad_()
        b0 = torch.randn(num_tokens, hidden, generator=gen).to(device).requires_grad_()
        b1 = torch.randn(num_tokens, hidden, generator=gen).to(device).requires_grad_()
        y, yw, _ = buffer.combine(z, handle, topk_weights=zw, bias=(b0, b1))
        h = torch.randn(y.shape, generator=gen).to(device)
        hw = torch.randn(yw.shape, generator=gen).to(device)
        ((y * h).sum() + (yw * hw).sum()).backward()
        with torch.no_grad():
            expect_z = buffer.dispatch(h, handle=handle)[0]
            expect_zw = buffer.dispatch(hw, handle=handle)[0]
            y_plain = buffer.combine(z, handle, bias=(b0, b1))[0]
        assert torch.equal(z.grad, expect_z) and torch.equal(zw.grad, expect_zw)
        assert torch.equal(b0.grad, h) and torch.equal(b1.grad, h)
        assert torch.equal(y.detach(), y_plain)
        lhs = _global_dot(y.detach() - b0.detach() - b1.detach(), h)
        rhs = _global_dot(z.detach(), z.grad)
        assert abs(lhs - rhs) <= 1e-4 * max(1.0, abs(lhs)), (lhs, rhs)
        checks += 1

    # a MoE layer end to end: top-k weighted expert MLP through dispatch / combine, against one process
    experts_per_rank = num_experts // num_ranks
    weight_gen = torch.Generator().manual_seed(7)  # the same expert weights on every rank
    expert_w = torch.randn(num_experts, hidden, hidden, generator=weight_gen) / hidden**0.5
    x = torch.randn(num_tokens, hidden, generator=gen).to(device).requires_grad_()
    w = torch.rand(num_tokens, num_topk, generator=gen).to(device).requires_grad_()
    recv_x, recv_idx, recv_w, _, handle, _ = buffer.dispatch(x, topk_idx=topk_idx, topk_weights=w, **layout)
    local_w = expert_w[rank * experts_per_rank:(rank + 1) * experts_per_rank].to(device)
    out = torch.zeros_like(recv_x)
    for k in range(num_topk):
        e = recv_idx[:, k]
        ok = e >= 0
        y_k = torch.einsum("nh,nho->no", recv_x, local_w[e.clamp(min=0)])
        out = out + torch.where(ok.unsqueeze(1), y_k * recv_w[:, k:k + 1], torch.zeros_like(y_k))
    y, _, _ = buffer.combine(out, handle)
    gy = torch.randn(y.shape, generator=gen).to(device)
    (y * gy).sum().backward()
    # single-process reference on this rank's tokens
    xr = x.detach().clone().requires_grad_()
    wr = w.detach().clone().requires_grad_()
    ref = torch.zeros(num_tokens, hidden, device=device)
    for k in range(num_topk):
        e = topk_idx[:, k]
        ok = e >= 0
        y_k = torch.einsum("nh,nho->no", xr, expert_w.to(device)[e.clamp(min=0)])
        ref = ref + torch.where(ok.unsqueeze(1), y_k * wr[:, k:k + 1], torch.zeros_like(y_k))
    (ref * gy).sum().backward()
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad, wr.grad.masked_fill(topk_idx < 0, 0), rtol=1e-5, atol=1e-5)

    # only x requires grad: the weights get none (and their collective is skipped), x's is still exact
    x = torch.randn(num_tokens, hidden, generator=gen).to(device).requires_grad_()
    w = torch.rand(num_tokens, num_topk, generator=gen).to(device)
    recv_x, _, recv_w, _, handle, _ = buffer.dispatch(x, topk_idx=topk_idx, topk_weights=w, **layout)
    upstream = recv_w.sum(1, keepdim=True).expand_as(recv_x).contiguous()
    (recv_x * upstream).sum().backward()
    with torch.no_grad():
        expect_x = buffer.combine(upstream, handle)[0]
    assert w.grad is None and torch.equal(x.grad, expect_x)
    return checks + 2


def async_checks(rank: int, num_ranks: int, device: str) -> int:
    """Two async dispatches in flight at once, waited out of order; ``with event:`` waits on exit."""
    gen = torch.Generator().manual_seed(4000 + rank)
    num_tokens, hidden, num_topk, num_experts = 16, 128, 2, 4 * num_ranks
    buffer = Buffer(dist.group.WORLD)
    topk_idx = routing(num_tokens, num_experts, num_topk, 0, device, gen)
    layout = _layout(buffer, topk_idx, num_experts)
    xa = torch.randn(num_tokens, hidden, generator=gen).to(torch.bfloat16).to(device)
    xb = torch.randn(num_tokens, hidden, generator=gen).to(torch.bfloat16).to(device)
    ref_a = buffer.dispatch(xa, **layout)[0]
    ref_b = buffer.dispatch(xb, **layout)[0]
    a = buffer.dispatch(xa, async_finish=True, **layout)
    b = buffer.dispatch(xb, async_finish=True, previous_event=buffer.capture(), **layout)
    b[5].current_stream_wait()
    a[5].current_stream_wait()
    assert torch.equal(a[0], ref_a) and torch.equal(b[0], ref_b)
    combined, _, event = buffer.combine(a[0], a[4], async_finish=True)
    with event:
        pass
    assert calc_diff(combined.float() / layout["is_token_in_rank"].sum(1, keepdim=True), xa) < 5e-6
    try:
        EventOverlap_none = buffer.dispatch(xa, **layout)[5]
        EventOverlap_none.current_stream_wait()
    except RuntimeError as e:
        assert "not async_finish" in str(e)
    else:
        raise AssertionError("waiting on a synchronous call's event must raise")
    return 1


def _raises(exc, match, fn, *args, **kwargs):
    import re
    try:
        fn(*args, **kwargs)
    except exc as e:
        assert re.search(match, str(e)), f"{e!r} does not match {match!r}"
        return 1
    raise AssertionError(f"expected {exc.__name__} matching {match!r}")


def validation_checks(rank: int, num_ranks: int, device: str) -> int:
    """Bad input raises on every rank, naming the argument (never a hang or a silent wrong answer)."""
    gen = torch.Generator().manual_seed(5000)
    num_tokens, hidden, num_topk, num_experts = 8, 256, 2, 4 * num_ranks
    buffer = Buffer(dist.group.WORLD)
    topk_idx = routing(num_tokens, num_experts, num_topk, 0, device, gen)
    layout = _layout(buffer, topk_idx, num_experts)
    x = torch.randn(num_tokens, hidden, generator=gen).to(torch.bfloat16).to(device)
    n = 0
    n += _raises(ValueError, r"expert ids in \[.*\]; they must be", buffer.get_dispatch_layout, topk_idx + num_experts, num_experts)
    n += _raises(ValueError, "multiple of the group size", buffer.get_dispatch_layout, topk_idx, num_experts + 1)
    n += _raises(TypeError, "topk_idx must have dtype", buffer.get_dispatch_layout, topk_idx.float(), num_experts)
    n += _raises(TypeError, "x must have dtype", buffer.dispatch, x.to(torch.int32), **layout)
    fp8 = torch.zeros(num_tokens, 200, dtype=torch.float8_e4m3fn, device=device)
    n += _raises(ValueError, "multiple of 128", buffer.dispatch, (fp8, torch.ones(num_tokens, 2, device=device)), **layout)
    n += _raises(ValueError, "num_tokens_per_rank is required", buffer.dispatch, x)
    n += _raises(ValueError, "is_token_in_rank must be", buffer.dispatch, x, **{**layout, "is_token_in_rank": layout["is_token_in_rank"][:-1]})
    n += _raises(ValueError, "num_worst_tokens=.* slots", buffer.dispatch, x, num_worst_tokens=num_tokens, **layout)
    n += _raises(TypeError, "topk_weights must have dtype", buffer.dispatch, x, topk_idx=topk_idx,
                 topk_weights=torch.ones(num_tokens, num_topk, dtype=torch.float64, device=device), **layout)
    # out-of-range ids on one rank only: found in the count exchange, raised on every rank
    bad = topk_idx.clone()
    if rank == num_ranks - 1:
        bad[0, 0] = num_experts
    n += _raises(ValueError, f"topk_idx on rank {num_ranks - 1} holds expert ids", buffer.dispatch, x, topk_idx=bad, **layout)
    wrong = dict(layout, num_tokens_per_rank=layout["num_tokens_per_rank"] + (1 if rank == 0 else 0))
    n += _raises(ValueError, "num_tokens_per_rank on rank 0", buffer.dispatch, x, **wrong)
    recv_x, _, _, _, handle, _ = buffer.dispatch(x, topk_idx=topk_idx, **layout)
    n += _raises(ValueError, "takes no topk_idx", buffer.dispatch, x, handle=handle, topk_idx=topk_idx)
    n += _raises(ValueError, "x must have .* rows", buffer.combine, recv_x[:-1] if recv_x.shape[0] else torch.zeros(1, hidden, dtype=torch.bfloat16, device=device), handle)
    n += _raises(ValueError, r"bias\[0\] must be", buffer.combine, recv_x, handle, bias=x[:1])
    # low-latency mode
    n += _raises(ValueError, "more than num_max_dispatch_tokens_per_rank", buffer.low_latency_dispatch, x, topk_idx, num_tokens - 1, num_experts)
    n += _raises(ValueError, "multiple of 128", buffer.low_latency_dispatch, x[:, :200].contiguous(), topk_idx, num_tokens, num_experts)
    n += _raises(TypeError, "x must have dtype bfloat16", buffer.low_latency_dispatch, x.float(), topk_idx, num_tokens, num_experts)
    n += _raises(ValueError, "expert ids", buffer.low_latency_dispatch, x, topk_idx - 2, num_tokens, num_experts)
    n += _raises(ValueError, "cumulative_local_expert_recv_stats must have", buffer.low_latency_dispatch, x, topk_idx,
                 num_tokens, num_experts, cumulative_local_expert_recv_stats=torch.zeros(1, dtype=torch.int32, device=device))
    n += _raises(ValueError, "use_ue8m0 needs", buffer.low_latency_dispatch, x, topk_idx, num_tokens, num_experts, use_ue8m0=True)
    n += _raises(ValueError, "exclude each other", buffer.low_latency_dispatch, x, topk_idx, num_tokens, num_experts,
                 async_finish=True, return_recv_hook=True)
    n += _raises(TypeError, "normal-mode dispatch handle", buffer.dispatch, x, handle=(1, 2))
    fp8_x = (torch.zeros(num_tokens, hidden, dtype=torch.float8_e4m3fn, device=device),
             torch.ones(num_tokens, hidden // 128, device=device))
    n += _raises(ValueError, "autograd through an FP8 dispatch", buffer.dispatch, fp8_x, topk_idx=topk_idx,
                 topk_weights=torch.ones(num_tokens, num_topk, device=device, requires_grad=True), **layout)
    n += _raises(ValueError, "must be a positive int", Config, 0)
    n += _raises(ValueError, "must be even", Config, 3)
    # the symmetric-memory fast path: opt-in, with the reason; required on gloo -> a clear error
    assert buffer.transport == "all_to_all_single" and "not requested" in buffer.transport_reason
    n += _raises(ValueError, "use_symmetric_memory=True but .*backend is gloo", Buffer, dist.group.WORLD,
                 use_symmetric_memory=True)
    # the group still works after all that
    recv_x2 = buffer.dispatch(x, handle=handle)[0]
    assert torch.equal(recv_x, recv_x2)
    return n


def triton_round_trip_checks(rank: int, num_ranks: int) -> int:
    """Normal and low-latency round trips with the kernels forced to Triton (its CPU interpreter)."""
    import os

    gen = torch.Generator().manual_seed(6000 + rank)
    num_tokens, hidden, num_experts = 6, 256, 4 * num_ranks
    buffer = Buffer(dist.group.WORLD)
    topk_idx = routing(num_tokens, num_experts, 2, 2, "cpu", gen)
    x = torch.randn(num_tokens, hidden, generator=gen).to(torch.bfloat16)
    w = torch.rand(num_tokens, 2, generator=gen)
    previous = os.environ.get("OPENINFRA_KERNELS")
    os.environ["OPENINFRA_KERNELS"] = "triton"
    try:
        per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, num_experts)
        recv_x, _, _, _, handle, _ = buffer.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                                                     num_tokens_per_expert=per_expert, topk_idx=topk_idx)
        y, _, _ = buffer.combine(recv_x, handle)
        (rx, sf), _, h, _, _ = buffer.low_latency_dispatch(x, topk_idx, num_tokens, num_experts, use_fp8=True)
        deq = (rx.float().view(*rx.shape[:2], -1, 128) * sf.unsqueeze(-1)).view(rx.shape).to(torch.bfloat16)
        out, _, _ = buffer.low_latency_combine(deq, topk_idx, w, h)
    finally:
        if previous is None:
            del os.environ["OPENINFRA_KERNELS"]
        else:
            os.environ["OPENINFRA_KERNELS"] = previous
    assert calc_diff(y.float() / in_rank.sum(1, keepdim=True), x) < 5e-6
    assert calc_diff(x * w.masked_fill(topk_idx < 0, 0).sum(1, keepdim=True), out) < 9e-4
    return 1


def edge_checks(rank: int, num_ranks: int, device: str) -> int:
    """Empty sides: a rank with no tokens, ranks that receive nothing, tokens that go nowhere."""
    gen = torch.Generator().manual_seed(7000 + rank)
    hidden, num_topk, num_experts = 256, 2, 2 * num_ranks
    num_tokens = 0 if rank == 1 else 5
    buffer = Buffer(dist.group.WORLD)
    # every selected expert lives on rank 0; token 0 selects nothing at all
    topk_idx = torch.randint(0, 2, (num_tokens, num_topk), generator=gen)
    if num_tokens:
        topk_idx[0] = -1
        topk_idx[1] = torch.tensor([0, 1])
    topk_idx = topk_idx.to(device)
    x = torch.randn(num_tokens, hidden, generator=gen).to(torch.bfloat16).to(device)
    w = torch.rand(num_tokens, num_topk, generator=gen).to(device)
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, num_experts)
    layout = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
    for worst in (0, 5 * num_ranks):
        recv_x, recv_idx, recv_w, counts, handle, _ = buffer.dispatch(x, topk_idx=topk_idx, topk_weights=w,
                                                                      num_worst_tokens=worst, **layout)
        expected_rows = 4 * (num_ranks - 1) if rank == 0 else 0  # ranks other than 1 send 4 tokens each
        if worst:
            assert recv_x.shape[0] == worst and bool((recv_idx[expected_rows:] == -1).all())
        else:
            assert recv_x.shape[0] == expected_rows
            totals = [_all_gather_count(topk_idx, e) for e in range(2)]  # collective: every rank calls it
            assert counts == (totals if rank == 0 else [0, 0])
        y, yw, _ = buffer.combine(recv_x, handle, topk_weights=recv_w)
        assert y.shape == (num_tokens, hidden)
        if num_tokens:
            assert bool((y[0] == 0).all())  # sent nowhere: comes back as zeros
            assert torch.equal(y[1:], x[1:]) and torch.allclose(yw[1:], w[1:])
    (rx, cnt, h, _, _) = buffer.low_latency_dispatch(x, topk_idx, 5, num_experts, use_fp8=False)
    if rank != 0:
        assert int(cnt.sum()) == 0
    out, _, _ = buffer.low_latency_combine(rx, topk_idx, w, h)
    if num_tokens:
        ref = x.float() * w.masked_fill(topk_idx < 0, 0).sum(1, keepdim=True)
        assert bool((out[0] == 0).all()) and calc_diff(ref, out) < 1e-5
    return 1


def _all_gather_count(topk_idx: torch.Tensor, expert: int) -> int:
    """Tokens-with-expert count summed over ranks (each selection counts once)."""
    c = torch.tensor([int((topk_idx == expert).sum())], device=topk_idx.device if topk_idx.is_cuda else "cpu")
    _all_reduce_(c)
    return int(c)
