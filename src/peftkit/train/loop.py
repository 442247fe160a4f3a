"""The training loop: one explicit function, :func:`train`, plus the setup it needs.

Per optimizer step: (LISA re-sample) → set the learning rate → ``grad_accum`` micro-batches of
forward (bf16 autocast if asked) and backward → clip and record the gradient norm → optimizer step →
AdaLoRA's rank-allocation hook when that method is used → log, evaluate, checkpoint.

Everything random is derived from ``train.seed`` or restored from the checkpoint (dropout RNG), and
the micro-batch for a step is a pure function of (seed, step), so a killed run resumed from its last
checkpoint continues with exactly the losses and final adapter of an uninterrupted run (on CPU).
"""

from __future__ import annotations

import functools
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from peftkit.errors import CheckpointError, ConfigError
from peftkit.io.atomic import run_output_dir
from peftkit.methods import lora_groups
from peftkit.methods.lora_layers import LoRALinear
from peftkit.train import checkpoint as ckpt
from peftkit.train import dist_checkpoint as dckpt
from peftkit.train import dist_failure, distributed
from peftkit.train.batching import collate, micro_batch, pack, split
from peftkit.train.config import RunConfig, dump_config, with_absolute_paths
from peftkit.train.data import IGNORE, Example, check_data_files, load_examples
from peftkit.train.evaluate import evaluate, label_count
from peftkit.train.metrics import MetricsLogger, plot_metrics, read_metrics
from peftkit.train.optim import Lisa, build_optimizer, grad_norm
from peftkit.train.schedule import Schedule
from peftkit.train.tasks import apply_peft, build_model, build_tokenizer, check_vocab, forward_loss
from peftkit.train.tokenizer import Tokenizer

#: Test-only fault injection: the process SIGKILLs itself after this optimizer step (see tests/train).
FAULT_ENV = "PEFTKIT_FAULT_KILL_AFTER_STEP"


@dataclass
class Run:
    """Everything a run holds after setup."""

    cfg: RunConfig
    model: nn.Module
    tok: Tokenizer
    train: list[Example]
    eval: list[Example]
    labels: list[str]
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    total_steps: int
    device: torch.device
    trainable: list[str] = field(default_factory=list)
    lisa: Lisa | None = None
    dist: distributed.Dist = field(default_factory=distributed.Dist)
    forward: nn.Module | None = None  # what the forward pass calls: the DDP wrapper, else ``model``


def pick_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; anything else once a tensor could be put on it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return distributed.usable_device(name)


def load_data(cfg: RunConfig, tok: Tokenizer) -> tuple[list[Example], list[Example], list[str]]:
    """Train and held-out examples, and the class names for classification."""
    d, task = cfg.data, cfg.model.task
    check_data_files(d.train, d.eval)
    kw = {"skip_bad_rows": d.skip_bad_rows, "limit": d.limit, "cache_dir": d.cache_dir}
    train = load_examples(d.train, d.format, task, tok, d.max_length, labels=d.labels, **kw)  # type: ignore[arg-type]
    if train.skipped:
        print(f"data: skipped {train.skipped} malformed rows in {d.train}")
    if task == "causal_lm":
        _check_targets(train.examples, d.train, d.max_length)
    held: list[Example] = []
    if d.eval:
        held = load_examples(d.eval, d.format, task, tok, d.max_length, labels=train.labels, **kw).examples  # type: ignore[arg-type]
    examples = train.examples
    if not d.eval and d.eval_fraction > 0:
        examples, held = split(examples, d.eval_fraction, cfg.train.seed)
    if d.packing and task == "causal_lm":
        examples = pack(examples, d.max_length)
    return examples, held, train.labels


def _check_targets(examples: list[Example], path: str, max_length: int) -> None:
    """Refuse training data none of whose examples keeps a response token within ``max_length`` (the loss would be
    NaN at every step), and say how many examples add nothing to the loss when only some are cut so."""
    empty = sum(1 for ex in examples if all(label == IGNORE for label in ex["labels"][1:]))
    if empty == len(examples):
        longest = max(int(ex.get("prompt_len") or 0) for ex in examples)
        raise ConfigError(f"no example in {path!r} keeps a response token within data.max_length={max_length} "
                          f"(prompts of up to {longest} tokens), so there is nothing to train on; raise "
                          "data.max_length or shorten the prompts")
    if empty:
        print(f"data: {empty} of {len(examples)} examples in {path} keep no response token within "
              f"data.max_length={max_length} and add nothing to the loss")


