"""peftkit on a CUDA GPU: parity with HF PEFT, then training-step, decoding and memory ratios, in one process.

Parity (fp32 and bf16, a small Llama): an adapter saved by HF PEFT and loaded by peftkit gives the same logits and
gradients for LoRA and DoRA, merging keeps the outputs, and the dropout keep-mask drawn on the GPU has the
dropout law. Timing (bf16, a larger Llama than the CPU reference: hidden 2048, 8 layers, 16 heads, intermediate
5632, vocabulary 32000, batch 4 × 1024 tokens, LoRA rank 16, alpha 32 on all seven projections): the lower bound,
HF PEFT and peftkit LoRA/DoRA at dropout 0 and 0.05, round-robin, each step timed between CUDA synchronisations;
peak memory allocated by a step above the weights; one-token decoding into a static cache (batch 4 after a
1024-token prefill) against the base model.

``python benchmarks/experiments/gpu.py --out results.json`` (``--quick``: a small model, also on a CPU).
"""

from __future__ import annotations

import copy
import functools
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from common import (
    ALPHA,
    RANK,
    TARGETS,
    Shape,
    build_model,
    environment,
    hf_adapt,
    median,
    pk_adapt,
    randomize_adapter,
    report,
    timing_args,
)
from torch import nn

GPU = Shape(hidden=2048, layers=8, heads=16, intermediate=5632, vocab=32000, batch=4, seq=1024)
SMALL = Shape(hidden=128, layers=2, heads=4, intermediate=352, vocab=1000, batch=2, seq=64)
VARIANTS = ["lower_bound", "hf_lora_0", "pk_lora_0", "hf_lora_0.05", "pk_lora_0.05",
            "hf_dora_0", "pk_dora_0", "hf_dora_0.05", "pk_dora_0.05"]
