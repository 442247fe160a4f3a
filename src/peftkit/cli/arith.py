"""``peftkit combine``, ``prune`` and ``convert``: adapter arithmetic on Hugging Face PEFT adapter directories.

::

    peftkit combine A B --weights 0.7 0.3 --method ties --density 0.5 --model BASE --out DIR
    peftkit prune ADAPTER --energy 0.95 --model BASE --out DIR
    peftkit convert ADAPTER --to canonical --model BASE --out DIR

``--model`` is the base the adapters were trained on: a local ``transformers`` model directory or its
``config.json`` (random weights are enough where only the adapters' factors are read; the base matters for the
output drift ``prune`` reports, and ``combine`` of DoRA adapters or of adapters with ``modules_to_save`` measures
their magnitudes and copies from the base weights, so for adapters trained on a model with weights it needs the
directory that holds them). Everything is read and checked before ``--out`` is written, and each output file is
replaced atomically.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftkit.errors import ConfigError

__all__ = ["combine_command", "convert_command", "prune_command", "register_combine", "register_convert",
           "register_prune"]

#: HF PEFT ``task_type`` → the model head peftkit builds.
_TASKS = {"CAUSAL_LM": "causal_lm", "SEQ_2_SEQ_LM": "seq2seq", "SEQ_CLS": "classification"}


def _base_model(model_path: str, task: str | None, task_type: str | None, num_labels: int) -> nn.Module:
    from peftkit.train.tasks import build_model, model_config

    task = task or _TASKS.get(task_type or "", "causal_lm")
    return build_model(model_config(model_path, task, num_labels), num_labels)


def _check_out(out: str, inputs: list[str]) -> None:
    """``--out`` must be a directory or not exist yet, and apart from the input adapters ``inputs`` (it is written
    into, so it must neither be one of them, hold one nor lie inside one); checked before any work."""
    if Path(out).exists() and not Path(out).is_dir():
        raise ConfigError(f"--out {out!r} is an existing file, not a directory; pass a new or existing directory")
    target = Path(out).resolve()
    for adapter in inputs:
        source = Path(adapter).resolve()
        if target == source or source in target.parents or target in source.parents:
            raise ConfigError(f"--out {out!r} overlaps the input adapter directory {adapter!r} (is it, holds it or "
                              "lies inside it) and would overwrite it; choose another --out")


def _as_options(check: Callable[[], object], options: Mapping[str, str]) -> None:
    """Run the library validator ``check``; its errors name the command-line options (``options``: library argument
    → option) instead of the library's arguments (``target_rank=3`` → ``--rank 3``)."""
    try:
        check()
    except ConfigError as exc:
        names = "|".join(map(re.escape, options))
        message = re.sub(rf"(?<![\w-])({names})=(?![\s,;)]|$)", lambda m: f"{options[m[1]]} ", str(exc))
        message = re.sub(rf"(?<![\w-])({names})=", lambda m: options[m[1]], message)
        raise ConfigError(message) from None


def _check_same_base(configs: list[dict[str, Any]], dirs: list[str]) -> None:
    bases = {d: c.get("base_model_name_or_path") for d, c in zip(dirs, configs, strict=True)}
    if len({b for b in bases.values() if b}) > 1:
        raise ConfigError(f"the adapters were trained on different base models {bases}; combine adapters of one base")
    types = {d: c.get("peft_type") for d, c in zip(dirs, configs, strict=True)}
    if set(types.values()) != {"LORA"}:
        raise ConfigError(f"combine reads LoRA adapters; got peft_type {types}")
    tasks = {c.get("task_type") for c in configs}
    if len(tasks) > 1:
        raise ConfigError(f"the adapters have different task types {sorted(map(str, tasks))}")


def _check_base_weights(model_path: str, configs: list[dict[str, Any]], dirs: list[str]) -> None:
    """DoRA magnitudes and ``modules_to_save`` copies combine as offsets from the base weights: refuse the random ones
    of a config.json for adapters trained on a model with weights (one that records its path; a config.json base is
    seeded, so adapters trained on it get the same weights back)."""
    from peftkit.train.tasks import _config_dict

    needs = {d: c["base_model_name_or_path"] for d, c in zip(dirs, configs, strict=True)
             if (c.get("use_dora") or c.get("modules_to_save")) and c.get("base_model_name_or_path")}
    if needs and _config_dict(model_path) is not None:
        raise ConfigError(
            f"{sorted(needs)} are DoRA adapters or train modules in full (modules_to_save), which combine relative to "
            f"the base model's weights, but --model {model_path!r} holds no weights (a config.json builds random "
            f"ones); pass the model directory with the weights they were trained on ({sorted(set(needs.values()))})"
        )


