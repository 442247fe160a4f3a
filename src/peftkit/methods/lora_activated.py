"""Activated LoRA (aLoRA): the adapter acts only from the last occurrence of an invocation token sequence on.

Paper: Greenewald et al., "Activated LoRA: Fine-tuned LLMs for Intrinsics", 2025 (https://arxiv.org/abs/2504.12397).

For sample i whose tokens contain the invocation sequence, its last occurrence starting at position tᵢ::

    y_t = W₀x_t + [t ≥ tᵢ] · s·B A dropout(x_t)        (no update at any position where the sequence is absent)

Every position before the invocation computes exactly what the base model computes, so the base model's KV
cache of a conversation can be reused and the adapter only runs over the turn it is invoked for. As in Hugging
Face PEFT 0.21 (``LoraConfig(alora_invocation_tokens=[...])``): linear-like layers only, no DoRA, no
``target_parameters``, never merged (a merged weight would act on every token).

How it is wired, without a wrapper model: the adapter's B is an :class:`ActivatedLinear`, an ``nn.Linear`` with the
same tensors and keys whose output is zero where the update does not apply (the fast LoRA paths skip a B that is not
a plain ``nn.Linear``, so ordinary adapters keep theirs). A forward pre-hook on the model finds each sample's
invocation in the call's ``input_ids`` and leaves one boolean mask (batch × tokens) per invocation sequence in a
per-thread context that the B's read; a forward hook takes it away again. Masks line up with the *end* of a layer's
token axis, as HF PEFT's offsets count from the end, so a layer that sees only the last positions (``lm_head`` under
``logits_to_keep``) gets the last columns.

Decoding with a KV cache (``generate()``): each call only holds the new tokens, so the hook remembers, per cache
object, where each sample's invocation started and its last few tokens (an invocation may straddle two calls); a call
continuing that cache switches the update on from the remembered start, and a later occurrence moves it. This is
HF PEFT's result for ``generate()`` with a cache (its offsets are taken from the prompt once); it also makes
``generate(use_cache=False)`` and hand-written decoding loops agree with it, where HF PEFT differs (it shifts its
window as the sequence grows, or finds no invocation in a one-token call). Unlike HF PEFT's ``generate()``, an
invocation the model generates itself switches the update on too. Each activated adapter has its own mask, so several
may be active together (HF PEFT finds the active adapter's invocation only).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import operator
import threading
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from peftkit.errors import ConfigError, MergeError, UnsupportedLayerError

if TYPE_CHECKING:
    from peftkit.methods.lora import LoRA

__all__ = ["ActivatedLinear", "activate", "attach", "check_config", "check_merge", "check_targets", "checked_tokens",
           "detach", "invocation_starts", "token_masks"]

logger = logging.getLogger("peftkit")

Tokens = tuple[int, ...]
_ATTR = "_peftkit_alora"
_NEVER = 2**62  # the start of an invocation that is absent: no position reaches it


# -- the config ---------------------------------------------------------------------------------------------------
def checked_tokens(value: Any) -> list[int] | None:
    """``alora_invocation_tokens`` as a list of token ids, or ``None``.

    Raises:
        ConfigError: not a non-empty sequence of non-negative integers.
    """
    if value is None:
        return None
    try:
        tokens = [operator.index(t) for t in value]
        bad = isinstance(value, (str, bytes)) or not tokens or min(tokens) < 0 or any(type(t) is bool for t in value)
    except TypeError:  # not a sequence of integers
        bad = True
    if bad:
        raise ConfigError(
            f"alora_invocation_tokens={value!r} must be a non-empty list of token ids, e.g. "
            "tokenizer.encode('<|start_of_role|>assistant', add_special_tokens=False); or None for plain LoRA"
        )
    return tokens


def check_config(config: LoRA) -> None:
    """Refuse what activated LoRA cannot be combined with (called by ``LoRA.__post_init__``).

    Raises:
        ConfigError: DoRA or CanonicalLoRA, ``target_parameters``, or an ``init`` that rewrites the base weight.
    """
    tokens = config.alora_invocation_tokens
    if not tokens:
        return
    from peftkit.methods.lora_init import changes_base

    kind = type(config).__name__
    if not config.takes_invocation_tokens:
        raise ConfigError(f"{kind} does not support alora_invocation_tokens={tokens} (activated LoRA; HF PEFT refuses "
                          "DoRA with it too): use pk.LoRA(alora_invocation_tokens=...)")
    if config.target_parameters:
        raise ConfigError(f"alora_invocation_tokens={tokens} cannot be used with target_parameters="
                          f"{config.target_parameters} (HF PEFT refuses it too): an update added to a weight acts on "
                          "every token. Adapt those parameters in a second adapter")
    if changes_base(config.init):
        raise ConfigError(f"init={config.init!r} rewrites each base weight, so the tokens before "
                          f"the invocation (alora_invocation_tokens={tokens}) would no longer see the base model; use "
                          "init=None or 'orthogonal'")


def check_targets(config: LoRA, model: nn.Module, targets: list[str]) -> None:
    """Refuse targets that are not linear-like (embeddings, convolutions), before the model is touched.

    Raises:
        UnsupportedLayerError: naming the target and the way out.
    """
    if not config.alora_invocation_tokens:
        return
    from peftkit.methods.lora_layers import LoRALayer, LoRALinear, lora_layer_class

    for qualname in targets:
        module = model.get_submodule(qualname)
        base = module.base_layer if isinstance(module, LoRALayer) else module
        cls = lora_layer_class(base)
        if cls is None or not issubclass(cls, LoRALinear):
            raise UnsupportedLayerError(
                f"activated LoRA (alora_invocation_tokens) adapts linear-like layers only (HF PEFT refuses the others "
                f"too); {qualname!r} is a {type(base).__name__}. Leave it out with exclude_modules=[{qualname!r}]"
            )


def check_merge(config: LoRA, name: str) -> None:
    """Refuse merging an activated LoRA adapter (``pk.merge``/``pk.unload(merge=True)``), before any weight changes.

    Raises:
        MergeError: the adapter has invocation tokens.
    """
    if config.alora_invocation_tokens:
        raise MergeError(
            f"adapter {name!r} is an activated LoRA adapter (alora_invocation_tokens={config.alora_invocation_tokens}):"
            " its update applies only from the invocation tokens on, and a merged weight would apply it to every "
            "token; nothing was merged. Keep it unmerged, or use pk.unload(model, merge=False)"
        )


# -- the layers ----------------------------------------------------------------------------------------------------
class ActivatedLinear(nn.Linear):
    """An activated LoRA adapter's B: ``B h`` (plus its bias) where the current call's mask is set, zero elsewhere.

    Holds the very tensors of the ``nn.Linear`` it replaces, under the same keys. Outside a model call (no mask) the
    output is zero everywhere, as in HF PEFT when it has no offsets.
    """

    def __init__(self, up: nn.Linear, tokens: Tokens) -> None:
        super().__init__(up.in_features, up.out_features, bias=False, device="meta")
        self.weight = up.weight
        self.bias = up.bias
        self.tokens = tokens

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out = F.linear(h, self.weight, self.bias)
        return out.masked_fill(~_layer_mask(self.tokens, out), 0)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, invocation_tokens={list(self.tokens)}"


def activate(layer: nn.Module, name: str, tokens: list[int]) -> None:
    """Make adapter ``name`` of the LoRA layer ``layer`` an activated one: its B becomes an :class:`ActivatedLinear`."""
    ups: nn.ModuleDict = layer.lora_B  # type: ignore[assignment]
    ups[name] = ActivatedLinear(ups[name], tuple(tokens))  # type: ignore[arg-type]


# -- finding the invocation ----------------------------------------------------------------------------------------
def invocation_starts(input_ids: torch.Tensor, tokens: Tokens | torch.Tensor) -> torch.Tensor:
    """Where the last occurrence of ``tokens`` starts in each row of ``input_ids`` (batch × length), -1 where absent."""
    pattern = torch.as_tensor(tokens, dtype=input_ids.dtype, device=input_ids.device)
    batch, length = input_ids.shape
    n = pattern.numel()
    if length < n:
        return input_ids.new_full((batch,), -1)
    hits = (input_ids.unfold(1, n, 1) == pattern).all(-1)  # (batch, length - n + 1): an occurrence starts here
    starts = torch.arange(length - n + 1, device=input_ids.device)
    return torch.where(hits, starts, -1).amax(1)


@dataclass
class _Seen:
    """What one KV cache holds of a sequence, per invocation: each sample's start (absolute position, or _NEVER), its
    last ``len(tokens) − 1`` tokens, and the cache length after that call."""

    start: torch.Tensor
    tail: torch.Tensor
    end: int


#: KV cache object → invocation → what it holds (forgotten with the cache).
_SEEN: weakref.WeakKeyDictionary[Any, dict[Tokens, _Seen]] = weakref.WeakKeyDictionary()


def _advance(prev: _Seen | None, input_ids: torch.Tensor, tokens: Tokens, past: int) -> _Seen:
    """The record after a call whose ``input_ids`` follow ``past`` cached positions (``prev``: the record of those)."""
    seq, offset = input_ids, past
    start = input_ids.new_full((input_ids.shape[0],), _NEVER)
    if prev is not None:
        seq, offset, start = torch.cat([prev.tail, input_ids], 1), past - prev.tail.shape[1], prev.start
    found = invocation_starts(seq, tokens)
    start = torch.where(found >= 0, found + offset, start)
    return _Seen(start, seq[:, seq.shape[1] - min(seq.shape[1], len(tokens) - 1):], past + input_ids.shape[1])


def token_masks(input_ids: torch.Tensor, invocations: list[Tokens], cache: Any = None) -> dict[Tokens, torch.Tensor]:
    """For each invocation, the (batch × tokens) mask of the positions of this call that the adapter updates.

    Args:
        input_ids: the call's token ids (batch × tokens).
        invocations: the invocation sequences of the model's activated adapters.
        cache: the call's KV cache, if any; what earlier calls on it saw is used, and this call's is kept.
    """
    past = _cache_length(cache)
    known: dict[Tokens, _Seen] = {}
    if past > 0:
        with contextlib.suppress(TypeError):  # a cache that takes no weak reference has no record
            known = _SEEN.get(cache, {})
    seen: dict[Tokens, _Seen] = {}
    masks = {}
    positions = past + torch.arange(input_ids.shape[1], device=input_ids.device)
    for tokens in invocations:
        prev = known.get(tokens)
        if prev is not None and (prev.end != past or prev.start.shape[0] != input_ids.shape[0]):
            prev = None  # the cache was cropped or reordered since: only this call's tokens count
        seen[tokens] = _advance(prev, input_ids, tokens, past)
        masks[tokens] = positions[None, :] >= seen[tokens].start[:, None]
    if cache is not None:  # (one that takes no weak reference, a legacy tuple: later calls search their own tokens)
        with contextlib.suppress(TypeError):
            _SEEN[cache] = seen
    return masks


def _cache_length(cache: Any) -> int:
    cache = getattr(cache, "self_attention_cache", cache)
    return int(cache.get_seq_length()) if hasattr(cache, "get_seq_length") else 0


# -- the per-call context -----------------------------------------------------------------------------------------
class _Calls(threading.local):
    """The masks of the model calls in progress (innermost last), and of the latest one, which activation
    checkpointing's recomputation during the backward pass uses (as in HF PEFT: one forward per backward)."""

    def __init__(self) -> None:
        self.stack: list[tuple[int, dict[Tokens, torch.Tensor]]] = []
        self.last: dict[Tokens, torch.Tensor] = {}