def total_steps(cfg: RunConfig, n_examples: int, world: int = 1) -> int:
    """``train.max_steps``, or the optimizer steps in ``train.epochs`` passes (``world`` ranks per batch)."""
    if cfg.train.max_steps:
        return cfg.train.max_steps
    per_epoch = max(n_examples // (cfg.train.batch_size * world), 1)
    return max(1, int(cfg.train.epochs * per_epoch) // cfg.train.grad_accum)


def setup(cfg: RunConfig, ctx: distributed.Dist | None = None) -> Run:
    """Build tokenizer, data, model + adapter, optimizer and schedule for ``cfg`` (on this rank of ``ctx``)."""
    ctx = ctx or distributed.Dist()
    random.seed(cfg.train.seed)
    torch.manual_seed(cfg.train.seed)
    tok = build_tokenizer(cfg)
    train, held, labels = load_data(cfg, tok)
    model = build_model(cfg, num_labels=len(labels))
    check_vocab(model, tok)
    apply_peft(model, cfg)
    device = distributed.pick_device(ctx, cfg.train.device)
    model.to(device)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    forward = distributed.wrap(model, ctx, device)  # before the optimizer: FSDP replaces the parameters
    distributed.seed_rank(ctx, cfg.train.seed, 0)
    lisa = None
    if cfg.optimizer.lisa_layers:
        lisa = Lisa(model, cfg.optimizer.lisa_layers, cfg.optimizer.lisa_interval, cfg.train.seed)
    optimizer = build_optimizer(model, cfg.optimizer)
    steps = total_steps(cfg, len(train), ctx.world)
    return Run(
        cfg,
        model,
        tok,
        train,
        held,
        labels,
        optimizer,
        Schedule(optimizer, cfg.scheduler, steps),
        steps,
        device,
        trainable,
        lisa,
        ctx,
        forward,
    )


def _micro_batch(run: Run, step: int, j: int) -> dict[str, torch.Tensor]:
    """Micro-batch ``j`` of optimizer step ``step``, on the run's device."""
    cfg = run.cfg
    # the global batch one process with batch_size × world would take; this rank keeps its slice
    chunk = micro_batch(
        run.train,
        cfg.train.batch_size * run.dist.world,
        cfg.train.seed,
        step * cfg.train.grad_accum + j,
        cfg.data.group_by_length,
    )
    chunk = distributed.rank_slice(chunk, run.dist)
    return {k: v.to(run.device) for k, v in collate(chunk, run.tok.pad_id, cfg.model.task).items()}


def form_groups(run: Run, step: int) -> None:
    """Form the model's sibling groups (:func:`peftkit.methods.lora_groups.form_groups`) on the first micro-batch
    of ``step`` before that step, so every step of a run, started at step 0 or resumed later, runs the same
    kernels and a resumed run matches an uninterrupted one bit for bit."""
    if not any(isinstance(m, LoRALinear) for m in run.model.modules()):
        return
    forward = run.forward if run.forward is not None else run.model
    with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=run.cfg.train.precision == "bf16"):
        lora_groups.form_groups(forward, **_micro_batch(run, step, 0))  # as forward_loss calls it


def train_step(run: Run, step: int, params: list[nn.Parameter]) -> dict[str, Any]:
    """One optimizer step (all micro-batches); returns its metrics record."""
    cfg = run.cfg
    # Also on the first step of a run resumed inside a sampling window, which must train that window's layers.
    if run.lisa is not None and (step % run.lisa.interval == 0 or not run.lisa.active):
        run.lisa.update(step)
    lr = run.schedule.apply(step)
    loss_sum, tokens = 0.0, 0
    bf16 = cfg.train.precision == "bf16"
    for j in range(cfg.train.grad_accum):
        batch = _micro_batch(run, step, j)
        with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = forward_loss(run.forward if run.forward is not None else run.model, batch)
        if run.dist.active:  # a slice without targets has a NaN mean loss but contributes nothing
            items = label_count(batch, cfg.model.task)
            loss = (loss if items else loss.nan_to_num(0.0)) * distributed.global_mean_factor(items, run.dist)
        (loss / cfg.train.grad_accum).backward()  # type: ignore[no-untyped-call]
        loss_sum += float(loss.detach()) / cfg.train.grad_accum
        tokens += int(batch["attention_mask"].sum())
    if cfg.train.max_grad_norm > 0 or run.dist.mode == "fsdp":  # torch's norm reduces sharded gradients
        norm = distributed.as_float(
            torch.nn.utils.clip_grad_norm_(
                [p for p in params if p.grad is not None], cfg.train.max_grad_norm or float("inf")
            )
        )
    else:
        norm = grad_norm(params)
    run.optimizer.step()
    _adalora_hook(run, step)
    run.optimizer.zero_grad(set_to_none=True)
    loss_sum, tokens = distributed.reduce_step(loss_sum, tokens, run.dist)
    return {"step": step + 1, "loss": loss_sum, "lr": lr, "grad_norm": norm, "tokens": tokens}


def _adalora_hook(run: Run, step: int) -> None:
    """AdaLoRA's rank allocation after the optimizer step (it reads the gradients), when present."""
    if run.cfg.peft.method == "adalora":
        import peftkit as pk

        hook = getattr(pk, "adalora_step", None)
        if hook is not None:
            hook(run.model, step)


def _save(run: Run, step: int, history: list[dict[str, Any]]) -> Path:
    cfg = run.cfg
    save = functools.partial(dckpt.save_checkpoint, run.dist) if run.dist.active else ckpt.save_checkpoint
    return save(
        cfg.checkpoint.save_dir,
        step,
        run.model,
        run.optimizer,
        run.trainable,
        {"micro_batches": step * cfg.train.grad_accum, "history": history, "labels": run.labels,
         "processes": run.dist.world},
        yaml.safe_dump(with_absolute_paths(cfg).to_dict(), sort_keys=False),  # readable from any directory
        save_adapter=cfg.peft.method != "none",
        keep_last=cfg.checkpoint.keep_last,
    )


def train(cfg: RunConfig) -> dict[str, Any]:
    """Run the whole fine-tuning described by ``cfg``; returns a summary.

    Returns:
        ``steps``, ``losses`` and ``grad_norms`` per step (this run and any resumed part),
        ``eval`` (final held-out metrics, if there is held-out data), ``checkpoint`` (last one),
        ``adapter`` (``save_dir/final``), ``trainable`` and ``total`` parameter counts, ``seconds``.
    """
    t0 = time.perf_counter()
    distributed.check(cfg)  # a misuse is refused before save_dir is created
    # Created before the model is built and trained; removed again if the run fails before writing to it.
    with run_output_dir(cfg.checkpoint.save_dir, "checkpoint.save_dir"):
        ctx = distributed.init(cfg)
        with dist_failure.guard(ctx, cfg.checkpoint.save_dir):
            return _train(setup(cfg, ctx), t0)


def _train(run: Run, t0: float) -> dict[str, Any]:
    """The body of :func:`train` for a set-up run."""
    cfg = run.cfg
    start, history = 0, []
    resume = ckpt.resolve_resume(cfg.checkpoint.resume, cfg.checkpoint.save_dir)
    if run.dist.is_main and (removed := ckpt.remove_stale(cfg.checkpoint.save_dir)):
        print(f"removed {removed} partial checkpoint(s) an interrupted save left in {cfg.checkpoint.save_dir}")
    if resume is not None:
        if run.dist.active:
            state = dckpt.load_checkpoint(run.dist, resume, run.model, run.optimizer, cfg.train.seed)
        else:
            state = ckpt.load_checkpoint(resume, run.model, run.optimizer, run.trainable)
        start, history = int(state["step"]), list(state["history"])
        if start > run.total_steps:  # the loop would not run, and the final adapter would be this later one
            raise CheckpointError(
                f"checkpoint {str(resume)!r} is at step {start}, past the end of this run ({run.total_steps} steps); "
                f"set train.max_steps={start} or more to continue it, or start afresh in another checkpoint.save_dir"
            )
        if run.dist.is_main:
            _warn_changed_settings(resume, cfg, state.get("processes"), run.dist.world)
        print(f"resumed from {resume} at step {start}")
    distributed.agree(start, run.dist, "the step to start from")
    out = Path(cfg.checkpoint.save_dir)
    logger: MetricsLogger | distributed.SilentLogger = distributed.SilentLogger()
    if run.dist.is_main:  # one progress bar and one metrics file per run
        logger = MetricsLogger(out, cfg.logging, run.total_steps, start)
    params = [p for n, p in run.model.named_parameters() if n in set(run.trainable)]
    run.model.train()
    if start < run.total_steps:
        form_groups(run, start)
    last_ckpt, fault = None, os.environ.get(FAULT_ENV)
    final_eval: dict[str, float] = {}
    if start == run.total_steps:
        print(f"the run is already complete at step {start}: nothing to train")
    tick = time.perf_counter()
    for step in range(start, run.total_steps):
        record = train_step(run, step, params)
        history.append({k: record[k] for k in ("step", "loss", "grad_norm", "lr")})
        now = time.perf_counter()
        logger.progress(record["loss"], record["lr"], record["tokens"] / max(now - tick, 1e-9))
        tick = now
        done = step + 1
        if done % cfg.logging.log_interval == 0 or done == run.total_steps:
            logger.log(record)
        if cfg.eval.interval and done % cfg.eval.interval == 0 and run.eval:
            metrics = _eval(run)
            logger.log({"step": done, **{f"eval_{k}": v for k, v in metrics.items()}})
            final_eval = metrics if done == run.total_steps else {}
        if (cfg.checkpoint.save_interval and done % cfg.checkpoint.save_interval == 0) or done == run.total_steps:
            last_ckpt = _save(run, done, history)
        dist_failure.inject_raise(done, run.dist)
        if fault is not None and dist_failure.fault_due(fault, done, run.dist):
            os.kill(os.getpid(), signal.SIGKILL)
    if not final_eval and run.eval:  # not evaluated at the last step by eval.interval
        final_eval = _eval(run)
    if final_eval and not logger.has(run.total_steps, "eval_loss"):  # a finished run re-run logs nothing twice
        logger.log({"step": run.total_steps, **{f"eval_{k}": v for k, v in final_eval.items()}})
    logger.close()
    adapter_dir = _save_final(run, out)
    if cfg.logging.plots and run.dist.is_main:
        plot_metrics([r for r in read_metrics(out / "metrics.jsonl") if "loss" in r] or history, out)
    trainable = sum(p.numel() for p in params)
    return {
        "steps": run.total_steps,
        "losses": [h["loss"] for h in history],
        "grad_norms": [h["grad_norm"] for h in history],
        "eval": final_eval,
        "checkpoint": str(last_ckpt or resume),
        "adapter": str(adapter_dir),
        "trainable": trainable,
        "total": sum(p.numel() for p in run.model.parameters()),
        "seconds": time.perf_counter() - t0,
    }


#: Sections whose fields shape the training trajectory (``checkpoint``, ``logging`` and ``eval`` do not).
_TRAJECTORY = ("model", "peft", "data", "train", "optimizer", "scheduler")


def _warn_changed_settings(resume: Path, cfg: RunConfig, saved_world: int | None, world: int) -> None:
    """Warn when the resumed run's settings differ from those the checkpoint was written with.

    Such a run (a new seed, learning rate or ``max_steps``, which reshapes the schedule, ...) continues from the
    checkpoint's weights but will not match the uninterrupted run; that may be meant, so it is not an error.
    The number of processes counts too: ``train.batch_size`` is per process, so with another number of
    processes and the same ``batch_size`` each step takes another global batch.
    """
    saved_file = resume / "run_config.yaml"
    if not saved_file.is_file():
        return
    saved = yaml.safe_load(saved_file.read_text()) or {}
    now = yaml.safe_load(yaml.safe_dump(with_absolute_paths(cfg).to_dict()))  # as it is saved: tuples as lists
    saved_batch = (saved.get("train") or {}).get("batch_size")
    by_global_batch = saved_world is not None and isinstance(saved_batch, int)
    # How the processes share the work does not shape the run; only the global batch does.
    ignored = {"train.parallel", "train.dist_timeout"} | ({"train.batch_size"} if by_global_batch else set())
    changed = [
        f"{section}.{key}: {saved.get(section, {}).get(key)!r} -> {now[section].get(key)!r}"
        for section in _TRAJECTORY
        for key in sorted(set(saved.get(section) or {}) | set(now[section]))
        if (saved.get(section) or {}).get(key) != now[section].get(key) and f"{section}.{key}" not in ignored
    ]
    batch = cfg.train.batch_size
    if saved_world is not None and isinstance(saved_batch, int) and saved_world * saved_batch != world * batch:
        keep = saved_world * saved_batch / world
        hint = f"; set train.batch_size={int(keep)} to keep it" if keep.is_integer() else ""
        changed.append(f"global batch (processes × train.batch_size): {saved_world} × {saved_batch} -> "
                       f"{world} × {batch}{hint}")
    if changed:
        print(f"warning: resuming {resume} with settings other than those it was written with "
              f"({'; '.join(changed)}); the run will not match an uninterrupted one", file=sys.stderr)


def _eval(run: Run) -> dict[str, float]:
    return evaluate(run.model, run.eval, run.cfg.model.task, run.tok, run.cfg.eval, run.device)


def _save_final(run: Run, out: Path) -> Path:
    """``save_dir/final``: the adapter in HF PEFT format (or the trained tensors for ``peft.method=none``).

    Written into a temporary directory and renamed into place, as the step checkpoints are: an interrupted save
    leaves the previous ``final/`` whole, and no file of an earlier run (another method's) stays beside the new ones.
    """
    final = out / "final"
    with ckpt.staged(final, keep_last=0, owner=run.dist.is_main) as tmp:  # every rank gathers, rank 0 writes
        if run.cfg.peft.method != "none":
            dckpt.save_adapter(run.dist, run.model, tmp)  # gathered to full tensors under FSDP
        else:
            from safetensors.torch import save_file

            params = dict(run.model.named_parameters())
            weights = dckpt.full_tensors({n: params[n] for n in run.trainable})
            if run.dist.is_main:
                save_file(weights, str(tmp / "trainable.safetensors"))
        if run.dist.is_main:
            dump_config(with_absolute_paths(run.cfg), tmp / "run_config.yaml")
    run.dist.barrier()  # rank 0 has published it
    return final