def combine_command(args: argparse.Namespace) -> int:
    """Run ``peftkit combine``: load the adapters onto ``--model``, combine, save to ``--out``."""
    from peftkit.io.hf_format import load_adapter, read_config, save_adapter
    from peftkit.merge.combine import check_options, combine
    from peftkit.train.tasks import check_model_path

    _check_out(args.out, list(args.adapters))
    dirs = list(args.adapters)
    if len(dirs) < 1:
        raise ConfigError("name at least one adapter directory to combine")
    weights = list(args.weights) if args.weights is not None else [1.0] * len(dirs)
    if len(weights) != len(dirs):
        raise ConfigError(f"got {len(weights)} weights for {len(dirs)} adapters: pass one --weights value per adapter")
    if bad := [w for w in weights if not math.isfinite(w)]:
        raise ConfigError(f"--weights {bad[0]!r} is not a finite number; pass finite weights")
    _as_options(lambda: check_options(args.method, args.density, args.majority_sign_method, args.rank, args.seed),
                {"method": "--method", "density": "--density", "majority_sign_method": "--majority-sign-method",
                 "rank": "--rank", "seed": "--seed"})
    check_model_path(args.model, "--model")
    configs = [read_config(d) for d in dirs]
    _check_same_base(configs, dirs)
    _check_base_weights(args.model, configs, dirs)
    model = _base_model(args.model, args.task, configs[0].get("task_type"), args.num_labels)
    names = [f"adapter{i}" for i in range(len(dirs))]
    for directory, name in zip(dirs, names, strict=True):
        load_adapter(model, directory, name=name)
    combine(
        model,
        dict(zip(names, weights, strict=True)),
        method=args.method,
        name="combined",
        rank=args.rank,
        density=args.density,
        majority_sign_method=args.majority_sign_method,
        seed=args.seed,
    )
    save_adapter(model, args.out, "combined")
    ranks = sorted({int(A.shape[0]) for A in _factor_A(model, "combined")})
    print(f"combined {len(dirs)} adapters with {args.method} (rank {ranks}) -> {args.out}")
    return 0


def _factor_A(model: nn.Module, name: str) -> list[torch.Tensor]:
    from peftkit.core.state import adapter_layers
    from peftkit.merge.combine import factors
    from peftkit.methods.lora_layers import LoRALayer

    # The low-rank layers only: a modules_to_save copy has no factors.
    return [factors(layer, name)[0] for _, layer in adapter_layers(model)
            if isinstance(layer, LoRALayer) and layer.has_adapter(name)]