DECODE_VARIANTS = ["base", "hf_lora_0", "pk_lora_0", "hf_dora_0", "pk_dora_0"]
DECODE_TOKENS = 16


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def ids_for(shape: Shape, device: torch.device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.randint(0, shape.vocab, (shape.batch, shape.seq), generator=gen).to(device)


def adapted(base: nn.Module, name: str) -> nn.Module:
    """A copy of ``base`` (already on its device and dtype) as variant ``name``, with random LoRA B."""
    model = copy.deepcopy(base)
    if name in ("lower_bound", "base"):
        return model.requires_grad_(False)
    lib, method, dropout = name.split("_")
    model = (hf_adapt if lib == "hf" else pk_adapt)(model, method == "dora", float(dropout))
    randomize_adapter(model)
    return model


# -- parity --------------------------------------------------------------------------------------------------------
def _adapter_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    """Gradients of the trained tensors by one name for both libraries (HF PEFT's magnitude is a module's weight)."""
    return {k.replace(".default", "").removeprefix("base_model.model.").replace("vector.weight", "vector"):
            p.grad.float() for k, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def parity(device: torch.device, dtype: torch.dtype, dora: bool) -> dict[str, float]:
    """Max abs differences, peftkit − HF PEFT, for one adapter HF PEFT saved and peftkit loaded (dropout 0)."""
    import peftkit as pk

    base = build_model(SMALL).to(device, dtype)
    hf = hf_adapt(copy.deepcopy(base), dora, 0.0)
    randomize_adapter(hf)
    hf.train()
    ids = ids_for(SMALL, device)
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours = pk.load_adapter(copy.deepcopy(base), tmp, trainable=True).train()
    out_hf = hf(input_ids=ids, labels=ids)
    out_pk = ours(input_ids=ids, labels=ids)
    out_hf.loss.backward()
    out_pk.loss.backward()
    g_hf, g_pk = _adapter_grads(hf), _adapter_grads(ours)
    assert sorted(g_hf) == sorted(g_pk), (sorted(g_hf)[:3], sorted(g_pk)[:3])
    grad_diff = max(float((g_pk[k] - g_hf[k]).abs().max() / g_hf[k].abs().max().clamp_min(1e-12)) for k in g_hf)
    logits_scale = float(out_hf.logits.detach().float().abs().max())
    ours.eval()
    with torch.no_grad():
        unmerged = ours(input_ids=ids).logits.float()
        pk.merge(ours)
        merged = ours(input_ids=ids).logits.float()
        pk.unmerge(ours)
    return {
        "logits_max_abs_diff_rel": float((out_pk.logits.float() - out_hf.logits.float()).abs().max()) / logits_scale,
        "grad_max_abs_diff_rel": grad_diff,
        "merged_vs_unmerged_rel": float((merged - unmerged).abs().max()) / logits_scale,
    }


def mask_law(device: torch.device) -> dict[str, float]:
    """The share of kept elements of peftkit's keep-mask drawn on ``device`` (expected 1 − p)."""
    from peftkit.methods.lora_dropout import keep_mask

    return {f"keep_share_p{p}": float(keep_mask((4096, 4096), p, device).float().mean()) for p in (0.05, 0.1, 0.5)}


def qlora(device: torch.device) -> dict[str, Any]:
    """NF4 with double quantization by peftkit's own kernels and by bitsandbytes: logits against the float model and
    each other, and five LoRA training steps on the same batch with each (losses should fall)."""
    import peftkit as pk

    base = build_model(SMALL).to(device)
    ids = ids_for(SMALL, device)
    with torch.no_grad():
        ref = base(input_ids=ids).logits.float()
    out: dict[str, Any] = {}
    logits = {}
    for backend in ("peftkit", "bitsandbytes"):
        try:
            model = pk.quantize(copy.deepcopy(base), bits=4, quant_type="nf4", double_quant=True, backend=backend)
            with torch.no_grad():
                logits[backend] = model(input_ids=ids).logits.float()
            out[f"{backend} logits vs float, rel"] = float((logits[backend] - ref).abs().max() / ref.abs().max())
            pk.apply(model, pk.LoRA(target_modules=TARGETS, rank=8, alpha=16))
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
            losses = []
            for _ in range(5):
                loss = model(input_ids=ids, labels=ids).loss
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(float(loss))
            out[f"{backend} LoRA losses"] = losses
        except Exception:
            out[f"{backend} error"] = traceback.format_exc()
    if len(logits) == 2:
        out["peftkit vs bitsandbytes logits, rel"] = float((logits["peftkit"] - logits["bitsandbytes"]).abs().max()
                                                           / ref.abs().max())
    return out


# -- timing --------------------------------------------------------------------------------------------------------
def train_steps(shape: Shape, device: torch.device, dtype: torch.dtype, rounds: int) -> dict[str, Any]:
    base = build_model(shape).to(device, dtype)
    ids = ids_for(shape, device)
    embeds = base.get_input_embeddings()(ids).detach()
    models = {name: adapted(base, name).train() for name in VARIANTS}
    del base
    weights = {name: sum(t.numel() * t.element_size() for t in m.state_dict().values()) for name, m in models.items()}

    def step(model: nn.Module) -> None:
        for p in model.parameters():
            p.grad = None
        out = model(inputs_embeds=embeds.clone().requires_grad_(True), labels=ids)
        out.loss.backward()

    times: dict[str, list[float]] = {k: [] for k in models}
    peak: dict[str, int] = {}
    for r in range(rounds + 2):  # two warm-up rounds
        for name, model in models.items():
            sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
            start = time.perf_counter()
            step(model)
            sync(device)
            if r >= 2:
                times[name].append(time.perf_counter() - start)
            if device.type == "cuda":
                peak[name] = max(peak.get(name, 0), torch.cuda.max_memory_allocated(device) - before)
    medians = {k: median(v) for k, v in times.items()}
    ratios = {f"train step {k} / lower_bound": medians[k] / medians["lower_bound"]
              for k in models if k != "lower_bound"}
    ratios.update({f"train step pk{k[2:]} / hf{k[2:]}": medians[k] / medians["hf" + k[2:]]
                   for k in models if k.startswith("pk")})
    if peak:
        ratios.update({f"step peak memory pk{k[2:]} / hf{k[2:]}": peak[k] / peak["hf" + k[2:]]
                       for k in models if k.startswith("pk")})
    return {"times_s": times, "median_s": medians, "peak_bytes_above_start": peak, "weight_bytes": weights,
            "ratios": ratios}


def decoding(shape: Shape, device: torch.device, dtype: torch.dtype, rounds: int) -> dict[str, Any]:
    from transformers import StaticCache

    base = build_model(shape).to(device, dtype)
    ids = ids_for(shape, device)
    models = {name: adapted(base, name).eval() for name in DECODE_VARIANTS}
    del base
    caches = {n: StaticCache(config=m.config, max_cache_len=shape.seq + DECODE_TOKENS) for n, m in models.items()}
    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.no_grad():
        for r in range(rounds + 1):
            for name, model in models.items():
                caches[name].reset()
                out = model(input_ids=ids, past_key_values=caches[name], use_cache=True)
                nxt = out.logits[:, -1:].argmax(-1)
                sync(device)
                start = time.perf_counter()
                for _ in range(DECODE_TOKENS):
                    nxt = model(input_ids=nxt, past_key_values=caches[name], use_cache=True).logits[:, -1:].argmax(-1)
                sync(device)
                if r:
                    times[name].append((time.perf_counter() - start) / DECODE_TOKENS)
    medians = {k: median(v) for k, v in times.items()}
    return {"times_s": times, "median_s": medians,
            "ratios": {f"decode {k} / base": medians[k] / medians["base"] for k in models if k != "base"}}


def main() -> None:
    args = timing_args(__doc__, rounds=20, quick="a small model (runs on a CPU too)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = SMALL if args.quick else GPU
    result: dict[str, Any] = {"environment": environment(), "device": str(device), "shape": shape.__dict__,
                              "rank": RANK, "alpha": ALPHA, "targets": TARGETS}
    if device.type == "cuda":
        result["environment"]["gpu"] = torch.cuda.get_device_name(device)
    parts: dict[str, Callable[[], Any]] = {
        f"parity {'dora' if dora else 'lora'} {str(dtype).removeprefix('torch.')}":
            functools.partial(parity, device, dtype, dora)
        for dtype in (torch.float32, torch.bfloat16) for dora in (False, True)
    }
    parts["mask_law"] = functools.partial(mask_law, device)
    parts["qlora"] = functools.partial(qlora, device)
    parts["train"] = functools.partial(train_steps, shape, device, torch.bfloat16, args.rounds)
    parts["decode"] = functools.partial(decoding, shape, device, torch.bfloat16, max(3, args.rounds // 2))
    ratios: dict[str, float] = {}
    medians: dict[str, float] = {}
    for key, part in parts.items():
        try:  # one failing part is reported, and the others still run
            result[key] = part()
        except Exception:
            result[key] = {"error": traceback.format_exc()}
        print(key, {k: v for k, v in result[key].items() if k not in ("times_s",)}, flush=True)
        ratios.update(result[key].get("ratios", {}))
        medians.update({f"{key} {k}": v for k, v in result[key].get("median_s", {}).items()})
    report(medians, ratios, result, Path(args.out) if args.out else None)


if __name__ == "__main__":
    main()