_CALLS = _Calls()
_graph_task_id: Any = getattr(torch._C, "_current_graph_task_id", None)


def _current(tokens: Tokens) -> torch.Tensor | None:
    if _CALLS.stack:
        return _CALLS.stack[-1][1].get(tokens)
    if _graph_task_id is not None and _graph_task_id() != -1:  # recomputed inside backward (checkpointing)
        return _CALLS.last.get(tokens)
    return None


def _layer_mask(tokens: Tokens, out: torch.Tensor) -> torch.Tensor:
    """The current call's mask for ``tokens`` shaped for a layer output (batch, [tokens,] features), aligned with the
    end of the token axis; all false outside a model call.

    Raises:
        UnsupportedLayerError: the layer's leading dimensions are not the call's batch (and tokens).
    """
    lead = out.shape[:-1]
    mask = _current(tokens)
    if mask is None:
        return out.new_zeros((*lead, 1), dtype=torch.bool)
    batch, length = mask.shape
    if len(lead) not in (1, 2) or lead[0] != batch:
        raise UnsupportedLayerError(
            f"an activated LoRA layer (invocation tokens {list(tokens)}) got an input of shape {tuple(lead)} × "
            f"features in a call of {batch} sequences of {length} tokens; activated LoRA needs layers that see the "
            "call's tokens as (batch, tokens, features). Leave this layer out with exclude_modules"
        )
    width = lead[1] if len(lead) == 2 else 1
    mask = mask[:, length - width:] if width <= length else F.pad(mask, (width - length, 0), value=False)
    return mask.reshape(*lead, 1).to(out.device, non_blocking=True)


