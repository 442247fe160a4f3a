"""``peftkit compare``: the same short training for several PEFT methods on one model and dataset.

Each method runs the user's config with only ``peft`` changed, in its own process (so every peak-memory figure
is that method's alone), under ``OUT/<method>/``, with a line of progress (step and loss) every
:data:`PROGRESS_SECONDS`. The table — trainable parameters, peak memory, time per step,
tokens/s, final training loss, held-out loss/accuracy, adapter size — is printed and written as
``compare.md`` and ``compare.json`` (rewritten after every method); ``loss.png`` holds the loss curves and
``memory_time.png`` the bars::

    peftkit compare CONFIG [KEY=VALUE ...] --methods lora,dora,ia3,full [--out runs/compare]

A method that fails is a ``failed: …`` row (its whole output in ``OUT/<method>/compare_error.log``), the others
are still tabulated and plotted, and the command exits with status 3, naming the failed methods.

``full`` trains every base weight (``peft.method=none``). Options in the config's ``peft`` section are passed on
to every method that has a field of that name (``rank`` reaches LoRA and DoRA, not IA3; ``adapter_len`` only
adaption prompts, also from a LoRA config); a ``bias`` mode for the adapted layers' biases (``lora_only``) is passed
in each method's spelling (``oft_only``, ``MiSS_only``, …). ``--set METHOD.FIELD=VALUE`` sets a field for one method
alone (``--set ln_tuning.target_modules=[LayerNorm]``, ``--set ia3.target_modules=[query,value]``), over what it
takes from the config. LoRA+ (``optimizer.loraplus_ratio``) speeds up LoRA's B matrices: methods without them train
with the plain optimizer, and the command says so.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from peftkit.errors import ConfigError, require
from peftkit.io.atomic import output_dir, save_figure, write_text_atomic
from peftkit.train.config import PEFT_METHODS, RunConfig, config_from_dict, load_config
from peftkit.train.data import check_data_files
from peftkit.train.metrics import process_memory, read_metrics
from peftkit.train.optim import LORAPLUS_METHODS
from peftkit.train.tasks import peft_config

#: Method names accepted besides :data:`PEFT_METHODS` keys.
ALIASES = {"full": "none"}


def method_config(base: RunConfig, method: str, out_dir: Path, options: dict[str, Any] | None = None) -> RunConfig:
    """``base`` with ``peft`` set to ``method`` and outputs under ``out_dir/method``; quiet, no resume.

    ``options`` (from ``--set METHOD.FIELD=VALUE``) are this method's own peft fields, set over what it takes from
    the config's ``peft`` section.

    Raises:
        ConfigError: ``method`` is not a known method, or the config's fields are invalid for it.
    """
    name = ALIASES.get(method, method)
    if name not in PEFT_METHODS:
        known = sorted([*PEFT_METHODS, *ALIASES])
        close = difflib.get_close_matches(method, known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown method {method!r} in --methods{hint}; choose from {known}")
    data = base.to_dict()
    data["peft"] = {"method": name, **_options_for(name, base.peft.method, dict(base.peft.options)), **(options or {})}
    if name not in LORAPLUS_METHODS:  # LoRA+ is part of a LoRA recipe: the other methods train without it
        data["optimizer"] = {**data["optimizer"], "loraplus_ratio": 0.0}
    _fill_steps(data)
    data["checkpoint"] = {**data["checkpoint"], "save_dir": str(out_dir / method), "resume": "none",
                          "save_interval": 0, "keep_last": 1}
    data["logging"] = {**data["logging"], "progress_bar": False, "tensorboard": "false", "plots": False,
                       "jsonl": True}
    cfg = config_from_dict(data)
    try:
        peft_config(cfg)  # the method's own fields (rank > 0, ...), checked here rather than in the child process
    except ConfigError as exc:
        named = re.match(r"(\w+)=", str(exc))  # method errors name the field first: "adapter_len=0 must be ..."
        field = named.group(1) if named else "FIELD"
        raise ConfigError(f"--methods {method}: {exc}. Set it in the config's peft section (peft.{field}=VALUE on the "
                          "command line: each field reaches only the compared methods that have it) or for this "
                          f"method alone (--set {method}.{field}=VALUE)") from exc
    return cfg


def _options_for(method: str, source_method: str, options: dict[str, Any]) -> dict[str, Any]:
    """The config's peft options that ``method``'s config class has a field for.

    The config's own method also keeps the options no method has, so that a misspelt field is still refused by name;
    a field of another method (``adapter_len`` in a LoRA config compared with adaption prompts) reaches only the
    methods that have it.
    """
    if method == source_method:
        known = set().union(*(_fields(m) for m in PEFT_METHODS))
        return {k: v for k, v in options.items() if k in _fields(method) or k not in known}
    fields = _fields(method) - _NOT_CARRIED.get(method, set())
    carried = {k: v for k, v in options.items() if k in fields}
    only = _adapted_bias(method)
    if only is not None and carried.get("bias") in {_adapted_bias(m) for m in PEFT_METHODS} - {None}:
        carried["bias"] = only  # the adapted layers' biases, in this method's spelling
    return carried


def _fields(method: str) -> set[str]:
    """The field names of ``method``'s config class (none for ``none``)."""
    cls_name = PEFT_METHODS[method]
    if cls_name is None:
        return set()
    import peftkit as pk

    cls = getattr(pk, cls_name, None)
    if cls is None:
        raise ConfigError(f"method {method!r} is not available in this peftkit (no peftkit.{cls_name})")
    return {f.name for f in dataclasses.fields(cls)}


