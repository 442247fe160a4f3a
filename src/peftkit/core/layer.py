"""The adapter layer: a frozen base layer held by composition, plus named adapters of one method.

Each adapter's tensors live in per-adapter containers (``nn.ModuleDict`` / ``nn.ParameterDict``) keyed
by adapter name, listed in ``adapter_containers``. That one list gives, generically: the adapter's
parameters, its state dict in Hugging Face PEFT's key layout (``lora_A.weight``, ``lora_embedding_A``,
``lora_magnitude_vector``), loading, and deletion. A method adds its math: ``forward``,
``delta_weight`` and, where it differs, ``merge``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, ClassVar, cast

import torch
from torch import nn

from peftkit.core.epoch import own, touch, watched
from peftkit.errors import MergeError, ShapeMismatchError

#: Attributes whose assignment or in-place change may change what ``forward`` runs (see peftkit.core.epoch).
#: Per-process forward caches kept in a layer's ``__dict__`` (lora_kernels), and a ``pk.mixed_batch`` block's row
#: routing (lora_mixed), left out of copies and pickles.
_CACHES = ("_plan", "_factor", "_mixed")
_WATCHED = frozenset({"active_adapters", "merged_adapters", "disabled", "scaling", "dropout_position", "base_layer"})


class AdapterLayer(nn.Module):
    """Base class of every adapter layer.

    Attributes:
        base_layer: the wrapped frozen layer. (The name matches Hugging Face PEFT's, so a wrapped
            model's full ``state_dict`` has the same keys in both libraries.)
        active_adapters: names of the adapters applied in ``forward``, summed in this order.
        merged_adapters: names of the adapters currently folded into the base weight.
        disabled: when true, ``forward`` is exactly the base layer's.
    """

    #: Attributes holding per-adapter tensors, keyed by adapter name (and HF's key prefix for them).
    adapter_containers: ClassVar[tuple[str, ...]] = ()
    #: Whether merging rewrites the base layer's own weight, so that a weight other modules share (an output head
    #: tied to the input embeddings) must not be merged into (``peftkit.merge``).
    folds_into_weight: ClassVar[bool] = False

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        own(self)  # registrations on this layer and below move peftkit.core.epoch's counter
        self.base_layer = base_layer
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _WATCHED:
            value = watched(value)  # lists and dicts report their mutations from now on
        super().__setattr__(name, value)

    def __getstate__(self) -> dict[str, Any]:
        # Forward caches (see peftkit.core.epoch) are per process: a copy or an unpickled model derives its own.
        state: dict[str, Any] = super().__getstate__()  # type: ignore[no-untyped-call]
        for key in _CACHES:
            state.pop(key, None)
        return state

    def _apply(self, fn: Any, recurse: bool = True) -> AdapterLayer:
        result: AdapterLayer = super()._apply(fn, recurse)  # type: ignore[no-untyped-call]
        touch()  # .to(), .half(), …: parameters may have been swapped
        return result

    # Model code sometimes reads a layer's weight directly (T5 checks ``self.wo.weight.dtype``).
    @property
    def weight(self) -> torch.Tensor:
        return cast(torch.Tensor, self.base_layer.weight)

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    # -- bookkeeping --------------------------------------------------------------------------------
    @property
    def adapter_names(self) -> list[str]:
        """Names of the adapters this layer holds."""
        names: list[str] = []
        for attr in self.adapter_containers:
            for key in getattr(self, attr):
                if key not in names:
                    names.append(key)
        return names

    def has_adapter(self, name: str) -> bool:
        return any(name in getattr(self, attr) for attr in self.adapter_containers)

    def _applied(self) -> list[str]:
        """Active adapters that ``forward`` must add (those not merged into the weight)."""
        if self.disabled:
            return []
        return [n for n in self.active_adapters if n not in self.merged_adapters and self.has_adapter(n)]

    def set_active(self, names: Sequence[str]) -> None:
        """Activate ``names`` (those this layer holds) and make exactly their parameters trainable."""
        self.active_adapters = [n for n in names if self.has_adapter(n)]
        for name in self.adapter_names:
            for p in self.adapter_parameters(name):
                p.requires_grad_(name in self.active_adapters)

    def adapter_parameters(self, name: str) -> Iterator[nn.Parameter]:
        """The trainable tensors of adapter ``name``."""
        for attr in self.adapter_containers:
            container = getattr(self, attr)
            if name in container:
                item = container[name]
                if isinstance(item, nn.Parameter):
                    yield item
                else:
                    yield from item.parameters()

    def delete_adapter(self, name: str) -> None:
        """Remove adapter ``name`` (unmerging it first if it is merged)."""
        if name in self.merged_adapters:
            self.unmerge([name])
        for attr in self.adapter_containers:
            container = getattr(self, attr)
            if name in container:
                del container[name]
        self.active_adapters = [n for n in self.active_adapters if n != name]

    # -- state dicts in Hugging Face PEFT's layout -------------------------------------------------
    def adapter_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """Adapter ``name``'s live tensors under HF PEFT's local keys (``lora_A.weight``, ``lora_embedding_A``)."""
        out: dict[str, torch.Tensor] = {}
        for attr in self.adapter_containers:
            container = getattr(self, attr)
            if name not in container:
                continue
            item = container[name]
            if isinstance(item, nn.Parameter):
                out[attr] = item
            else:
                for key, value in item.state_dict(keep_vars=True).items():
                    out[f"{attr}.{key}"] = value
        return out

    def adapter_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        """Adapter ``name``'s tensors (detached) under HF PEFT's local keys."""
        return {k: v.detach() for k, v in self.adapter_tensors(name).items()}

    def load_adapter_state_dict(self, name: str, state: dict[str, torch.Tensor], where: str = "") -> None:
        """Copy ``state`` (keys as from ``adapter_state_dict``) into adapter ``name``.

        All shapes are checked before anything is copied.

        Raises:
            ShapeMismatchError: a tensor's shape differs from the adapter's (key and both shapes named).
        """
        own = self.adapter_tensors(name)
        for key, value in state.items():
            if own[key].shape != value.shape:
                raise ShapeMismatchError(
                    f"{where}{key}: the file holds shape {tuple(value.shape)} but the model needs "
                    f"{tuple(own[key].shape)}; the adapter was made for a different model shape or rank"
                )
        with torch.no_grad():
            for key, value in state.items():
                own[key].copy_(value.to(own[key].dtype))

    def describe(self, qualname: str) -> tuple[str, str, tuple[int, ...]]:
        """``(what is adapted, its type, its weight's shape)`` for reports, this layer being at ``qualname``."""
        weight = getattr(self.base_layer, "weight", None)
        return qualname, type(self.base_layer).__name__, tuple(weight.shape) if weight is not None else ()

    # -- merging ------------------------------------------------------------------------------------
    def delta_weight(self, name: str) -> torch.Tensor:
        """The change adapter ``name`` makes to the base weight, in the base weight's orientation."""
        raise MergeError(f"{type(self).__name__} adapters cannot be folded into a weight")

    def check_active(self, names: Sequence[str], where: str = "") -> None:
        """Raise ``AdapterStateError`` if adapters ``names`` (those of them this layer holds) cannot be active
        together here (``where``: this layer's name, for the message). ``set_adapter`` calls it for every layer
        before anything changes."""

    def check_merge(self, names: Sequence[str], where: str = "") -> None:
        """Raise ``MergeError`` if merging adapters ``names`` must fail (``where``: this layer's name, for the
        message), before anything is changed. ``merge`` calls it for every layer first."""

    def merge(self, names: Sequence[str], safe: bool = False, where: str = "") -> None:
        """Fold adapters ``names`` into the base weight. Subclasses define how."""
        raise MergeError(f"{type(self).__name__} adapters cannot be folded into a weight")

    def unmerge(self, names: Sequence[str] | None = None) -> None:
        """Take merged adapters (default: all, last merged first) out of the base weight again."""
        raise MergeError(f"{type(self).__name__} adapters cannot be folded into a weight")

    def parameters_finite(self, name: str) -> bool:
        """Whether adapter ``name``'s parameters hold no NaN or Inf (``pk.merge(safe=True)`` refuses it otherwise)."""
        return all(bool(torch.isfinite(p).all()) for p in self.adapter_parameters(name))

    @staticmethod
    def check_finite(delta: torch.Tensor, where: str, name: str) -> None:
        if not torch.isfinite(delta).all():
            raise MergeError(
                f"adapter {name!r} at {where} has NaN or Inf in its delta weight; merging would corrupt the "
                "base weight. Inspect or retrain the adapter, or delete it with pk.delete_adapter."
            )
