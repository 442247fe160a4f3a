"""Hugging Face PEFT's adapter format, both ways.

A directory holds ``adapter_config.json`` (HF PEFT's field names) and ``adapter_model.safetensors``
(keys such as ``base_model.model.<module path>.lora_A.weight``). Several adapters are saved as HF PEFT
does: ``default`` in the directory itself, every other adapter in a subdirectory named after it. Settings HF PEFT
has no field for (performant LoRA's shared A, Megatron's dropout position) go in ``peftkit_config.json`` beside
them, which HF PEFT ignores.

Loading is strict where HF PEFT is lenient: missing keys, unexpected keys and shape mismatches are
errors, and the model is left exactly as it was.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from peftkit.core.config import AdapterConfig, infer_task_type
from peftkit.core.inject import TASK_HEADS, apply, delete_adapter, prepared
from peftkit.core.layer import AdapterLayer
from peftkit.core.matching import first_match
from peftkit.core.modules_to_save import ModulesToSave
from peftkit.core.registry import METHODS, is_fan_in_fan_out
from peftkit.core.state import adapter_layers, get_state
from peftkit.core.walk import iter_modules
from peftkit.errors import AdapterNotFoundError, CheckpointError, ConfigError, ShapeMismatchError
from peftkit.io.atomic import atomic_path
from peftkit.io.hf_names import hf_saved_modules

logger = logging.getLogger("peftkit")

CONFIG_NAME = "adapter_config.json"
#: peftkit's own settings of an adapter that HF PEFT has no field for (e.g. performant LoRA's shared A), which
#: HF PEFT would warn about in ``adapter_config.json``; it ignores this file.
PEFTKIT_NAME = "peftkit_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
PREFIX = "base_model.model."

def module_names(model: nn.Module) -> list[str]:
    """Qualified names of the model's modules as they were before wrapping."""
    return [n for n, _ in iter_modules(model) if n]


def adapter_state_dict(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Adapter ``name``'s tensors under HF PEFT's full keys (live tensors, not copies)."""
    config = _config(model, name)
    state: dict[str, torch.Tensor] = {}
    # HF PEFT keys prompt-learning adapters' other tensors (a classifier copy) as ``base_model.<path>``.
    root = getattr(config, "key_prefix", PREFIX)
    for qualname, layer in adapter_layers(model):
        prefix = f"{root}{qualname}." if qualname else root
        for key, value in layer.adapter_tensors(name).items():
            state[prefix + key] = value
    extra = getattr(config, "extra_tensors", None)
    if extra is not None:
        state.update(extra(model, name))
    return state


def file_tensors(model: nn.Module, name: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Adapter ``name``'s tensors ``state`` (from ``adapter_state_dict``) as its file holds them: re-encoded by the
    method's ``file_tensors`` where it stores them in another form (VB-LoRA's top-k weights and indices)."""
    encode = getattr(_config(model, name), "file_tensors", None)
    return cast(dict[str, torch.Tensor], encode(state)) if encode is not None else state


def adapter_config_dict(model: nn.Module, name: str, config: AdapterConfig | None = None) -> dict[str, Any]:
    """Adapter ``name``'s ``adapter_config.json`` content (written from ``config`` instead of its own if given)."""
    config = config or _config(model, name)
    names = module_names(model)
    data = config.to_hf_dict(get_state(model).targets[name], names)
    if data.get("modules_to_save"):  # the modules the patterns selected, spelled as HF PEFT matches them
        data["modules_to_save"] = hf_saved_modules(get_state(model).saved.get(name, []), names)
    if data.get("task_type") is None:
        data["task_type"] = _inferred_task(model, get_state(model).targets[name])
    name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None)
    if data.get("base_model_name_or_path") is None and name_or_path:
        data["base_model_name_or_path"] = name_or_path
    if "fan_in_fan_out" in data:
        modules = dict(model.named_modules())
        data["fan_in_fan_out"] = any(
            is_fan_in_fan_out(cast(nn.Module, getattr(modules[t], "base_layer", modules[t])))
            for t in get_state(model).targets[name]
        )
    return data