def _random_batch(model: nn.Module, task: str) -> torch.Tensor | None:
    """A fixed batch of token ids for the drift report (causal LMs and classifiers only)."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if task == "seq2seq" or not vocab:
        return None
    return torch.randint(0, int(vocab), (2, 16), generator=torch.Generator().manual_seed(0))


def prune_command(args: argparse.Namespace) -> int:
    """Run ``peftkit prune``: load the adapter onto ``--model``, prune it, save to ``--out``, print the report."""
    from peftkit.io.hf_format import load_adapter, read_config, save_adapter
    from peftkit.merge.prune import check_options, prune
    from peftkit.train.tasks import check_model_path

    _check_out(args.out, [args.adapter])
    _as_options(lambda: check_options(args.method, args.rank, args.energy, args.sparsity),
                {"method": "--method", "target_rank": "--rank", "energy": "--energy", "sparsity": "--sparsity"})
    check_model_path(args.model, "--model")
    data = read_config(args.adapter)
    if data.get("peft_type") != "LORA":
        raise ConfigError(f"prune reads LoRA adapters; {args.adapter!r} has peft_type {data.get('peft_type')!r}")
    task = args.task or _TASKS.get(data.get("task_type") or "", "causal_lm")
    model = _base_model(args.model, task, None, args.num_labels)
    load_adapter(model, args.adapter, name="default", activate=True)
    report = prune(
        model,
        "default",
        method=args.method,
        target_rank=args.rank,
        energy=args.energy,
        sparsity=args.sparsity,
        batch=_random_batch(model, task),
    )
    save_adapter(model, args.out, "default")
    print(report)
    print(f"pruned adapter -> {args.out}")
    return 0


def convert_command(args: argparse.Namespace) -> int:
    """Run ``peftkit convert``: load a LoRA adapter onto ``--model`` and save it in the ``--to`` layout to ``--out``.

    ``canonical``: an A and B per logical part of each fused projection (q, k, v; gate, up), as
    ``pk.CanonicalLoRA`` trains them; ``performant``: one adapter per fused projection (``pk.LoRA`` on role names).
    The conversion is exact (``peftkit.methods.convert``): both files give the same outputs.
    """
    from peftkit.io.hf_format import load_adapter, read_config, save_adapter
    from peftkit.train.tasks import check_model_path

    _check_out(args.out, [args.adapter])
    check_model_path(args.model, "--model")
    data = read_config(args.adapter)
    if data.get("peft_type") not in ("LORA", "CANONICAL_LORA"):
        raise ConfigError(f"convert reads LoRA adapters; {args.adapter!r} has peft_type {data.get('peft_type')!r}")
    task = args.task or _TASKS.get(data.get("task_type") or "", "causal_lm")
    model = _base_model(args.model, task, None, args.num_labels)
    load_adapter(model, args.adapter, name="default", activate=True)
    save_adapter(model, args.out, "default", layout=args.to)
    print(f"{args.to} adapter -> {args.out}")
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="base model: a local transformers model directory or config.json")
    p.add_argument("--out", required=True, help="output adapter directory")
    p.add_argument("--task", choices=["causal_lm", "seq2seq", "classification"], help="default: from task_type")
    p.add_argument("--num-labels", type=int, default=2, help="classes, for classification models")


def register_combine(sub: Any) -> None:
    """Add ``peftkit combine`` to the subparsers ``sub``."""
    from peftkit.merge.combine import COMBINATION_METHODS

    p = sub.add_parser(
        "combine",
        help="combine LoRA adapters into one (cat, svd, ties, dare, ...)",
        description="Build one LoRA adapter from several trained on the same base, in HF PEFT's format.",
    )
    p.add_argument("adapters", nargs="+", metavar="ADAPTER", help="adapter directories")
    p.add_argument("--weights", type=float, nargs="+", help="one weight per adapter (default: 1.0 each)")
    p.add_argument("--method", default="cat", choices=COMBINATION_METHODS, help="default: cat (exact)")
    p.add_argument("--density", type=float, help="fraction kept, in (0, 1], for ties/dare/magnitude_prune")
    p.add_argument("--majority-sign-method", default="total", choices=["total", "frequency"],
                   help="how ties/dare_ties elect each entry's sign: by summed value or by count (default: total)")
    p.add_argument("--rank", type=int, help="new rank for the *svd methods")
    p.add_argument("--seed", type=int, help="seed of DARE's random drops")
    _common(p)
    p.set_defaults(func=combine_command)


def register_prune(sub: Any) -> None:
    """Add ``peftkit prune`` to the subparsers ``sub``."""
    p = sub.add_parser(
        "prune",
        help="shrink a LoRA adapter's rank by SVD, or zero its small entries",
        description="Prune ADAPTER (an HF PEFT LoRA directory) and write the result to --out.",
    )
    p.add_argument("adapter", metavar="ADAPTER", help="adapter directory")
    p.add_argument("--method", default="rank", choices=["rank", "magnitude"],
                   help="rank: truncate each update's SVD; magnitude: zero the factors' small entries (default: rank)")
    p.add_argument("--energy", type=float, default=0.99,
                   help="fraction of squared norm kept per module: of each update ΔW with --method rank, "
                   "of each factor (A, B) with --method magnitude (default 0.99)")
    p.add_argument("--rank", type=int, help="rank to keep in every module (overrides --energy)")
    p.add_argument("--sparsity", type=float, help="with --method magnitude: fraction of entries zeroed")
    _common(p)
    p.set_defaults(func=prune_command)


def register_convert(sub: Any) -> None:
    """Add ``peftkit convert`` to the subparsers ``sub``."""
    from peftkit.methods.convert import LAYOUTS

    p = sub.add_parser(
        "convert",
        help="rewrite a LoRA adapter in canonical or performant layout (exact)",
        description="Rewrite ADAPTER (an HF PEFT LoRA directory) with an A and B per part of each fused projection "
        "(canonical) or one adapter per fused projection (performant), and write it to --out. The outputs are "
        "the same.",
    )
    p.add_argument("adapter", metavar="ADAPTER", help="adapter directory")
    p.add_argument("--to", required=True, choices=LAYOUTS, help="the layout to write")
    _common(p)
    p.set_defaults(func=convert_command)
