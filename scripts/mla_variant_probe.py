"""Where does the Gluon decode kernel's time go? Variant timings (H200 probe, METHOD.md style).

Builds copies of `openinfra.kernels.flash_mla.gluon_kernel` with one piece of work removed each
(the outputs are then wrong; only the time matters) and times the decode at b = 128, s_k = 16,384,
h_q = 128 and 64, with the usual shuffled block table and with every page in L2:

    base      the kernel as it is
    s_rope    S over the 64 rope columns only (drops 8/9 of the Q K^T MMA)
    no_exp    P = S (no max, exp2 or row sums; alpha = 1)
    no_scale  no O rescale by alpha in either warpgroup
    no_pv_r   warpgroup 1 issues no P V (its half of the output stays zero)

    python3 scripts/mla_variant_probe.py     # prints JSON: us per (variant, shape, table)
"""
from __future__ import annotations

import json

import torch

import openinfra.kernels.flash_mla.gluon_kernel as gk

EDITS = {
    "base": [],
    "s_rope": [("""        s = warpgroup_mma(q_smem, k.permute((1, 0)), zero_s, use_acc=False, is_async=True)
        s = warpgroup_mma(qpe_smem, kpe_bufs.index(st).reshape([64, 64]).permute((1, 0)), s, is_async=True)""",
                """        s = warpgroup_mma(qpe_smem, kpe_bufs.index(st).reshape([64, 64]).permute((1, 0)), zero_s, use_acc=False,
                          is_async=True)""")],
    "no_exp": [("""        m_new = gl.maximum(m_i, gl.max(s, axis=1))
        m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = gl.exp2(m_i - m_safe)
        p = gl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + gl.sum(p, axis=1)
        m_i = m_new""", """        alpha = gl.full((64, ), 1.0, gl.float32, layout=gl.SliceLayout(1, s_layout))
        p = s""")],
    "no_scale": [("""        o = o * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
""", ""), ("""        o = o * alpha[:, None]
""", "")],
    "no_pv_r": [("""        o = warpgroup_mma(p_smem, k_bufs.index(st).reshape([64, 512]).slice(256, 256, dim=1), o, is_async=True)
        o = warpgroup_mma_wait(num_outstanding=0, deps=(o, ))
""", "")],
}


def load_variant(name: str):
    from kernel_variants import load_variant as load  # scripts/ is on the path when run as a script

    return load(gk, name, EDITS[name])


def main() -> None:
    from mla_l2_probe import decode_inputs  # scripts/ is on the path when run as a script

    from openinfra.bench.harness import gpu_time_ms
    from openinfra.kernels.flash_mla.metadata import build_schedule, default_num_sm_parts

    dev = torch.device("cuda")
    b, sk = 128, 16384
    lens, kv, tables = decode_inputs(dev, b, sk)
    res = {}
    for name in EDITS:
        mod = load_variant(name)
        for h_q in (128, 64):
            q = (torch.randn(b, 1, h_q, 576, device=dev) / 10).clamp_(-1, 1).to(torch.bfloat16)
            meta, splits = build_schedule(lens, default_num_sm_parts(dev, 1, h_q))
            pieces = meta.shape[0]
            out = torch.empty(b, 1, h_q, 512, dtype=q.dtype, device=dev)
            lse = torch.empty(b, h_q, 1, dtype=torch.float32, device=dev)
            oacc = torch.empty(pieces * h_q * 512, dtype=torch.float32, device=dev)
            lacc = torch.empty(pieces * h_q, dtype=torch.float32, device=dev)
            for tname, bt in tables.items():
                fn = lambda: mod.mla_decode_gluon(q, kv, lens, meta, splits, 576 ** -0.5, out=out, lse=lse,
                                                  block_table=bt, causal=False, oacc=oacc, lacc=lacc)
                fn()
                res[f"{name} h_q={h_q} {tname}"] = round(gpu_time_ms(fn) * 1e3, 1)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
