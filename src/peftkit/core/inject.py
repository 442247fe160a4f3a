"""``apply`` and ``delete_adapter``: validate, freeze, walk, wrap."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from peftkit.core.config import AdapterConfig, infer_task_type
from peftkit.core.layer import AdapterLayer
from peftkit.core.matching import first_match
from peftkit.core.modules_to_save import ModulesToSave
from peftkit.core.state import adapter_layers, get_state, set_adapter
from peftkit.core.walk import iter_modules, set_module
from peftkit.errors import (
    AdapterExistsError,
    AdapterNotFoundError,
    AdapterStateError,
    ConfigError,
    TargetNotFoundError,
)


def _check_name(model: nn.Module, name: str) -> None:
    if not isinstance(name, str) or not name or "." in name:
        raise ConfigError(f"adapter name {name!r} must be a non-empty string without dots, e.g. 'task1'")
    existing = get_state(model).configs
    if name in existing:
        raise AdapterExistsError(
            f"an adapter named {name!r} already exists on this model (adapters: {sorted(existing)}); "
            f"choose another name or remove it first with pk.delete_adapter(model, {name!r})"
        )


def _check_not_merged(model: nn.Module) -> None:
    merged = sorted({f"{n} ({', '.join(l.merged_adapters)})" for n, l in adapter_layers(model) if l.merged_adapters})
    if merged:
        raise AdapterStateError(
            f"the model has merged adapters at {merged[:3]}{' …' if len(merged) > 3 else ''}; "
            "call pk.unmerge(model) before adding or loading another adapter"
        )


def _resolve_modules_to_save(model: nn.Module, patterns: list[str]) -> list[str]:
    names = [n for n, _ in iter_modules(model) if n]
    found: list[str] = []
    for pattern in patterns:
        hits = [n for n in names if first_match(n, [pattern]) is not None]
        # A module inside another selected one is already covered by its parent's copy.
        hits = [n for n in hits if not any(n.startswith(h + ".") for h in hits)]
        if not hits:
            raise TargetNotFoundError(
                f"modules_to_save pattern {pattern!r} matches no module; top-level modules are "
                f"{[n for n in names if '.' not in n]}"
            )
        found.extend(h for h in hits if h not in found)
    return found


#: Classification heads Hugging Face PEFT trains in full for ``task_type="SEQ_CLS"``.
CLASSIFIER_HEADS = ("classifier", "score")
#: Task type → the heads HF PEFT's model class for it trains in full (and its loader expects in the file).
TASK_HEADS = {"SEQ_CLS": CLASSIFIER_HEADS, "TOKEN_CLS": CLASSIFIER_HEADS, "QUESTION_ANS": ("qa_outputs",)}


def classifier_heads(model: nn.Module, config: AdapterConfig) -> list[str]:
    """The heads to add to ``modules_to_save`` for a classifier, as HF PEFT does (none if any are given).

    The task is the config's ``task_type``, or without one the model class's (``*ForSequenceClassification`` →
    ``SEQ_CLS``, ``*ForTokenClassification`` → ``TOKEN_CLS``, ``*ForQuestionAnswering`` → ``QUESTION_ANS``); its
    heads are ``classifier`` or ``score`` (whichever exists) for the first two and ``qa_outputs`` for the last.
    """
    return [] if config.modules_to_save else task_heads(model, config)


def task_heads(model: nn.Module, config: AdapterConfig) -> list[str]:
    """The heads HF PEFT's model class for the config's task (or the model class's) trains in full, among the model's
    modules: ``classifier`` / ``score`` for ``SEQ_CLS`` and ``TOKEN_CLS``, ``qa_outputs`` for ``QUESTION_ANS``."""
    heads = TASK_HEADS.get(config.task_type or infer_task_type(model) or "", ())
    names = [n for n, _ in iter_modules(model) if n]
    return [head for head in heads if any(first_match(n, [head]) for n in names)]


def _saved_over_targets(
    model: nn.Module, config: AdapterConfig, saved: list[str], targets: list[str], from_file: bool
) -> tuple[AdapterConfig, list[str], list[str]]:
    """HF PEFT never adapts a module inside a ``modules_to_save`` module, and its classifier model classes always
    add the task's head to ``modules_to_save``: a targeted head (or a layer inside it) is trained in full instead of
    adapted. An adapter file (``from_file``) means the same for every module it lists in ``modules_to_save``.

    Returns:
        The config (its ``modules_to_save`` naming a head moved there), the modules to copy and the targets left.

    Raises:
        ConfigError: every target lies in such a module (HF PEFT refuses that too).
    """
    # A file's task is its own: without a task_type HF PEFT loads it with no head rule (a head may be adapted).
    heads = task_heads(model, config) if config.adds_heads and (config.task_type or not from_file) else []
    names = [n for n, _ in iter_modules(model) if n]
    head_modules = [n for n in names if first_match(n, heads) is not None]
    protected = [*head_modules, *(saved if from_file else [])]
    moved = [t for t in targets if any(t == s or t.startswith(s + ".") for s in protected)]
    if not moved:
        return config, saved, targets
    left = [t for t in targets if t not in moved]
    if not left:
        raise ConfigError(
            f"target_modules={list(getattr(config, 'target_modules', []))} select only {moved}, inside the "
            f"classification head {heads or saved} that task_type={config.task_type or infer_task_type(model)!r} "
            "trains in full (modules_to_save), as HF PEFT does; target other modules as well, or pass another "
            "task_type (e.g. 'FEATURE_EXTRACTION') to adapt the head itself"
        )
    new = [h for h in head_modules if h not in saved and any(t == h or t.startswith(h + ".") for t in moved)]
    if new:
        listed = list(config.modules_to_save)
        listed += [h for h in heads if h not in listed and any(first_match(n, [h]) for n in new)]
        config = config.replace(modules_to_save=listed)
    return config, saved + new, left


def _check_compatible(model: nn.Module, config: AdapterConfig, targets: list[str]) -> None:
    modules = dict(model.named_modules())
    for name in targets:
        module = modules[name]
        if isinstance(module, AdapterLayer) and not config.supports(module):
            raise ConfigError(
                f"{name} is already adapted by a {type(module).__name__}; a second adapter on the same layer "
                f"must use the same method, not {type(config).__name__}"
            )


def apply(model: nn.Module, config: AdapterConfig, name: str = "default", activate: bool | None = None, *,
          train_heads: bool = True) -> nn.Module:
    """Adapt ``model`` in place with a new adapter and return the same object.

    Everything is validated before the model is touched: the name, the model's merge state, the
    targets and their layer types. Base parameters are frozen; the new adapter's parameters are
    trainable when it is active. A sequence or token classifier (``task_type="SEQ_CLS"``/``"TOKEN_CLS"``, or a
    ``*ForSequenceClassification``/``*ForTokenClassification`` model) given no ``modules_to_save`` trains its head
    (``classifier`` / ``score``) in full, as Hugging Face PEFT does, and a question-answering model its
    ``qa_outputs``; the adapter's stored config lists it.

    Args:
        model: any ``nn.Module``.
        config: a method config such as ``pk.LoRA(target_modules=["q_proj", "v_proj"])``.
        name: the adapter's name, used by ``set_adapter``, ``save_adapter`` and friends.
        activate: make the new adapter the active one. Default: only if no adapter is active yet.
        train_heads: give a sequence classifier's head to ``modules_to_save`` when the config names none (above);
            ``load_adapter`` passes ``False``: an adapter file lists the modules it saved.

    Returns:
        ``model`` itself.

    Raises:
        ConfigError: invalid name or config; TargetNotFoundError / UnsupportedLayerError: bad targets.
        AdapterExistsError: ``name`` is taken. AdapterStateError: the model has merged adapters.
    """
    if not isinstance(config, AdapterConfig):
        raise ConfigError(f"config must be a peftkit method config such as pk.LoRA(...), got {type(config).__name__}")
    _check_name(model, name)
    _check_not_merged(model)
    config = config.for_model(model)  # a copy: the user's config object stays reusable on other models
    with prepared(model, config):
        return _add(model, config, name, activate, train_heads)


@contextlib.contextmanager
def prepared(model: nn.Module, config: AdapterConfig) -> Iterator[None]:
    """Let ``config`` reshape the model before its targets are resolved (its optional ``prepare_model(model)``, which
    returns what undoes it: LoRA's ``layer_replication``), undone if the block raises."""
    prepare = getattr(config, "prepare_model", None)
    undo = prepare(model) if prepare is not None else None
    try:
        yield
    except BaseException:
        if undo is not None:
            undo()
        raise


def _add(model: nn.Module, config: AdapterConfig, name: str, activate: bool | None, train_heads: bool) -> nn.Module:
    """``apply`` once the name, the merge state and the model's shape are settled."""
    existing = {id(m) for m in model.modules()}
    heads = classifier_heads(model, config) if train_heads and config.adds_heads else []
    if heads:  # on a copy: the user's config object stays reusable on other models
        config = config.replace(modules_to_save=heads)
    # Resolved before a method's own ``inject`` adds its modules, so a bad pattern leaves the model untouched.
    saved = _resolve_modules_to_save(model, list(config.modules_to_save))
    custom = getattr(config, "inject", None)
    if custom is not None:  # methods that add modules rather than wrap layers (prompt tuning, ...)
        targets = custom(model, name)
    else:
        config, saved, targets = _saved_over_targets(model, config, saved, config.resolve(model), not train_heads)
        _check_compatible(model, config, targets)
    overlap = sorted(t for t in targets if any(t == s or t.startswith(s + ".") for s in saved))
    if overlap:
        raise ConfigError(
            f"{overlap} are both adapter targets and modules_to_save; a module is either trained in full "
            "(modules_to_save) or adapted, so remove it from one of the two"
        )

    state = get_state(model, create=True)
    if not state.configs:
        model.requires_grad_(False)
    try:
        if custom is None:
            for target in targets:
                set_module(model, target, config.transform(model.get_submodule(target), target, name))
            wrap_parameters = getattr(config, "inject_parameters", None)  # LoRA's target_parameters
            if wrap_parameters is not None:
                wrap_parameters(model, name)
        for target in saved:
            module = model.get_submodule(target)
            wrapper = module if isinstance(module, ModulesToSave) else ModulesToSave(module)
            wrapper.add(name)
            set_module(model, target, wrapper)
    except Exception:
        _remove(model, name)
        raise
    state.configs[name] = config
    state.targets[name] = targets
    state.saved[name] = saved
    if activate or (activate is None and not state.active):
        set_adapter(model, [name])
    else:
        set_adapter(model, state.active)
    post = getattr(config, "after_apply", None)
    if post is not None:
        post(model, name)
    inherit_mode(model, existing)
    return model


def inherit_mode(model: nn.Module, existing: set[int]) -> None:
    """Put the modules an adapter added in the train/eval mode of the module they were added to.

    A module starts in training mode; an adapter added to a model in evaluation mode would otherwise apply
    dropout in every forward until the next ``model.eval()``.
    """
    modes = {"": model.training}
    for path, module in model.named_modules():  # parents come before their children
        if id(module) not in existing:
            module.training = modes.get(path.rpartition(".")[0], model.training) if path else model.training
        modes[path] = module.training


def _remove(model: nn.Module, name: str) -> None:
    """Drop adapter ``name`` from every layer, restoring base layers that end up with no adapter."""
    for qualname, layer in reversed(list(adapter_layers(model))):  # inner layers first: wrappers may nest
        if layer.has_adapter(name):
            layer.delete_adapter(name)
            if not layer.adapter_names:
                set_module(model, qualname, layer.base_layer)
    remove = getattr(get_state(model).configs.get(name), "remove", None)
    if remove is not None:
        remove(model, name)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` from ``model``; layers left with no adapter become plain layers again.

    Raises:
        AdapterNotFoundError: ``name`` is not an adapter of ``model``.
    """
    state = get_state(model)
    if name not in state.configs:
        raise AdapterNotFoundError(
            f"no adapter named {name!r} on this model; its adapters are {sorted(state.configs) or 'none'}"
        )
    _remove(model, name)
    del state.configs[name]
    del state.targets[name]
    state.saved.pop(name, None)
    state.active = [n for n in state.active if n != name]
    set_adapter(model, state.active)
