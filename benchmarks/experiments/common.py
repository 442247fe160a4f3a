"""The reference model, the variants and the timing helpers every experiment shares.

Reference (issue 10): a Llama-architecture model from a ``transformers`` config (hidden 512, 8 layers, 8 heads,
intermediate 1408, vocabulary 8000), random weights, fp32, batch 4 × 256 tokens, 2 threads; LoRA rank 16,
alpha 32 on all seven linear projections.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA = 16, 32
BATCH, SEQ = 4, 256
THREADS = 2


@dataclass(frozen=True)
class Shape:
    """Model and batch size (``quick`` shrinks it for smoke runs)."""

    hidden: int = 512
    layers: int = 8
    heads: int = 8
    intermediate: int = 1408
    vocab: int = 8000
    batch: int = BATCH
    seq: int = SEQ


FULL = Shape()
QUICK = Shape(hidden=128, layers=2, heads=4, intermediate=352, vocab=1000, batch=2, seq=64)


def setup_torch(threads: int = THREADS) -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(0)


def timing_args(doc: str | None, rounds: int, quick: str = "a small model for a smoke run") -> argparse.Namespace:
    """The options of an interleaved timing experiment (``--quick``, ``--rounds``, ``--out``), parsed from the
    command line, with torch set up for the run (:func:`setup_torch`).

    Args:
        doc: the experiment's module docstring (its first line describes the command).
        rounds: the default number of rounds.
        quick: what ``--quick`` shrinks, for ``--help``.
    """
    parser = argparse.ArgumentParser(description=doc.splitlines()[0] if doc else None)
    parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    setup_torch()
    return args


# Per shape: the weights of the first model built with share=True; later ones reuse the very same memory.
_SHARED_WEIGHTS: dict[Shape, dict[str, torch.Tensor]] = {}


def build_model(shape: Shape, share: bool = False) -> nn.Module:
    """A fresh random Llama, identical for every call (seeded).

    With ``share``, every model of this shape holds its weights in the same memory (own ``Parameter`` objects,
    one storage). Where the allocator puts a hundred megabytes of weights changes how fast they stream: two
    identical models built side by side decoded up to 6 % apart, more than the adapters' own cost. Sharing
    leaves the adapters (and the KV caches) as the only difference between variants. Only for variants that
    never write the base weights (no merging).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=shape.hidden, num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                      num_key_value_heads=shape.heads, intermediate_size=shape.intermediate,
                      vocab_size=shape.vocab, max_position_embeddings=max(512, shape.seq + 8))
    cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(cfg).float()
    if share:
        weights = _SHARED_WEIGHTS.setdefault(shape, {k: v.detach() for k, v in model.state_dict().items()})
        model.load_state_dict(weights, assign=True)
    return model


def batch(shape: Shape) -> torch.Tensor:
    return torch.randint(0, shape.vocab, (shape.batch, shape.seq), generator=torch.Generator().manual_seed(1))


def randomize_adapter(model: nn.Module) -> None:
    """Give every zero-initialised adapter tensor (LoRA B) small random values so outputs differ from the base."""
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and ("lora_B" in name) and p.abs().sum() == 0:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)


# -- variants -------------------------------------------------------------------------------------
def hf_adapt(model: nn.Module, dora: bool, dropout: float) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=dropout, target_modules=TARGETS, use_dora=dora)
    return get_peft_model(model, cfg)


def pk_adapt(model: nn.Module, dora: bool, dropout: float) -> nn.Module:
    import peftkit as pk

    if dora:
        config_cls = getattr(pk, "DoRA", None)
        if config_cls is None:
            raise Unavailable("peftkit has no DoRA yet")
    else:
        config_cls = pk.LoRA
    pk.apply(model, config_cls(target_modules=TARGETS, rank=RANK, alpha=ALPHA, dropout=dropout))
    return model


class Unavailable(RuntimeError):
    """A variant that cannot run in this checkout (reported, not fatal)."""


def make_variant(name: str, shape: Shape, share: bool = False) -> nn.Module:
    """Build variant ``name``: ``full``, ``lower_bound``, ``{hf,pk}_{lora,dora}_{0,0.05}``.

    ``share``: base weights in one memory for all variants of the shape (see :func:`build_model`).
    """
    model = build_model(shape, share)
    if name == "full":
        return model.train()
    if name in ("lower_bound", "base"):
        return model.requires_grad_(False).train()
    lib, method, dropout = name.split("_")
    adapt = hf_adapt if lib == "hf" else pk_adapt
    model = adapt(model, method == "dora", float(dropout))
    randomize_adapter(model)
    return model.train()


TRAIN_VARIANTS = ["full", "lower_bound", "hf_lora_0", "hf_lora_0.05", "hf_dora_0", "hf_dora_0.05",
                  "pk_lora_0", "pk_lora_0.05", "pk_dora_0", "pk_dora_0.05"]


def step_fn(name: str, model: nn.Module, shape: Shape) -> Callable[[], float]:
    """A closure running one forward + backward of the causal-LM loss and returning the loss.

    Every variant except ``full`` feeds the same frozen input embeddings with ``requires_grad=True``, so the
    lower bound runs a full backward and the adapters' ratio to it is their whole overhead.
    """
    ids = batch(shape)
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    embeds = inner.get_input_embeddings()(ids).detach()
    params = [p for p in model.parameters() if p.requires_grad]

    def run() -> float:
        for p in params:
            p.grad = None
        if name == "full":
            out = model(input_ids=ids, labels=ids)
        else:
            out = model(inputs_embeds=embeds.clone().requires_grad_(True), labels=ids)
        out.loss.backward()
        return float(out.loss.detach())

    return run


# -- provenance ------------------------------------------------------------------------------------
def git(*args: str) -> str:
    """``git ARGS`` in this checkout (``"unknown"`` outside one)."""
    try:
        return subprocess.run(["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment() -> dict[str, Any]:
    """What a result depends on: versions, threads, CPU, git revision, and the machine's load at the time."""
    import peft
    import transformers

    return {
        "python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
        "git_revision": git("rev-parse", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "load_average_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def report(medians: dict[str, float], ratios: dict[str, float], result: dict[str, Any], out: Path | None) -> None:
    """Print the median step times (ms) and the ratios; write ``result`` as JSON to ``out`` if given."""
    width = max(map(len, [*medians, *ratios]))
    for key, value in medians.items():
        print(f"{key:>{width}}: {value * 1000:8.1f} ms/step")
    for key, value in ratios.items():
        print(f"{key:>{width}}: {value:.3f}")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")


# -- timing ---------------------------------------------------------------------------------------
def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def round_robin(fns: dict[str, Callable[[], Any]], rounds: int, warmup: int = 1,
                repeat: int = 1, deadline: float | None = None) -> dict[str, list[float]]:
    """Time each function ``rounds`` times, interleaved (one of each per round), after ``warmup`` calls each.

    ``repeat`` calls are timed together per round and the mean per call recorded. With ``deadline`` (a
    ``time.perf_counter()`` value), no new round starts after it (at least one round always runs).
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for done in range(rounds):
        if done and deadline is not None and time.perf_counter() > deadline:
            break
        for key, fn in fns.items():
            start = time.perf_counter()
            for _ in range(repeat):
                fn()
            times[key].append((time.perf_counter() - start) / repeat)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def ratio(times: dict[str, list[float]], a: str, b: str) -> float | None:
    if a not in times or b not in times:
        return None
    return median(times[a]) / median(times[b])
