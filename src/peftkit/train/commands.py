"""What ``peftkit eval``, ``merge`` and ``inspect`` do, as plain functions (the CLI only parses arguments)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from peftkit.errors import CheckpointError, ConfigError
from peftkit.io.atomic import run_output_dir
from peftkit.train.checkpoint import remove_partial_copies, staged
from peftkit.train.config import RunConfig, load_config
from peftkit.train.data import infer_labels, load_examples
from peftkit.train.evaluate import evaluate
from peftkit.train.loop import load_data, pick_device
from peftkit.train.tasks import apply_peft, build_model, build_tokenizer, check_model_path, check_vocab
from peftkit.train.tokenizer import Tokenizer


def checkpoint_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """The run config saved in a checkpoint (``step-N/`` or ``final/``), with overrides.

    Raises:
        CheckpointError: ``path`` holds no ``run_config.yaml``.
    """
    cfg_file = Path(path) / "run_config.yaml"
    if not cfg_file.is_file():
        raise CheckpointError(
            f"{str(path)!r} is not a peftkit checkpoint (no run_config.yaml); pass a "
            "step-N or final directory written by 'peftkit train'"
        )
    return load_config(cfg_file, overrides)


def attach_checkpoint(model: nn.Module, path: str | Path, cfg: RunConfig) -> nn.Module:
    """Put the checkpoint's trained state on ``model``: the HF-format adapter, or the trained tensors."""
    d = Path(path)
    if (d / "adapter_config.json").is_file():
        import peftkit as pk

        pk.load_adapter(model, d)
        return model
    if (d / "trainable.safetensors").is_file():
        from safetensors.torch import load_file

        apply_peft(model, cfg)
        missing = model.load_state_dict(load_file(str(d / "trainable.safetensors")), strict=False).unexpected_keys
        if missing:
            raise CheckpointError(f"{str(d)!r}: tensors {missing[:3]} do not fit the model")
        return model
    raise CheckpointError(f"{str(d)!r} holds neither adapter_config.json nor trainable.safetensors")


def _eval_examples(
    path: str | Path, cfg: RunConfig, tok: Tokenizer, data: str | None
) -> tuple[list[Any], list[str]]:
    if data is not None:
        if not Path(data).exists():
            raise ConfigError(f"--data {data!r} does not exist; pass a local evaluation file")
        labels = run_labels(path, cfg)
        return load_examples(
            data,
            cfg.data.format,
            cfg.model.task,
            tok,
            cfg.data.max_length,
            labels=labels,
            skip_bad_rows=cfg.data.skip_bad_rows,
        ).examples, labels
    _, held, labels = load_data(cfg, tok)
    if not held:
        raise ConfigError("no held-out data: pass --data FILE, or train with data.eval or data.eval_fraction")
    return held, labels


def _checkpoint_model(path: str | Path, cfg: RunConfig, tok: Tokenizer, num_labels: int, adapted: bool) -> nn.Module:
    """The run's base model (vocabulary checked against ``tok``), with the checkpoint's trained state if ``adapted``."""
    model = build_model(cfg, num_labels)
    check_vocab(model, tok)
    return attach_checkpoint(model, path, cfg) if adapted else model


def evaluate_checkpoint(
    path: str | Path, data: str | None = None, overrides: list[str] | None = None
) -> dict[str, dict[str, float]]:
    """Evaluate a checkpoint and its base model on held-out data.

    Args:
        path: a ``step-N`` or ``final`` directory.
        data: an evaluation file; default: the run's ``data.eval`` or its held-out split.
        overrides: ``key.sub=value`` overrides of the saved config (e.g. ``eval.max_batches=10``).

    Returns:
        ``{"base": metrics, "adapted": metrics}``.
    """
    cfg = checkpoint_config(path, overrides)
    tok = build_tokenizer(cfg)
    examples, labels = _eval_examples(path, cfg, tok, data)
    device = pick_device(cfg.train.device)
    out = {}
    for kind in ("base", "adapted"):
        model = _checkpoint_model(path, cfg, tok, len(labels), adapted=kind == "adapted")
        model.to(device)
        label = f"eval {kind}" if cfg.logging.progress_bar else None  # as training shows one
        out[kind] = evaluate(model, examples, cfg.model.task, tok, cfg.eval, device, label)
    return out


def run_labels(path: str | Path, cfg: RunConfig) -> list[str]:
    """The class names of a classification run in label-id order, as training chose them.

    ``data.labels``, else those the checkpoint recorded (``step-N``), else inferred from ``data.train``;
    empty for other tasks.
    """
    if cfg.model.task != "classification":
        return []
    if cfg.data.labels:
        return list(cfg.data.labels)
    state = Path(path) / "trainer_state.json"
    if state.is_file():
        recorded = json.loads(state.read_text()).get("labels", [])
        if recorded:
            return [str(name) for name in recorded]
    return infer_labels(Path(cfg.data.train)) if cfg.data.train and Path(cfg.data.train).exists() else []