def _inferred_task(model: nn.Module, targets: Sequence[str]) -> str | None:
    """The model class's task type, unless the adapter adapts a head of that task (loaded from an HF PEFT file without
    a task type): HF PEFT's model class for the task would train that head in full instead, so such an adapter is
    written without a task type, as HF PEFT wrote it."""
    task = infer_task_type(model)
    heads = [n for n, _ in iter_modules(model) if n and first_match(n, TASK_HEADS.get(task or "", ())) is not None]
    if any(t == h or t.startswith(h + ".") for t in targets for h in heads):
        return None
    return task


def save_adapter(
    model: nn.Module, directory: str | Path, name: str | Sequence[str] | None = None, *, layout: str | None = None,
    convert_to_lora: bool = False,
) -> None:
    """Write adapters in HF PEFT's layout, atomically: every file is complete before any replaces its old version
    (``adapter_config.json`` last), so a save that fails leaves the previous files as they were.

    Args:
        model: a model adapted with ``pk.apply`` or ``pk.load_adapter``.
        directory: the target directory (created if needed).
        name: one adapter (written to ``directory`` itself), several, or ``None`` for all of them;
            with several, ``default`` goes to ``directory`` and the others to ``directory/<name>``.
        layout: write LoRA adapters converted to ``"canonical"`` (an A and B per logical part) or
            ``"performant"`` (one A per fused group; a canonical adapter on a fused layer becomes an HF PEFT
            adapter on that layer); ``None`` writes them as they are. The model is not changed.
        convert_to_lora: write adapters initialised with PiSSA or OLoRA (``pk.LoRA(init=...)``, which changed the
            base weights) as plain LoRA adapters of twice the rank for the *original* base model, as HF PEFT's
            ``save_pretrained(path_initial_model_for_weight_conversion=...)`` does
            (:func:`peftkit.methods.lora_init.as_plain_lora`). The model is not changed.

    Raises:
        AdapterNotFoundError: a name is not an adapter of ``model``.
        ConfigError: an unknown ``layout``, or one asked of an adapter that is not LoRA/CanonicalLoRA;
            ``convert_to_lora`` with ``layout``, or for an adapter whose initialisation kept the base weights.
            Nothing is written then.
    """
    known = list(get_state(model).configs)
    if name is None:  # adapters another one owns (X-LoRA's experts) are saved with it
        owned = {o for n in known for o in getattr(_config(model, n), "owned_adapters", lambda _: ())(n)}
        names = [n for n in known if n not in owned]
    else:
        names = [name] if isinstance(name, str) else list(name)
    for n in names:
        _config(model, n)
    if not names:
        raise AdapterNotFoundError("the model has no adapters to save; add one with pk.apply first")
    if convert_to_lora and layout is not None:
        raise ConfigError("convert_to_lora and layout cannot be combined: save the plain LoRA adapter, load it onto "
                          "the original model, and save that with layout=")
    single = isinstance(name, str) or len(names) == 1
    outputs = []
    owners: list[str] = []  # the adapter each output belongs to
    for n in names:  # every adapter is converted before any file is written
        target = Path(directory) if single or n == "default" else Path(directory) / n
        if convert_to_lora:
            from peftkit.methods.lora_init import as_plain_lora

            outputs.append((target, *as_plain_lora(model, n)))
        elif layout is None:
            state = file_tensors(model, n, adapter_state_dict(model, n))
            outputs.append((target, adapter_config_dict(model, n), state))
            companions = getattr(_config(model, n), "companion_files", None)  # X-LoRA's experts, beside it
            if companions is not None:
                extra = companions(model, n, target, outputs[-1][1])
                outputs += extra
        else:
            from peftkit.methods.convert import export_adapter

            outputs.append((target, *export_adapter(model, n, layout)))
        owners += [n] * (len(outputs) - len(owners))
    stale: list[Path] = []
    with contextlib.ExitStack() as files:  # every file is complete before any replaces its old version
        for n, (target, config, state) in zip(owners, outputs, strict=True):
            stale += _stage(files, target, *_with_task_heads(model, n, config, state))
    for path in stale:
        path.unlink(missing_ok=True)


