"""Where a training step's time goes: each variant's profiled step split into kinds of work, against the lower bound.

Every operator the step runs (``torch.profiler``, self CPU time) falls into one kind:

- ``base products``: the model's own matrix products and attention (the lower bound runs exactly these);
- ``rank-r products``: matrix products with an operand at most ``4·rank`` wide, i.e. the adapters' own
  (``x Aᵀ``, ``h Bᵀ``, ``∂y B``, ``hᵀ∂y``, …);
- ``dropout masks``: drawing and applying masks (``random_``, ``bernoulli_``, comparisons, bitwise ANDs);
- ``other``: element-wise work, norms, softmax, copies, autograd bookkeeping.

What a variant adds over the lower bound, per kind, shows which part of an adapter's overhead is which. The
rank-r products are the floor of any implementation that calls the BLAS library for them: on a CPU they
stream activations as wide as the layer through a product only r wide, at a fraction of the rate the
layer's own products reach. Variants are profiled round-robin, one step each per round, and the per-kind
times averaged over rounds. The profiler adds a little time to each operator, so totals run above the
unprofiled step times of ``train_step``; compare kinds, not absolute times.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from common import RANK, Shape, make_variant, step_fn

VARIANTS = ["lower_bound", "pk_lora_0", "pk_lora_0.05", "pk_dora_0", "pk_dora_0.05", "hf_lora_0", "hf_lora_0.05"]
KINDS = ("base products", "rank-r products", "dropout masks", "other")
PRODUCTS = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm"}
ATTENTION_PREFIX = "aten::_scaled_dot_product"
DROPOUT = {"aten::random_", "aten::bernoulli_", "aten::bernoulli", "aten::native_dropout",
           "aten::native_dropout_backward", "aten::bitwise_and", "aten::bitwise_and_", "aten::ge", "aten::neg_"}
#: Composite operators whose time is all in the operators they call (counted there, not here).
COMPOSITE = {"aten::matmul", "aten::linear", "aten::dropout", "aten::feature_dropout"}


def kind_of(name: str, shapes: list[Any], rank: int = RANK) -> str | None:
    """The kind of one profiled operator (``None`` for composite ones, counted through what they call)."""
    if name in COMPOSITE:
        return None
    if name in PRODUCTS:
        dims = [d for shape in shapes if isinstance(shape, list) and len(shape) >= 2 for d in shape[-2:]]
        return "rank-r products" if dims and min(dims) <= 4 * rank else "base products"
    if name.startswith(ATTENTION_PREFIX):
        return "base products"
    if name in DROPOUT:
        return "dropout masks"
    return "other"


def profile_step(fn: Any) -> Counter[str]:
    """Seconds of self CPU time per kind for one call of ``fn`` (the main thread's operators)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    totals: Counter[str] = Counter()
    for event in prof.key_averages(group_by_input_shape=True):
        kind = kind_of(event.key, event.input_shapes)
        if kind is not None:
            totals[kind] += event.self_cpu_time_total / 1e6
    return totals


def run(shape: Shape, rounds: int, variants: list[str] | None = None) -> dict[str, Any]:
    """Per variant: mean seconds per kind over ``rounds`` profiled steps, and each kind's excess over the lower
    bound as a fraction of the lower bound's profiled step."""
    names = variants or VARIANTS
    fns = {name: step_fn(name, make_variant(name, shape, share=True), shape) for name in names}
    for fn in fns.values():  # warm up (first calls allocate, form groups, fill caches)
        fn()
        fn()
    sums: dict[str, Counter[str]] = {name: Counter() for name in names}
    for _ in range(rounds):
        for name, fn in fns.items():
            sums[name].update(profile_step(fn))
    per_step = {name: {kind: sums[name][kind] / rounds for kind in KINDS} for name in names}
    result: dict[str, Any] = {"seconds_per_step": per_step, "rounds": rounds, "rank": RANK}
    if "lower_bound" in per_step:
        ref = per_step["lower_bound"]
        total_ref = sum(ref.values())
        result["excess_over_lower_bound"] = {
            name: {kind: (row[kind] - ref[kind]) / total_ref for kind in KINDS}
            for name, row in per_step.items() if name != "lower_bound"}
        result["ratios"] = [
            {"metric": f"profiled step {name} / lower_bound", "ratio": sum(row.values()) / total_ref,
             "target": None, "met": None} for name, row in per_step.items() if name != "lower_bound"]
        result["ratios"] += [
            {"metric": f"rank-r products {name} / lower_bound step", "ratio": row["rank-r products"] / total_ref,
             "target": None, "met": None} for name, row in per_step.items() if name != "lower_bound"]
    return result


def markdown(result: dict[str, Any]) -> str:
    lines = ["| variant | " + " | ".join(KINDS) + " | total |", "|---" + "|---:" * (len(KINDS) + 1) + "|"]
    for name, row in result["seconds_per_step"].items():
        cells = " | ".join(f"{row[kind] * 1e3:.1f}" for kind in KINDS)
        lines.append(f"| {name} | {cells} | {sum(row.values()) * 1e3:.1f} |")
    excess = result.get("excess_over_lower_bound", {})
    if excess:
        lines += ["", "Added over the lower bound, as a fraction of its step:", "",
                  "| variant | " + " | ".join(KINDS) + " | total |", "|---" + "|---:" * (len(KINDS) + 1) + "|"]
        for name, row in excess.items():
            cells = " | ".join(f"{row[kind]:+.1%}" for kind in KINDS)
            lines.append(f"| {name} | {cells} | {sum(row.values()):+.1%} |")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> Path | None:
    """Stacked bars of milliseconds per step by kind, one bar per variant (PNG); ``None`` without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = result["seconds_per_step"]
    names = list(rows)
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(names) + 2))
    left = [0.0] * len(names)
    for kind in KINDS:
        widths = [rows[name][kind] * 1e3 for name in names]
        ax.barh(names, widths, left=left, label=kind)
        left = [a + b for a, b in zip(left, widths, strict=True)]
    if "lower_bound" in rows:
        ax.axvline(sum(rows["lower_bound"].values()) * 1e3, color="black", linewidth=0.8, linestyle="--")
    ax.invert_yaxis()
    ax.set_xlabel("profiled CPU time per training step (ms)")
    ax.set_title("Where the step time goes (dashed: the lower bound)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=len(KINDS), fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
