"""Quantization speed on this machine, each figure against a reference timed in the same run.

1. dequantize throughput: NF4 (double quant) and int8 → fp32/bf16, vs a plain copy of the fp32 weight;
   and vs bitsandbytes' CPU dequantize_4bit where installed.
2. one training step (forward + backward + AdamW) of LoRA on a 4-bit base (QLoRA) vs LoRA on the fp32
   model, on a small Llama built from a config (random weights).

Every call is timed twice over: wall clock (``*_s``) and this process's CPU time (``*_cpu_s``). The
machine's cores are shared, so wall time includes waiting for a core; with ``--threads 1`` the CPU time is
the work itself and the steadiest figure. The load average before and after is recorded with the results.

Prints and writes JSON (medians, ratios, environment, git revision):

    .venv/bin/python benchmarks/experiments/quant_speed.py [--threads 1] [--out benchmarks/results/quant_speed.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

import peftkit as pk
from peftkit.quant import quantize
from peftkit.quant.int8 import dequantize_int8, quantize_int8
from peftkit.quant.nf4 import Packed4bit, code_book, dequantize_4bit, dequantize_absmax, quantize_4bit

sys.path.insert(0, str(Path(__file__).parent))
from common import environment  # noqa: E402


def median_times(fns: dict[str, Callable[[], object]], repeats: int = 11, warmup: int = 2) -> dict[str, float]:
    """Median wall seconds (``name``) and CPU seconds (``name`` with ``_s`` → ``_cpu_s``) per call of each
    function, timed in interleaved rounds (so that load from other processes hits every contender alike)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    wall: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    out = {name: statistics.median(t) for name, t in wall.items()}
    out.update({cpu_key(name): statistics.median(t) for name, t in cpu.items()})
    return out


def cpu_key(name: str) -> str:
    return name.removesuffix("_s") + "_cpu_s"


def ratios(out: dict[str, float], pairs: dict[str, tuple[str, str]]) -> None:
    """Add ``ratio_*`` (wall) and ``ratio_*_cpu`` (CPU time) entries for each (numerator, denominator)."""
    for label, (num, den) in pairs.items():
        if num in out and den in out:
            out[f"ratio_{label}"] = out[num] / out[den]
            out[f"ratio_{label}_cpu"] = out[cpu_key(num)] / out[cpu_key(den)]


def textbook_dequantize_4bit(p: Packed4bit) -> torch.Tensor:
    """The direct decode, for reference: split the nibbles, two code-book look-ups, repeat the constants."""
    n = p.shape.numel()
    codes = torch.stack([p.data >> 4, p.data & 0xF], dim=1).reshape(-1)[:n].long()
    scale = dequantize_absmax(p).repeat_interleave(p.block_size)[:n]
    return (code_book(p.quant_type)[codes] * scale).view(p.shape)


def bench_dequantize(rows: int = 4096, cols: int = 4096) -> dict[str, float]:
    w = torch.randn(rows, cols) * 0.02
    nf4 = quantize_4bit(w, "nf4", 64, double_quant=True)
    i8 = quantize_int8(w)
    fns: dict[str, Callable[[], object]] = {
        "fp32_copy_s": lambda: w.clone(),
        "bf16_cast_s": lambda: w.to(torch.bfloat16),
        "nf4_dq_to_fp32_s": lambda: dequantize_4bit(nf4, torch.float32),
        "nf4_dq_to_bf16_s": lambda: dequantize_4bit(nf4, torch.bfloat16),
        "nf4_textbook_dq_to_fp32_s": lambda: textbook_dequantize_4bit(nf4),
        "int8_to_fp32_s": lambda: dequantize_int8(i8, torch.float32),
        "int8_to_bf16_s": lambda: dequantize_int8(i8, torch.bfloat16),
    }
    try:
        import bitsandbytes.functional as bf

        packed, state = bf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        fns["bnb_nf4_dq_to_fp32_s"] = lambda: bf.dequantize_4bit(packed, state)
    except ImportError:
        pass
    out = median_times(fns)
    gb = w.numel() * 4 / 1e9
    out["nf4_dq_fp32_GBps_out"] = gb / out["nf4_dq_to_fp32_s"]
    ratios(
        out,
        {
            "nf4_dq_vs_fp32_copy": ("nf4_dq_to_fp32_s", "fp32_copy_s"),
            "nf4_dq_bf16_vs_fp32_copy": ("nf4_dq_to_bf16_s", "fp32_copy_s"),
            "nf4_textbook_dq_vs_fp32_copy": ("nf4_textbook_dq_to_fp32_s", "fp32_copy_s"),
            "int8_dq_vs_fp32_copy": ("int8_to_fp32_s", "fp32_copy_s"),
            "nf4_dq_vs_bnb": ("nf4_dq_to_fp32_s", "bnb_nf4_dq_to_fp32_s"),
        },
    )
    return out


def _llama(hidden: int, layers: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=1024, hidden_size=hidden, intermediate_size=hidden * 8 // 3, num_hidden_layers=layers,
        num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def bench_step(hidden: int = 512, layers: int = 4, batch: int = 4, seq: int = 256) -> dict[str, float]:
    ids = torch.randint(0, 1024, (batch, seq))
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

    def step_fn(model: torch.nn.Module) -> Callable[[], None]:
        pk.apply(model, pk.LoRA(target_modules=targets, rank=16, alpha=32))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def step() -> None:
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()

        return step

    lora = step_fn(_llama(hidden, layers))
    qlora = step_fn(quantize(_llama(hidden, layers), compute_dtype=torch.float32))
    qlora_bf16 = step_fn(quantize(_llama(hidden, layers), compute_dtype=torch.bfloat16))
    out = median_times(
        {
            "lora_fp32_step_s": lora,
            "qlora_nf4_fp32compute_step_s": qlora,
            "qlora_nf4_bf16compute_step_s": qlora_bf16,
        },
        repeats=7,
    )
    ratios(
        out,
        {
            "qlora_fp32compute_vs_lora": ("qlora_nf4_fp32compute_step_s", "lora_fp32_step_s"),
            "qlora_bf16compute_vs_lora": ("qlora_nf4_bf16compute_step_s", "lora_fp32_step_s"),
        },
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="write the JSON here too")
    parser.add_argument("--quick", action="store_true", help="smaller sizes (a smoke run)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    size = 1024 if args.quick else 2048
    load_before = os.getloadavg()
    result: dict[str, object] = {
        "env": environment(),
        f"dequantize_{size}x{size}": bench_dequantize(size, size),
        "train_step": bench_step(*((128, 2, 2, 64) if args.quick else (512, 4, 4, 256))),
    }
    result["load_average_1_5_15min"] = {"before": load_before, "after": os.getloadavg()}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
