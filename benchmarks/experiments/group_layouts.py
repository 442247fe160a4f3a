"""Other ways to run a sibling group's LoRA products, timed against the way peftkit runs them.

One attention input of the reference batch (1024 tokens × 512) feeds q, k and v (512 → 512 each), LoRA rank 16 on
each; one forward and one backward of the group's products, with the output gradients given. Every variant
computes the same numbers (checked before timing, up to float rounding):

- ``base``: the frozen projections alone, ``yᵢ = x Wᵢᵀ`` and ``∂x = Σ ∂yᵢ Wᵢ`` (what the lower bound runs);
- ``peftkit``: what ``lora_groups.GroupedLoRA`` runs: one ``x [A_q; A_k; A_v]ᵀ``, the base products, each
  ``sᵢ hᵢ Bᵢᵀ`` added in place; backward one ``[gb_q gb_k gb_v]ᵀ x`` and every ``∂x`` term into one buffer;
- ``reordered``: the same products, backward ordered so that each ``∂yᵢ`` is read three times in a row
  (``∂yᵢ Bᵢ``, ``hᵢᵀ ∂yᵢ``, ``∂yᵢ Wᵢ``) while it may still be in cache;
- ``base_accumulates``: the adapter term first, then the base product added onto it by the BLAS call itself
  (``addmm`` with ``beta = s``) instead of a separate in-place addition;
- ``chunked``: all products per block of 256 tokens, so that each block's activations stay in cache
  between the base and the rank-r products;
- ``concatenated``: ``[W; A]`` and ``[W | s·B]`` built per step, so that ``x Aᵀ`` and ``∂y B`` ride along in the
  base products (one copy of each weight per step).

The result is the time each adds over ``base``, as a ratio of medians (interleaved rounds)::

    .venv/bin/python benchmarks/experiments/group_layouts.py [--rounds 60] [--out results/group_layouts.json]
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import environment, median, report, round_robin, timing_args  # noqa: E402

TOKENS, WIDTH, RANK, SCALE, SIBLINGS = 1024, 512, 16, 2.0, 3

Tensors = list[torch.Tensor]
Result = tuple[Tensors, torch.Tensor, torch.Tensor, Tensors]  # outputs, ∂x, ∂[A_q; A_k; A_v], [∂B_i]


def _operands() -> dict[str, torch.Tensor | Tensors]:
    gen = torch.Generator().manual_seed(0)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * scale

    As = [randn(RANK, WIDTH, scale=0.02) for _ in range(SIBLINGS)]
    return {"x": randn(TOKENS, WIDTH), "Ws": [randn(WIDTH, WIDTH, scale=0.02) for _ in range(SIBLINGS)],
            "As": As, "a_cat": torch.cat(As), "Bs": [randn(WIDTH, RANK, scale=0.02) for _ in range(SIBLINGS)],
            "gs": [randn(TOKENS, WIDTH) for _ in range(SIBLINGS)]}


def variants(ops: dict[str, torch.Tensor | Tensors]) -> dict[str, Callable[[], object]]:
    x, a_cat = ops["x"], ops["a_cat"]
    Ws, As, Bs, gs = ops["Ws"], ops["As"], ops["Bs"], ops["gs"]
    assert isinstance(x, torch.Tensor) and isinstance(a_cat, torch.Tensor)
    assert isinstance(Ws, list) and isinstance(As, list) and isinstance(Bs, list) and isinstance(gs, list)
    s, r = SCALE, RANK

    def base() -> tuple[Tensors, torch.Tensor]:
        ys = [F.linear(x, W) for W in Ws]
        gx = torch.mm(gs[0], Ws[0])
        for g, W in zip(gs[1:], Ws[1:], strict=True):
            gx.addmm_(g, W)
        return ys, gx

    def cols(t: torch.Tensor, i: int) -> torch.Tensor:
        return t[:, i * r:(i + 1) * r]  # sibling i's r columns of a concatenated (tokens, 3r) tensor

    def forward() -> tuple[Tensors, torch.Tensor]:
        h = F.linear(x, a_cat)
        pairs = enumerate(zip(Ws, Bs, strict=True))
        return [F.linear(x, W).addmm_(cols(h, i), B.t(), alpha=s) for i, (W, B) in pairs], h

    def _backward_tail(gbs: Tensors, gx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gb = torch.cat(gbs, 1)
        return gx.addmm_(gb, a_cat), gb.t() @ x

    def backward(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Tensors]:
        """peftkit's backward: ``(∂x, ∂[A_q; A_k; A_v], [∂B_i])``."""
        gbs = [(g @ B).mul_(s) for g, B in zip(gs, Bs, strict=True)]
        gBs = [torch.mm(cols(h, i).t(), g).t().mul_(s) for i, g in enumerate(gs)]
        gb = torch.cat(gbs, 1)
        gA = gb.t() @ x
        gx = gb @ a_cat
        for g, W in zip(gs, Ws, strict=True):
            gx.addmm_(g, W)
        return gx, gA, gBs

    def peftkit() -> Result:
        ys, h = forward()
        return (ys, *backward(h))

    def reordered() -> Result:
        ys, h = forward()
        gbs, gBs = [], []
        gx = torch.empty(0)
        for i, (g, B, W) in enumerate(zip(gs, Bs, Ws, strict=True)):
            gbs.append((g @ B).mul_(s))
            gBs.append(torch.mm(cols(h, i).t(), g).t().mul_(s))
            gx = torch.mm(g, W) if i == 0 else gx.addmm_(g, W)
        gx, gA = _backward_tail(gbs, gx)
        return ys, gx, gA, gBs

    def base_accumulates() -> Result:
        h = F.linear(x, a_cat)
        ys = [torch.mm(cols(h, i), B.t()).addmm_(x, W.t(), beta=s)
              for i, (W, B) in enumerate(zip(Ws, Bs, strict=True))]
        return (ys, *backward(h))

    def chunked(block: int = 256) -> Result:
        ys = [torch.empty(TOKENS, W.shape[0]) for W in Ws]
        h = torch.empty(TOKENS, SIBLINGS * r)
        gx = torch.empty(TOKENS, WIDTH)
        gA = torch.zeros(SIBLINGS * r, WIDTH)
        gBs = [torch.zeros(W.shape[0], r) for W in Ws]
        for start in range(0, TOKENS, block):
            rows = slice(start, start + block)
            xc = x[rows]
            hc = torch.mm(xc, a_cat.t(), out=h[rows])
            for i, (y, W, B) in enumerate(zip(ys, Ws, Bs, strict=True)):
                torch.mm(xc, W.t(), out=y[rows]).addmm_(cols(hc, i), B.t(), alpha=s)
        for start in range(0, TOKENS, block):
            rows = slice(start, start + block)
            gbs = []
            for i, (g, B, W) in enumerate(zip(gs, Bs, Ws, strict=True)):
                gc = g[rows]
                gbs.append((gc @ B).mul_(s))
                gBs[i].addmm_(gc.t(), cols(h[rows], i), alpha=s)
                if i == 0:
                    torch.mm(gc, W, out=gx[rows])
                else:
                    gx[rows].addmm_(gc, W)
            gb = torch.cat(gbs, 1)
            gA.addmm_(gb.t(), x[rows])
            gx[rows].addmm_(gb, a_cat)
        return ys, gx, gA, gBs

    def concatenated() -> Result:
        ys, hs, gbs, gBs = [], [], [], []
        gx = torch.empty(0)
        for W, A, B in zip(Ws, As, Bs, strict=True):
            z = x @ torch.cat([W, A]).t()
            y, h = z[:, :WIDTH], z[:, WIDTH:]
            ys.append(y.addmm_(h, B.t(), alpha=s))
            hs.append(h)
        for i, (g, W, B) in enumerate(zip(gs, Ws, Bs, strict=True)):
            u = g @ torch.cat([W, B * s], 1)
            gbs.append(u[:, WIDTH:])
            gx = u[:, :WIDTH].contiguous() if i == 0 else gx.add_(u[:, :WIDTH])
            gBs.append(torch.mm(hs[i].t(), g).t().mul_(s))
        gx, gA = _backward_tail(gbs, gx)
        return ys, gx, gA, gBs

    return {"base": base, "peftkit": peftkit, "reordered": reordered, "base_accumulates": base_accumulates,
            "chunked": chunked, "concatenated": concatenated}