def _adapted_bias(method: str) -> str | None:
    """``method``'s ``bias`` value for "the biases of the adapted layers" (HF PEFT spells it per method: its config's
    ``bias_only``), or None where it has none."""
    cls_name = PEFT_METHODS.get(method)
    if cls_name is None:
        return None
    import peftkit as pk

    only = getattr(getattr(pk, cls_name, None), "bias_only", None)
    return only if isinstance(only, str) else None


#: Fields that mean something else for that method, so another method's value is not passed on: BitFit's
#: ``target_modules`` select modules whose *bias* trains (its default, every bias, is the method); LN tuning's select
#: norm layers (its default: the architecture's); adaption prompts take one attention module name and choose their
#: blocks by ``adapter_layers``; CPT adapts no module (its virtual tokens go in front of the input).
_NOT_CARRIED = {"bitfit": {"target_modules", "exclude_modules"},
                "ln_tuning": {"target_modules", "exclude_modules"},
                "adaption_prompt": {"target_modules", "exclude_modules", "layers"},
                "cpt": {"target_modules", "exclude_modules", "layers"}}


def _fill_steps(cfg: dict[str, Any]) -> None:
    """AdaLoRA's schedule needs the run's length: ``total_step`` from ``train.max_steps`` when not given."""
    peft, steps = cfg["peft"], int(cfg.get("train", {}).get("max_steps") or 0)
    if peft["method"] == "adalora" and not peft.get("total_step"):
        if steps <= 0:
            raise ConfigError("adalora needs peft.total_step (its rank schedule's length) when train.max_steps "
                              "is not set; add peft.total_step=N or train.max_steps=N")
        peft["total_step"] = steps


# -- one method, in a child process -----------------------------------------------------------------


def run_one(cfg: RunConfig) -> dict[str, Any]:
    """Train ``cfg`` in this process, timing each optimizer step; returns the row for the table."""
    import torch

    from peftkit.train import loop

    steps: list[float] = []
    tokens: list[int] = []
    memory: dict[str, Any] = {}
    inner = loop.train_step

    def timed_step(run: Any, step: int, params: list[Any]) -> dict[str, Any]:
        if not steps:  # training starts: measure memory from here (model and data are loaded)
            memory["before"] = process_memory("VmRSS")
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
        # The peak resident memory of each step alone (evaluation between steps and after the last is not training):
        # the peak is reset before the step (Linux) and read after it.
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            memory["before"] = None
        start = time.perf_counter()
        record = inner(run, step, params)
        steps.append(time.perf_counter() - start)
        peak = process_memory("VmHWM")
        if peak is not None:
            memory["peak"] = max(memory.get("peak", 0), peak)
        tokens.append(int(record["tokens"]))
        return record

    loop.train_step = timed_step
    try:
        summary = loop.train(cfg)
    finally:
        loop.train_step = inner
    peak = memory.get("peak")
    adapter = Path(summary["adapter"])
    timed = steps[1:] or steps  # the first step pays one-off costs (optimizer state, lazy init)
    return {
        "trainable": summary["trainable"], "total": summary["total"], "steps": summary["steps"],
        "peak_memory_bytes": (peak - memory["before"]) if memory.get("before") is not None and peak else None,
        "cuda_peak_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
        "time_per_step_s": statistics.median(timed) if timed else None,
        "tokens_per_s": sum(tokens[1:] or tokens) / sum(timed) if timed and sum(timed) > 0 else None,
        "losses": summary["losses"], "final_loss": summary["losses"][-1] if summary["losses"] else None,
        "eval": summary["eval"],
        "adapter_bytes": sum(p.stat().st_size for p in adapter.glob("*.safetensors")),
        "seconds": summary["seconds"],
    }