def _with_task_heads(
    model: nn.Module, name: str, config: dict[str, Any], state: dict[str, torch.Tensor]
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``config`` and ``state`` with the heads HF PEFT's model class for the task adds to ``modules_to_save`` when it
    loads the adapter (a sequence classifier's ``classifier``/``score``, ...), which its loader then needs in the file.

    A head the adapter leaves to the base model (explicit ``modules_to_save`` without it) is written with the base
    head's weights, so HF PEFT's copy computes what the base head does; a head adapted by some method is left as is.
    """
    listed = list(config.get("modules_to_save") or [])
    missing = [h for h in TASK_HEADS.get(config.get("task_type") or "", ()) if h not in listed]
    if not missing or "modules_to_save" not in config:  # a config without the field gets no heads in HF PEFT
        return config, state
    root = getattr(_config(model, name), "key_prefix", PREFIX)
    state = dict(state)
    for qualname, _ in iter_modules(model):
        head = next((h for h in missing if qualname == h or qualname.endswith("." + h)), None)
        module = model.get_submodule(qualname) if head is not None else None
        if isinstance(module, ModulesToSave):  # another adapter's copy: this one computes with the base head
            module = module.base_layer
        if head is None or module is None or isinstance(module, AdapterLayer):
            continue
        state.update({f"{root}{qualname}.{key}": value for key, value in module.state_dict().items()})
        listed += [head] if head not in listed else []
    return {**config, "modules_to_save": listed or None}, state


def _stage(files: contextlib.ExitStack, directory: Path, config: dict[str, Any],
           state: dict[str, torch.Tensor]) -> list[Path]:
    """Write an adapter's files to temporary files in ``directory``, each replacing its old version when ``files``
    closes (``adapter_config.json`` last; none if the block raises); returns the stale files to remove then."""
    directory.mkdir(parents=True, exist_ok=True)
    # safetensors refuses tensors that share storage (performant LoRA's one A across q/k/v): copy only those.
    tensors: dict[str, torch.Tensor] = {}
    storages: set[tuple[torch.device, int]] = set()
    for key, value in state.items():
        tensor = value.detach().to("cpu").contiguous()
        storage = (tensor.device, tensor.untyped_storage().data_ptr())
        if storage in storages:
            tensor = tensor.clone()
        else:
            storages.add(storage)
        tensors[key] = tensor
    config = dict(config)
    ours = config.pop("peftkit", None)  # HF PEFT warns about keys it does not know: they get a file of their own
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    # Entered first, so replaced last: the config is what makes the directory an adapter.
    files.enter_context(atomic_path(directory / CONFIG_NAME)).write_text(text, encoding="utf-8")
    if ours:
        # Bound to this adapter_config.json: HF PEFT saving another adapter here later leaves this file behind.
        side = {"adapter_config_sha256": hashlib.sha256(text.encode()).hexdigest(), "settings": ours}
        files.enter_context(atomic_path(directory / PEFTKIT_NAME)).write_text(
            json.dumps(side, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    save_file(tensors, str(files.enter_context(atomic_path(directory / WEIGHTS_NAME))), metadata={"format": "pt"})
    return [] if ours else [directory / PEFTKIT_NAME]  # from an earlier save of another adapter


def read_config(directory: str | Path) -> dict[str, Any]:
    """The parsed ``adapter_config.json`` of ``directory``.

    Raises:
        CheckpointError: the file is missing or is not a JSON object with a ``peft_type``.
    """
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        # Adapters not called "default" are saved in subdirectories named after them (HF PEFT's layout too).
        named = sorted(p.parent.name for p in Path(directory).glob(f"*/{CONFIG_NAME}"))
        if named:
            listed = ", ".join(repr(n) for n in named)
            raise CheckpointError(
                f"no {CONFIG_NAME} in {str(directory)!r}, but its subdirectories {listed} hold adapters; load one "
                f"with pk.load_adapter(model, {str(Path(directory) / named[0])!r}, name={named[0]!r})"
            )
        raise CheckpointError(
            f"no {CONFIG_NAME} in {str(directory)!r}; point to a directory written by pk.save_adapter or "
            "HF PEFT's save_pretrained"
        )
    raw = path.read_bytes()
    data = _json_object(path, raw)
    if "peft_type" not in data:
        raise CheckpointError(f"{str(path)!r} has no 'peft_type' field; it is not a PEFT adapter config")
    ours = Path(directory) / PEFTKIT_NAME
    if ours.is_file() and "peftkit" not in data:
        side = _json_object(ours, ours.read_bytes())
        settings = side.get("settings")
        if not isinstance(settings, dict) or not isinstance(side.get("adapter_config_sha256"), str):
            raise CheckpointError(f"{str(ours)!r} is not peftkit's settings file (no 'settings' object bound to an "
                                  f"{CONFIG_NAME}); delete it to load the adapter without peftkit's own settings")
        if side["adapter_config_sha256"] == hashlib.sha256(raw).hexdigest():
            data["peftkit"] = settings
        else:
            logger.warning("ignoring %s: it was written with another %s (another library saved this adapter "
                           "over a peftkit one); delete it", ours, CONFIG_NAME)
    return data


def _json_object(path: Path, raw: bytes) -> dict[str, Any]:
    """The JSON object in file ``path`` (contents ``raw``).

    Raises:
        CheckpointError: the file is not valid JSON, or holds something other than an object.
    """
    try:
        data = json.loads(raw.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{str(path)!r} is not valid JSON ({exc}); the file is corrupt or truncated") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{str(path)!r} holds a JSON {type(data).__name__}, not an object; the file is corrupt")
    return data


def read_weights(directory: str | Path, legacy_bin: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of ``adapter_model.safetensors`` in ``directory``.

    ``adapter_model.bin`` (a pickle) is read only when ``legacy_bin=True``, and then with
    ``torch.load(weights_only=True)``.

    Raises:
        CheckpointError: the file is missing, truncated or corrupt.
    """
    path = Path(directory) / WEIGHTS_NAME
    legacy = Path(directory) / LEGACY_WEIGHTS_NAME
    if path.is_file():
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(
                f"{str(path)!r} could not be read ({exc}); the file is truncated or corrupt, save the adapter again"
            ) from exc
    if legacy.is_file():
        if not legacy_bin:
            raise CheckpointError(
                f"{str(directory)!r} holds only the legacy pickle {LEGACY_WEIGHTS_NAME}; peftkit does not unpickle "
                "files by default. Pass legacy_bin=True to read it with torch.load(weights_only=True)."
            )
        try:
            loaded = torch.load(legacy, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"{str(legacy)!r} could not be read ({exc})") from exc
        return dict(loaded)
    raise CheckpointError(f"no {WEIGHTS_NAME} in {str(directory)!r}; the adapter directory is incomplete")


def config_from_dict(data: dict[str, Any], model: nn.Module) -> AdapterConfig:
    """The method config described by an ``adapter_config.json`` dict, resolved against ``model``.

    Raises:
        ConfigError: the ``peft_type`` is unknown.
    """
    peft_type = data.get("peft_type")
    if peft_type not in METHODS:
        raise ConfigError(
            f"unknown peft_type {peft_type!r} in {CONFIG_NAME}; peftkit reads {sorted(METHODS)}"
        )
    cls = METHODS[peft_type]
    names = module_names(model)
    # Targets are resolved against the names the model has once the config reshapes it (LoRA's layer_replication).
    planned = getattr(cls, "planned_module_names", None)
    return cls.from_hf_dict(data, planned(data, model, names) if planned is not None else names)


def load_adapter(
    model: nn.Module,
    directory: str | Path,
    name: str = "default",
    *,
    activate: bool | None = None,
    trainable: bool = False,
    legacy_bin: bool = False,
) -> nn.Module:
    """Add the adapter saved in ``directory`` (by peftkit or HF PEFT) to ``model`` as ``name``.

    The files are read and validated before the model changes; if the tensors do not fit the model
    (missing or unexpected keys, wrong shapes) the new adapter is removed again and the model is as before.

    Args:
        model: the base model (possibly holding other adapters).
        directory: a directory with ``adapter_config.json`` and ``adapter_model.safetensors``.
        name: the name the adapter gets on this model.
        activate: make it the active adapter (default: only if no adapter is active yet).
        trainable: keep the loaded adapter's parameters trainable (default: frozen, for inference).
        legacy_bin: allow reading a legacy ``adapter_model.bin`` with ``torch.load(weights_only=True)``.

    Returns:
        ``model`` itself.

    Raises:
        CheckpointError: missing/corrupt files, missing or unexpected keys.
        ShapeMismatchError: a tensor does not fit (the key and both shapes are named).
        ConfigError: an unknown ``peft_type`` or an invalid config.
    """
    data = read_config(directory)
    weights = read_weights(directory, legacy_bin=legacy_bin)
    config = config_from_dict(data, model)
    at_directory = getattr(config, "at_directory", None)  # files the config names relative to its directory
    if at_directory is not None:
        config = at_directory(Path(directory))
    grad_flags = [(p, p.requires_grad) for p in model.parameters()]
    with prepared(model, config):  # a model reshaped for this adapter (layer_replication) is put back on failure
        apply(model, config, name=name, activate=activate, train_heads=False)  # the file lists what it saved
        try:
            _load_tensors(model, name, weights, str(directory))
        except Exception:
            delete_adapter(model, name)
            for param, flag in grad_flags:
                param.requires_grad_(flag)
            raise
    if not trainable:
        for tensor in adapter_state_dict(model, name).values():
            if isinstance(tensor, nn.Parameter):
                tensor.requires_grad_(False)
    return model


def _load_tensors(model: nn.Module, name: str, weights: dict[str, torch.Tensor], where: str) -> None:
    decode = getattr(_config(model, name), "tensors_from_file", None)  # the inverse of the method's file_tensors
    if decode is not None:
        weights = decode(weights)
    fill = getattr(_config(model, name), "fill_missing", None)  # tensors HF PEFT leaves out of its files
    if fill is not None:
        weights = fill(model, name, weights)
    own = adapter_state_dict(model, name)
    base_embeddings = _saved_base_embeddings(model, weights, own)
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own) - set(base_embeddings))
    if missing or unexpected:
        parts = [_key_list(label, keys) for label, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
        raise CheckpointError(
            f"the adapter in {where!r} does not fit this model: {'; '.join(parts)}. Was it saved for a different "
            "model or with different target_modules?"
        )
    targets = {**own, **base_embeddings}
    for key, value in weights.items():
        if targets[key].shape != value.shape:
            raise ShapeMismatchError(
                f"{key}: the file holds shape {tuple(value.shape)} but the model needs {tuple(targets[key].shape)}; "
                "the adapter was made for a different model shape or rank"
            )
    with torch.no_grad():
        for key, value in weights.items():
            targets[key].copy_(value.to(dtype=targets[key].dtype, device=targets[key].device))


def _key_list(label: str, keys: list[str]) -> str:
    return f"{label} keys {keys[:5]}{' …' if len(keys) > 5 else ''} ({len(keys)} in all)"


def _saved_base_embeddings(
    model: nn.Module, weights: dict[str, torch.Tensor], own: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Base weights HF PEFT saves beside an adapter on the input or output embedding (``save_embedding_layers``,
    on by default when ``embed_tokens`` or ``lm_head`` is a target): ``embed_tokens.base_layer.weight``,
    ``lm_head.base_layer.weight``."""
    heads = [getattr(model, attr)() for attr in ("get_input_embeddings", "get_output_embeddings")
             if callable(getattr(model, attr, None))]
    found: dict[str, torch.Tensor] = {}
    for qualname, layer in adapter_layers(model):
        key = f"{PREFIX}{qualname}.base_layer.weight"
        embedding = isinstance(layer.base_layer, nn.Embedding) or any(h in (layer, layer.base_layer) for h in heads)
        if key in weights and key not in own and embedding:
            found[key] = cast(torch.Tensor, layer.base_layer.weight)
    return found


def _config(model: nn.Module, name: str) -> AdapterConfig:
    configs = get_state(model).configs
    if name not in configs:
        raise AdapterNotFoundError(
            f"no adapter named {name!r} on this model; its adapters are {sorted(configs) or 'none'}"
        )
    return configs[name]