def check(fns: dict[str, Callable[[], object]]) -> None:
    """Every variant gives peftkit's numbers (outputs, ∂x, ∂A, ∂B) up to float rounding."""
    want = fns["peftkit"]()
    assert isinstance(want, tuple)
    for name, fn in fns.items():
        if name in ("base", "peftkit"):
            continue
        got = fn()
        assert isinstance(got, tuple)
        for a, b in zip(want, got, strict=True):
            for u, v in zip(a if isinstance(a, list) else [a], b if isinstance(b, list) else [b], strict=True):
                torch.testing.assert_close(v, u, rtol=1e-4, atol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def main() -> None:
    args = timing_args(__doc__, rounds=60, quick="no effect: the shapes here are small already")
    torch.set_num_threads(2)
    fns = variants(_operands())
    check(fns)
    times = round_robin(fns, rounds=args.rounds, warmup=3)
    medians = {k: median(v) for k, v in times.items()}
    ratios = {f"{k} / base": v / medians["base"] for k, v in medians.items() if k != "base"}
    result = {"experiment": "group_layouts", "tokens": TOKENS, "width": WIDTH, "rank": RANK, "siblings": SIBLINGS,
              "rounds": args.rounds, "median_s": medians, "ratios": ratios, "times_s": times,
              "environment": environment()}
    report(medians, ratios, result, args.out)


if __name__ == "__main__":
    main()