def _merge_target(out_dir: str | Path, path: str | Path, cfg: RunConfig) -> Path:
    """``--out`` as an absolute path, checked before any work: it is replaced whole by the merged model.

    Raises:
        ConfigError: it is the checkpoint, holds it, the base model or the working directory, or holds files
            but no model (``config.json``).
    """
    target, source = Path(out_dir).resolve(), Path(path).resolve()
    if target == source:
        raise ConfigError(f"--out {str(out_dir)!r} is the checkpoint itself; write the merged model to another "
                          "directory")
    kept = [source, Path.cwd()]
    if isinstance(cfg.checkpoint.pretrained, str):
        kept.append(Path(cfg.checkpoint.pretrained).resolve())
    if any(target == p or target in p.parents for p in kept):
        raise ConfigError(f"--out {str(out_dir)!r} holds the checkpoint, the base model or the working directory, "
                          "and is replaced whole by the merged model; write it to a directory of its own")
    if target.is_dir() and any(target.iterdir()) and not (target / "config.json").is_file():
        raise ConfigError(f"--out {str(out_dir)!r} holds files but no model (config.json), and is replaced whole by "
                          "the merged model; choose a new or empty directory, or an earlier merged model's")
    return target


def merge_checkpoint(path: str | Path, out_dir: str | Path, overrides: list[str] | None = None) -> Path:
    """Fold a checkpoint's adapter into its base and save a plain ``transformers`` model directory.

    ``out_dir`` is written whole into a temporary directory beside it and then renamed into place, replacing
    what it held before (an earlier merged model; see :func:`_merge_target` for what is refused).
    """

    cfg = checkpoint_config(path, overrides)
    with run_output_dir(_merge_target(out_dir, path, cfg), "--out") as out:  # removed again if the merge fails
        _merge_into(path, cfg, out)
    return out


def _merge_into(path: str | Path, cfg: RunConfig, out: Path) -> None:
    """The body of :func:`merge_checkpoint`, writing into the existing directory ``out``."""
    import peftkit as pk

    tok = build_tokenizer(cfg)
    labels = run_labels(path, cfg)
    model = _checkpoint_model(path, cfg, tok, len(labels), adapted=True)
    if pk.list_adapters(model):
        model = pk.unload(model, merge=True)
    config: Any = getattr(model, "config", None)
    if labels and config is not None:  # the class names travel with the merged classifier
        config.id2label = dict(enumerate(labels))
        config.label2id = {name: i for i, name in enumerate(labels)}
    if removed := remove_partial_copies(out):
        print(f"removed {removed} partial copy(ies) of {out} an interrupted merge left beside it")
    with staged(out, keep_last=0) as tmp:  # a crash mid-save leaves the previous model whole, no stale shards
        model.save_pretrained(str(tmp))  # type: ignore[operator]
        hf_tok = getattr(tok, "tok", None)
        if hf_tok is not None:
            hf_tok.save_pretrained(str(tmp))


def inspect_model(
    model_path: str, task: str = "causal_lm", method: str | None = None, options: dict[str, Any] | None = None
) -> str:
    """A report of what ``method`` would adapt in the model at ``model_path`` (or its parameter count).

    Args:
        model_path: a model directory or config.json; only the config is read (the model is built on
            ``meta``: no weights, no memory).
        task: the model's task head.
        method: a ``peft.method`` name; ``None`` lists the linear layers by leaf name.
        options: the method's fields (``rank``, ``target_modules``, ...).

    Raises:
        ConfigError: ``model_path`` is neither a model directory nor a ``.json`` file, or a method field is invalid.
    """
    import peftkit as pk
    from peftkit.train.tasks import model_config, peft_config

    check_model_path(model_path, "MODEL")
    peft = {"method": method or "none", **(options or {})}
    cfg = model_config(model_path, task, 2 if task == "classification" else 0, peft)
    model = build_model(cfg, 2, meta=True)
    trainable, total = pk.count_parameters(model)
    if method is None or method == "none":
        leaves: dict[str, int] = {}
        for name, mod in model.named_modules():
            if isinstance(mod, nn.Linear) or type(mod).__name__ == "Conv1D":
                leaves[name.rsplit(".", 1)[-1]] = leaves.get(name.rsplit(".", 1)[-1], 0) + 1
        rows = "\n".join(f"  {k:<24} x{v}" for k, v in sorted(leaves.items()))
        stacks: dict[str, list[Any]] = {}  # mixture-of-experts weights, which only target_parameters reaches
        for key, param in model.named_parameters():
            if param.dim() == 3:
                entry = ".".join(key.split(".")[-2:])
                stacks.setdefault(entry, [tuple(param.shape), 0])[1] += 1
        listing = "".join(f"\n  {k:<24} x{n}  {shape}" for k, (shape, n) in sorted(stacks.items()))
        more = f"\nexpert stacks (target_parameters) by name:{listing}" if stacks else ""
        return f"{type(model).__name__}: {total:,d} parameters\nlinear layers by name:\n{rows}{more}"
    return str(pk.inspect(model, peft_config(cfg)))
