"""The benchmark runner: peftkit against HF PEFT on the reference Llama (issue 10), as ratios of medians.

    .venv/bin/python benchmarks/run.py [--quick] [--rounds N] [--only train,inference,...,arithmetic] [--out DIR]

Experiments (``benchmarks/experiments/``): ``train_step`` (full fine-tuning, the lower bound, HF PEFT and
peftkit LoRA/DoRA with dropout 0 and 0.05, round-robin in one process), ``inference`` (unmerged prefill and
one-token decode against the base model), ``adapter_ops`` (merge, save, load) and ``memory`` (saved activations
and peak memory of a training step, one process per variant) and ``breakdown`` (each variant's profiled step
split into the model's own products, the adapters' rank-r products, dropout masks and the rest) and
``arithmetic`` (the operations a LoRA step adds to the lower bound's: the floor under its step-time ratio). Writes
``bench.json`` (environment, git revision, raw timings, ratios), ``bench.md`` (the ratio table with the issue's
targets and the breakdown) and ``breakdown.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "experiments"))

import adapter_ops  # noqa: E402
import arithmetic  # noqa: E402
import breakdown  # noqa: E402
import inference  # noqa: E402
import memory  # noqa: E402
import train_step  # noqa: E402
from common import ALPHA, FULL, QUICK, RANK, THREADS, environment, setup_torch  # noqa: E402

EXPERIMENTS = ("train", "inference", "ops", "memory", "breakdown", "arithmetic")


def markdown(result: dict[str, Any]) -> str:
    env = result["environment"]
    lines = [
        "# peftkit vs HF PEFT", "",
        f"Llama {result['shape']}, fp32, {env['threads']} threads, LoRA rank {RANK} alpha {ALPHA} on all seven "
        f"projections. Git {env['git_revision'][:10]}{' (dirty)' if env['git_dirty'] else ''}, torch {env['torch']}, "
        f"peft {env['peft']}, transformers {env['transformers']}. Load average at start "
        f"{env['load_average_start']}, at end {env.get('load_average_end')} (other jobs on the machine make timings "
        "noisy; variants are interleaved and medians compared).", "",
        "| measure | ratio | target | met |", "|---|---:|---:|:---:|",
    ]
    for exp in EXPERIMENTS:
        for row in result.get(exp, {}).get("ratios", []):
            target = "" if row["target"] is None else f"≤ {row['target']:.2f}"
            met = "" if row["met"] is None else ("yes" if row["met"] else "no")
            lines.append(f"| {row['metric']} | {row['ratio']:.3f} | {target} | {met} |")
    lines += ["", "| variant | median train step (s) |", "|---|---:|"]
    for name, value in result.get("train", {}).get("median_s", {}).items():
        lines.append(f"| {name} | {value:.3f} |")
    mem = result.get("memory", {}).get("per_variant", {})
    if mem:
        lines += ["", "| variant | saved activations (MiB) | peak RSS over the step (MiB) |", "|---|---:|---:|"]
        for name, row in mem.items():
            saved = row.get("saved_bytes")
            rss = row.get("peak_rss_delta_bytes")
            lines.append(f"| {name} | {'' if saved is None else f'{saved / 2**20:.1f}'} | "
                         f"{'' if rss is None else f'{rss / 2**20:.1f}'} |")
    if "breakdown" in result:
        lines += ["", "Where a training step's time goes (profiled ms per step; `experiments/breakdown.py`):", "",
                  breakdown.markdown(result["breakdown"]).rstrip()]
    skipped = {k: v for exp in EXPERIMENTS for k, v in result.get(exp, {}).get("skipped", {}).items()}
    if skipped:
        lines += ["", "Skipped: " + "; ".join(f"{k} ({v})" for k, v in skipped.items())]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description="peftkit vs HF PEFT benchmark (issue 10)")
    parser.add_argument("--quick", action="store_true", help="a small model, for a smoke run")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per variant (default 5)")
    parser.add_argument("--only", default=",".join(EXPERIMENTS), help=f"comma-separated subset of {EXPERIMENTS}")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--threads", type=int, default=THREADS,
                        help=f"torch threads (default {THREADS}, the reference; 1 suffers less from a busy machine)")
    parser.add_argument("--budget-s", type=float, default=480.0,
                        help="the training experiment starts no new round after half of this (default 480)")
    args = parser.parse_args(argv)
    only = [e.strip() for e in args.only.split(",") if e.strip()]
    unknown = sorted(set(only) - set(EXPERIMENTS))
    if unknown:
        parser.error(f"unknown experiment(s) {unknown}; choose from {EXPERIMENTS}")
    setup_torch(args.threads)
    shape = QUICK if args.quick else FULL
    result: dict[str, Any] = {"shape": shape.__dict__, "threads": args.threads, "rounds": args.rounds,
                              "environment": environment()}
    started = time.perf_counter()
    runners = {
        "train": lambda: train_step.run(shape, args.rounds, deadline=started + args.budget_s / 2),
        "inference": lambda: inference.run(shape, args.rounds),
        "ops": lambda: adapter_ops.run(shape, args.rounds),
        "memory": lambda: memory.run(shape, args.quick),
        "breakdown": lambda: breakdown.run(shape, max(2, args.rounds // 2)),
        "arithmetic": lambda: arithmetic.run(shape),
    }
    for exp in only:
        t0 = time.perf_counter()
        result[exp] = runners[exp]()
        result[exp]["wall_s"] = time.perf_counter() - t0
        print(f"{exp}: {result[exp]['wall_s']:.0f} s", flush=True)
        for row in result[exp].get("ratios", []):
            print(f"  {row['metric']}: {row['ratio']:.3f}" + (f" (target ≤ {row['target']})" if row["target"] else ""))
    result["wall_s"] = time.perf_counter() - started
    result["environment"]["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    args.out.mkdir(parents=True, exist_ok=True)
    stem = ("bench-quick" if args.quick else "bench") + ("" if args.threads == THREADS else f"-{args.threads}t")
    stem += "" if set(only) == set(EXPERIMENTS) else "-" + "-".join(only)
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / f"{stem}.md").write_text(markdown(result))
    if "breakdown" in result:
        breakdown.plot(result["breakdown"], args.out / f"{stem}-breakdown.png")
    print(f"wrote {args.out / stem}.json and .md ({result['wall_s']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
