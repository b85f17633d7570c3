"""Where the FP8 model's distance from bf16 comes from, on CPU through deep_gemm's reference path.

    .venv/bin/python -m tests.model.fp8_breakdown            # ~5 minutes on one CPU thread

The gpu tier's comparison (tests/model/test_gpu.py: ``small``, 4 dense layers, bf16, 4 x 256
tokens, same weights, calc_diff of the logits) with each projection's precision chosen per run:
``fp8`` (deep_gemm.fp8_linear: 1x128 activation scales, 128x128 weight scales, e4m3, fp32
accumulation), ``w`` (only the weight rounded to e4m3, GEMM in bf16), ``a`` (only the activation
rounded) or ``bf16``. The figures are the ones quoted in docs/model.md ("FP8 numerics").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import openinfra.kernels.deep_gemm as dg
from openinfra.kernels.deep_gemm.gemm.reference import dequantize
from openinfra.model import Linear, Transformer, get_config

KINDS = ("wq_a", "wq_b", "wkv_b", "wo", "w1", "w2", "w3")


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double(), y.double()
    return float(1 - 2 * (x * y).sum() / (x * x + y * y).sum())


def round_activation(x: torch.Tensor) -> torch.Tensor:
    flat = x.reshape(-1, x.shape[-1])
    return dequantize(*dg.per_token_cast_to_fp8(flat)).view(x.shape).to(x.dtype)


def round_weight(w: torch.Tensor) -> torch.Tensor:
    return dequantize(*dg.per_block_cast_to_fp8(w)).to(w.dtype)


class Precision:
    """Installs a per-projection precision on every FP8-eligible :class:`Linear` of a model."""

    def __init__(self, model: Transformer):
        self.names = {}
        for name, mod in model.named_modules():
            if isinstance(mod, Linear) and mod.in_features % 128 == 0 and mod.out_features % 128 == 0:
                self.names[name] = mod
                mod.forward = self._forward(name, mod)
        self.modes: dict[str, str] = {}
        self.default = "fp8"

    def set(self, default: str = "fp8") -> "Precision":
        self.default, self.modes = default, {}
        return self

    def only(self, pick, mode: str = "fp8", rest: str = "bf16") -> "Precision":
        self.default = rest
        self.modes = {n: mode for n in self.names if pick(n)}
        return self

    def _forward(self, name: str, mod: Linear):
        def forward(x: torch.Tensor) -> torch.Tensor:
            mode = self.modes.get(name, self.default)
            if mode == "fp8":
                return dg.fp8_linear(x, mod.weight)
            if mode == "w":
                return F.linear(x, round_weight(mod.weight))
            if mode == "a":
                return F.linear(round_activation(x), mod.weight)
            return F.linear(x, mod.weight)
        return forward


def dense_pair(n_layers: int = 4, dtype: torch.dtype = torch.bfloat16):
    torch.manual_seed(0)
    cfg = get_config("small", n_layers=n_layers, n_dense_layers=n_layers)
    ref = Transformer(cfg).to(dtype)
    fp8 = Transformer(cfg.replace(gemm="fp8")).to(dtype)
    fp8.load_state_dict(ref.state_dict())
    return cfg, ref, fp8, Precision(fp8)


def tokens_for(cfg, seed: int = 1, shape=(4, 256)) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def main() -> None:
    torch.set_num_threads(1)
    cfg, ref, fp8, prec = dense_pair()
    tokens = tokens_for(cfg)
    h_ref = ref.hidden(tokens)
    logits_ref = ref.logits(h_ref)

    def run(_: Precision) -> float:  # takes the configured Precision to read as run(prec.only(...))
        return calc_diff(logits_ref, fp8(tokens))

    prec.set("fp8")
    h = fp8.hidden(tokens)
    print(f"all FP8: logits {calc_diff(logits_ref, fp8.logits(h)):.2e}, final hidden {calc_diff(h_ref, h):.2e}")
    torch.manual_seed(0)
    f32 = Transformer(cfg).float()
    f32.load_state_dict(ref.state_dict())
    lf = f32(tokens)
    print(f"against fp32: FP8 {calc_diff(lf, fp8(tokens)):.2e}, bf16 {calc_diff(lf, logits_ref):.2e}")
    print(f"weights only rounded: {run(prec.set('w')):.2e}; activations only: {run(prec.set('a')):.2e}")

    print("\nFP8 in one kind of projection (all layers) | all but that kind | weight only | activation only")
    for k in KINDS:
        pick = lambda n, k=k: n.endswith(k)  # noqa: E731
        only = run(prec.only(pick))
        all_but = run(prec.only(pick, "bf16", "fp8"))
        w, a = run(prec.only(pick, "w")), run(prec.only(pick, "a"))
        print(f"  {k:6s} {only:.2e} | {all_but:.2e} | {w:.2e} | {a:.2e}")

    print("\nFP8 in one layer only: whole layer, attention projections, FFN")
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        print(f"  layer {i}: {run(prec.only(lambda n: n.startswith(p))):.2e}, "
              f"attn {run(prec.only(lambda n: n.startswith(p + 'attn'))):.2e}, "
              f"ffn {run(prec.only(lambda n: n.startswith(p + 'ffn'))):.2e}")

    # propagation: layer 0 in FP8 only, error at each layer's output
    outs: dict[str, list[torch.Tensor]] = {"ref": [], "fp8": []}
    hooks = [blk.register_forward_hook(lambda m, a, o: outs["ref"].append(o)) for blk in ref.layers]
    hooks += [blk.register_forward_hook(lambda m, a, o: outs["fp8"].append(o)) for blk in fp8.layers]
    ref.hidden(tokens)
    prec.only(lambda n: n.startswith("layers.0."))
    fp8.hidden(tokens)
    for hk in hooks:
        hk.remove()
    print("\nlayer 0 in FP8 only, error after each layer:",
          ", ".join(f"{calc_diff(a, b):.2e}" for a, b in zip(outs["ref"], outs["fp8"])))

    # local errors only: every block fed the bf16 hidden state, the differences summed, no propagation
    prec.set("fp8")
    cos, sin = ref.rope_tables(torch.arange(tokens.shape[1])[None], tokens.shape[1] - 1)
    x = ref.embed(tokens)
    total = torch.zeros_like(x, dtype=torch.float32)
    for rb, fb in zip(ref.layers, fp8.layers):
        nxt = rb(x, cos, sin)
        total += fb(x, cos, sin).float() - nxt.float()
        x = nxt
    print(f"local errors only (no propagation), final hidden: {calc_diff(x.float(), x.float() + total):.2e}")

    print("\nkept in bf16 (the rest FP8):")
    for label, pick in [("wkv_b", lambda n: n.endswith("wkv_b")), ("wo", lambda n: n.endswith("wo")),
                        ("w2", lambda n: n.endswith("w2")), ("attention projections", lambda n: ".attn." in n),
                        ("layer 0", lambda n: n.startswith("layers.0.")),
                        ("layers 0 and 3", lambda n: n.startswith(("layers.0.", "layers.3."))),
                        ("layers 0 and 1", lambda n: n.startswith(("layers.0.", "layers.1."))),
                        ("FFN (w1, w2, w3)", lambda n: ".ffn." in n)]:
        print(f"  {label:22s} {run(prec.only(pick, 'bf16', 'fp8')):.2e}")

    print("\nby depth (token seeds 1, 2, 3):")
    for n_layers in (1, 2, 4, 8):
        c, r, f, p = dense_pair(n_layers)
        p.set("fp8")
        print(f"  {n_layers} layers: " + ", ".join(f"{calc_diff(r(t), f(t)):.2e}"
                                               for t in (tokens_for(c, s) for s in (1, 2, 3))))

    torch.manual_seed(0)
    a, w = torch.randn(1024, 512), torch.randn(1536, 512) / 512 ** 0.5
    exact = a @ w.T
    print(f"\none Gaussian GEMM 1024x1536x512 against fp32: FP8 {calc_diff(dg.fp8_linear(a, w), exact):.2e} "
          f"(ue8m0 scales {calc_diff(dg.fp8_linear(a, w, use_ue8m0=True), exact):.2e}), "
          f"weight rounded only {calc_diff(a @ round_weight(w).T, exact):.2e}, "
          f"activation rounded only {calc_diff(round_activation(a) @ w.T, exact):.2e}")


if __name__ == "__main__":
    main()