def _child(config_path: str, result_path: str) -> int:
    row = run_one(load_config(config_path))
    write_text_atomic(result_path, json.dumps(row))
    return 0


# -- the comparison ----------------------------------------------------------------------------------
def compare(config: str | Path | RunConfig, methods: list[str], out_dir: str | Path,
            overrides: list[str] | None = None, isolate: bool = True,
            method_options: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Run the same training for each of ``methods`` and write the table and plots.

    Args:
        config: a run config (YAML path or :class:`RunConfig`); its ``peft`` section is replaced per method.
        methods: method names (``lora``, ``dora``, ``ia3``, ``full``, … — see :data:`PEFT_METHODS`).
        out_dir: where each method's run, ``compare.json``, ``compare.md`` and the PNG plots go.
        overrides: ``key=value`` overrides applied to a YAML ``config``.
        isolate: run each method in its own process (peak memory per method); ``False`` runs them here.
        method_options: per method, peft fields for it alone (``{"ln_tuning": {"target_modules": ["LayerNorm"]}}``,
            the command line's ``--set ln_tuning.target_modules=[LayerNorm]``).

    Returns:
        ``{"methods": {method: row}, "table": markdown, "files": [paths]}``; a failed method's row holds ``error``.

    Raises:
        ConfigError: no methods, an unknown or repeated method, an invalid config, a data file that does not exist,
            or an ``out_dir`` that is a file.
    """
    if not methods:
        raise ConfigError("--methods is empty; give a comma-separated list such as lora,dora,ia3,full")
    seen: dict[str, str] = {}  # method → the spelling that named it first
    for method in methods:
        name = ALIASES.get(method, method)
        if name in seen:
            alias = next((f" ({a!r} is {ALIASES[a]!r})" for a in (seen[name], method) if a in ALIASES), "")
            raise ConfigError(f"--methods names the same method twice: {seen[name]!r} and {method!r}{alias}; "
                              "list each method once")
        seen[name] = method
    method_options = method_options or {}
    stray = [m for m in method_options if m not in methods]
    if stray:
        raise ConfigError(f"--set names {', '.join(map(repr, stray))}, which --methods does not list "
                          f"({', '.join(methods)}); set options of compared methods only")
    for method, options in method_options.items():
        name = ALIASES.get(method, method)
        if name not in PEFT_METHODS:
            continue  # an unknown method: method_config names it, with the near miss
        fields = _fields(name)
        for field in options:
            if not fields:
                raise ConfigError(f"--set {method}.{field}: {method} trains every base weight and has no peft fields")
            if field not in fields:
                close = difflib.get_close_matches(field, sorted(fields), n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise ConfigError(f"--set {method}.{field}: {method} has no field {field!r}; {hint}its fields are "
                                  f"{', '.join(sorted(fields))}")
    base = config if isinstance(config, RunConfig) else load_config(config, overrides)
    check_data_files(base.data.train, base.data.eval)  # the same for every method: one error, not one per method
    configs = {m: method_config(base, m, Path(out_dir), method_options.get(m))  # all validated before any training
               for m in methods}
    out = output_dir(out_dir, "--out")
    plain = [m for m in methods if ALIASES.get(m, m) not in LORAPLUS_METHODS]
    if base.optimizer.loraplus_ratio > 0 and plain:
        print(f"compare: optimizer.loraplus_ratio={base.optimizer.loraplus_ratio:g} (LoRA+) applies to "
              f"{', '.join(LORAPLUS_METHODS)}; {', '.join(plain)} train without it", flush=True)
    rows: dict[str, dict[str, Any]] = {}
    for i, (method, cfg) in enumerate(configs.items(), 1):
        print(f"compare: training {method} ({i}/{len(configs)}) in {out / method}", flush=True)
        rows[method] = _run_isolated(cfg, out / method) if isolate else run_one(cfg)
        if "error" in rows[method]:
            print(f"compare: {method} failed: {rows[method]['error']}", file=sys.stderr, flush=True)
        # After every method: Ctrl-C, or a later method that kills the process, keeps these results.
        table = markdown_table(rows)
        write_text_atomic(out / "compare.md", table)
        write_text_atomic(out / "compare.json",
                          json.dumps({"methods": rows, "config": base.to_dict()}, indent=1, default=str))
    files = [out / "compare.md", out / "compare.json"] + plot(rows, out)
    print(table)
    return {"methods": rows, "table": table, "files": [str(f) for f in files]}


#: Seconds between the progress lines of a method training in its own process (its last logged step and loss).
PROGRESS_SECONDS = 30.0


def _run_isolated(cfg: RunConfig, run_dir: Path) -> dict[str, Any]:
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg_path, result_path = run_dir / "compare_config.yaml", run_dir / "compare_result.json"
    write_text_atomic(cfg_path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    result_path.unlink(missing_ok=True)
    (run_dir / "metrics.jsonl").unlink(missing_ok=True)  # the run starts afresh: a record there is this run's
    proc = subprocess.Popen([sys.executable, "-m", "peftkit.train.compare", "--child", str(cfg_path), str(result_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    shown = 0
    try:
        while True:
            try:
                stdout, stderr = proc.communicate(timeout=PROGRESS_SECONDS)  # no output is lost between tries
                break
            except subprocess.TimeoutExpired:
                shown = _show_progress(run_dir, cfg.train.max_steps, shown)
    finally:
        if proc.poll() is None:  # interrupted: the child goes too
            proc.kill()
            proc.wait()
    if proc.returncode != 0 or not result_path.is_file():
        log = run_dir / "compare_error.log"  # the whole output; the table shows the error's last line
        write_text_atomic(log, stdout + stderr)
        lines = (stderr or stdout).strip().splitlines()
        return {"error": lines[-1] if lines else f"exit status {proc.returncode}", "log": str(log)}
    return json.loads(result_path.read_text())  # type: ignore[no-any-return]


def _show_progress(run_dir: Path, max_steps: int, shown: int) -> int:
    """Print the latest step and loss the method's run has logged, if later than ``shown``; return the step shown."""
    try:
        records = [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]
    except (OSError, ValueError):  # caught mid-write: the next look reads it whole
        return shown
    if not records or records[-1]["step"] <= shown:
        return shown
    last = records[-1]
    of = f" of {max_steps}" if max_steps else ""
    print(f"compare: {run_dir.name} at step {last['step']}{of}, loss {last['loss']:.4f}", flush=True)
    return int(last["step"])


def _fmt(value: Any, spec: str, scale: float = 1.0) -> str:
    return "—" if value is None else format(value / scale, spec)


def _size(n: int | None) -> str:
    """Bytes in the largest unit that keeps the number at least 1 (``"3.5 KiB"``)."""
    if n is None:
        return "—"
    value, unit = float(n), "B"
    for next_unit in ("KiB", "MiB", "GiB"):
        if value < 1024:
            break
        value, unit = value / 1024, next_unit
    return f"{value:.1f} {unit}"


def markdown_table(rows: dict[str, dict[str, Any]]) -> str:
    """The comparison as a Markdown table (one row per method)."""
    metric_keys = sorted({k for r in rows.values() for k in (r.get("eval") or {})})
    head = ["method", "trainable params", "trainable %", "peak memory", "time/step (s)", "tokens/s",
            "final loss", *[f"eval {k}" for k in metric_keys], "adapter size"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, r in rows.items():
        if "error" in r:
            lines.append(f"| {method} | failed: {r['error'][:200]} |" + " |" * (len(head) - 2))
            continue
        cells = [method, f"{r['trainable']:,}", _fmt(100 * r["trainable"] / max(r["total"], 1), ".4f"),
                 _size(r["peak_memory_bytes"] if r.get("cuda_peak_bytes") is None else r["cuda_peak_bytes"]),
                 _fmt(r["time_per_step_s"], ".3f"), _fmt(r["tokens_per_s"], ",.0f"), _fmt(r["final_loss"], ".4f"),
                 *[_fmt((r.get("eval") or {}).get(k), ".4f") for k in metric_keys],
                 _size(r["adapter_bytes"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: dict[str, dict[str, Any]], out: Path) -> list[Path]:
    """``loss.png`` (training loss per step, every method) and ``memory_time.png`` (bars).

    Raises:
        MissingDependencyError: matplotlib is not installed (``pip install 'peftkit[plot]'``).
    """
    mpl = require("matplotlib", "plot")
    mpl.use("Agg")  # type: ignore[attr-defined]
    plt: Any = require("matplotlib.pyplot", "plot")
    ok = {m: r for m, r in rows.items() if "error" not in r}
    if not ok:
        return []
    fig, ax = plt.subplots(figsize=(6.5 + (1.5 if len(ok) > 8 else 0), 4))
    styles = ["-", "--", ":", "-."]  # the default cycle has ten colours: line styles tell more methods apart
    for i, (method, r) in enumerate(ok.items()):
        ax.plot(range(1, len(r["losses"]) + 1), r["losses"], label=method, linestyle=styles[i // 10 % 4])
    ax.set(xlabel="step", ylabel="training loss", title="Loss per method")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", ncol=1 + len(ok) // 10, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    save_figure(fig, out / "loss.png")
    plt.close(fig)
    # Horizontal bars, one row per method: names of any length and number stay legible.
    names = list(ok)
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 1.2 + 0.3 * len(names)), sharey=True)
    memory = [(r.get("cuda_peak_bytes") or r.get("peak_memory_bytes") or 0) / 2**20 for r in ok.values()]
    left.barh(names, memory, color="tab:blue")
    left.set(xlabel="MiB", title="Peak memory of training")
    right.barh(names, [r.get("time_per_step_s") or 0 for r in ok.values()], color="tab:orange")
    right.set(xlabel="seconds", title="Time per step")
    left.invert_yaxis()  # the table's order, top to bottom
    for axis in (left, right):
        axis.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    save_figure(fig, out / "memory_time.png")
    plt.close(fig)
    return [out / "loss.png", out / "memory_time.png"]


# -- command line --------------------------------------------------------------------------------------
def parse_sets(items: list[str]) -> dict[str, dict[str, Any]]:
    """``--set METHOD.FIELD=VALUE`` items as ``{method: {field: value}}``, values read as YAML.

    Raises:
        ConfigError: an item of another form.
    """
    options: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        method, dot, field = key.strip().partition(".")
        if not (sep and dot and method and field) or "." in field:
            raise ConfigError(f"--set {item!r} is invalid; write METHOD.FIELD=VALUE for one compared method's peft "
                              "field, e.g. --set ln_tuning.target_modules=[LayerNorm]")
        options.setdefault(method, {})[field] = yaml.safe_load(raw) if raw.strip() else ""
    return options


def _command(args: argparse.Namespace) -> int:
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    rows = compare(args.config, methods, args.out, args.overrides, method_options=parse_sets(args.set))["methods"]
    failed = {m: r for m, r in rows.items() if "error" in r}
    if not failed:
        return 0
    out = Path(args.out)
    logs = "".join(f"; {m}'s output is in {r['log']}" for m, r in failed.items() if "log" in r)
    print(f"peftkit compare: {len(failed)} of {len(rows)} methods failed ({', '.join(failed)}); their errors are in "
          f"{out / 'compare.json'} and {out / 'compare.md'}{logs}", file=sys.stderr)
    return 3  # "some runs failed": not 1, Python's status for a crash, nor 2, an error


def register(sub: Any) -> None:
    """Add the ``compare`` subcommand to the ``peftkit`` CLI's subparsers."""
    p = sub.add_parser(
        "compare",
        help="train several PEFT methods on the same model and data and compare them",
        description="Run CONFIG once per method (only peft changes), each in OUT/<method>/ in its own process, "
        "and write compare.md, compare.json, loss.png and memory_time.png to OUT. A method that fails is a "
        "'failed: ...' row (its output in OUT/<method>/compare_error.log); the exit status is then 3.",
    )
    p.add_argument("config", help="YAML run config (see configs/)")
    p.add_argument("--methods", required=True,
                   help="comma-separated peft.method names, e.g. lora,dora,ia3,full (full: every base weight trains)")
    p.add_argument("--out", default="runs/compare", help="output directory (default runs/compare)")
    p.add_argument("--set", action="append", default=[], metavar="METHOD.FIELD=VALUE",
                   help="a peft field for one compared method alone (repeatable), e.g. "
                        "--set ln_tuning.target_modules=[LayerNorm]")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. train.max_steps=50")
    p.set_defaults(func=_command)


#: The name the CLI owner asked for.
add_parser = register


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        sys.exit(_child(sys.argv[2], sys.argv[3]))
    parser = argparse.ArgumentParser(prog="python -m peftkit.train.compare")
    register(parser.add_subparsers(dest="command", required=True))
    parsed = parser.parse_args(["compare", *sys.argv[1:]])
    sys.exit(parsed.func(parsed))