# -- the model's hooks ---------------------------------------------------------------------------------------------
@dataclass
class _Hooked:
    """What :func:`attach` leaves on a model: its hooks, and each activated adapter's invocation."""

    handles: list[Any]
    invocations: dict[str, Tokens] = field(default_factory=dict)
    warned: bool = False


def _call_inputs(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any]:
    """The call's ``input_ids`` and KV cache (``cache``, or ``past_key_values`` in older ``transformers``)."""
    if len(args) > 1:
        names = list(inspect.signature(model.forward).parameters)
        kwargs = {**dict(zip(names, args, strict=False)), **kwargs}
    ids = kwargs.get("input_ids")
    if ids is None and len(args) == 1 and isinstance(args[0], torch.Tensor) and not args[0].is_floating_point():
        ids = args[0]
    cache = kwargs.get("cache")
    return ids, cache if cache is not None else kwargs.get("past_key_values")


def _before(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    hooked: _Hooked | None = model.__dict__.get(_ATTR)
    invocations = sorted(set(hooked.invocations.values())) if hooked is not None else []
    ids, cache = _call_inputs(model, args, kwargs)
    masks: dict[Tokens, torch.Tensor] = {}
    if ids is not None and invocations:
        masks = token_masks(ids if ids.dim() == 2 else ids.reshape(1, -1), invocations, cache)
    elif invocations and hooked is not None and not hooked.warned:
        hooked.warned = True  # HF PEFT warns too
        logger.warning("activated LoRA needs input_ids to find its invocation tokens; a call with inputs_embeds only "
                       "runs its activated adapters nowhere (as the base model)")
    _CALLS.stack.append((id(model), masks))
    _CALLS.last = masks


def _after(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
    if _CALLS.stack and _CALLS.stack[-1][0] == id(model):  # (not pushed if an earlier pre-hook raised)
        _CALLS.stack.pop()


def attach(model: nn.Module, name: str, config: LoRA) -> None:
    """Register activated adapter ``name`` (of ``config``) with the model's hooks, installing them on the first one."""
    from peftkit.core.config import infer_task_type

    task = config.task_type or infer_task_type(model)
    if task != "CAUSAL_LM":  # HF PEFT warns too; the masks work on any model called with input_ids
        logger.warning("activated LoRA is meant for causal language models (task_type='CAUSAL_LM'); adapter %r is "
                       "for %s", name, task or type(model).__name__)
    hooked: _Hooked | None = model.__dict__.get(_ATTR)
    if hooked is None:
        hooked = _Hooked([model.register_forward_pre_hook(_before, with_kwargs=True),
                          model.register_forward_hook(_after, with_kwargs=True, always_call=True)])
        model.__dict__[_ATTR] = hooked
    hooked.invocations[name] = tuple(config.alora_invocation_tokens or ())


def detach(model: nn.Module, name: str) -> None:
    """Forget adapter ``name``; the last activated adapter takes the hooks with it."""
    hooked: _Hooked | None = model.__dict__.get(_ATTR)
    if hooked is None:
        return
    hooked.invocations.pop(name, None)
    if not hooked.invocations:
        for handle in hooked.handles:
            handle.remove()
        del model.__dict__[_ATTR]
