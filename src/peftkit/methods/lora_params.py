"""LoRA on parameters rather than modules (HF PEFT's ``target_parameters``): mixture-of-experts weight stacks.

``transformers`` keeps a mixture-of-experts layer's experts as 3-D parameters that the module's own forward
indexes (Mixtral's ``experts.gate_up_proj``, shape (E, out, in)), not as ``nn.Linear`` modules, so no module
target reaches them. For such a parameter W the adapter holds one rank-r LoRA per expert, packed as HF PEFT
packs them: A is (E·r × in) with expert e's rows at e·r … e·r+r−1, B is (out × r·E) with expert e's columns at
e, E+e, 2E+e, …::

    W_e ↦ W_e + s · B_e A_e,      A_e = A[e·r:(e+1)·r],   B_e = B[:, e::E]

Modules that store (E, in, out) mark it with ``is_transposed = True`` and get the transposed update. A 2-D
parameter (out × in) is a single expert. The module's forward runs with ``W + ΔW`` in place of ``W``
(``torch.func.functional_call``), so whatever it does with the weight sees the adapted one, and gradients reach
A and B through it. Dropout cannot be applied (the input is not separable from the weight), as in HF PEFT.

One wrapper adapts one parameter. A module with several targeted parameters gets nested wrappers, the one for
the parameter registered first innermost: HF PEFT's nesting, hence its state-dict keys
(``experts.lora_A.weight`` for the outer, ``experts.base_layer.lora_A.weight`` for the inner).
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar, cast

import torch
from torch import nn

from peftkit.core.layer import AdapterLayer
from peftkit.core.matching import first_match, matches
from peftkit.core.walk import iter_modules, set_module
from peftkit.errors import ConfigError, TargetNotFoundError
from peftkit.methods.lora_layers import LoRALayer, adapter_dtype, init_factor

if TYPE_CHECKING:
    from peftkit.methods.lora import LoRA

__all__ = ["LoRAParameter", "check_config", "inject_parameters", "owner_of", "parameter_targets", "selected"]


def owner_of(module: nn.Module) -> nn.Module:
    """The module that holds the parameters: ``module`` itself, or the one inside its parameter wrappers."""
    while isinstance(module, LoRAParameter):
        module = module.base_layer
    return module


class LoRAParameter(LoRALayer):
    """LoRA on one parameter of the wrapped module (the formula and packing: see the module docstring).

    Attributes:
        parameter_name: the adapted parameter's name on the owning module.
        num_experts: E (1 for a 2-D parameter). in_features, out_features: each expert's input and output width.
    """

    adapter_containers: ClassVar[tuple[str, ...]] = ("lora_A", "lora_B")

    def __init__(self, base_layer: nn.Module, parameter_name: str) -> None:
        super().__init__(base_layer)
        self.parameter_name = parameter_name
        shape = self.parameter.shape
        if len(shape) == 3:
            transposed = bool(getattr(owner_of(base_layer), "is_transposed", False))
            self.num_experts = shape[0]
            self.in_features, self.out_features = (shape[1], shape[2]) if transposed else (shape[2], shape[1])
            self.transposed = transposed
        elif len(shape) == 2:
            self.num_experts, self.out_features, self.in_features, self.transposed = 1, shape[0], shape[1], False
        else:
            raise _not_adaptable(parameter_name, shape)
        self.lora_A: nn.ModuleDict = nn.ModuleDict()
        self.lora_B: nn.ModuleDict = nn.ModuleDict()

    @property
    def parameter(self) -> nn.Parameter:
        """The adapted base parameter."""
        return cast(nn.Parameter, getattr(owner_of(self.base_layer), self.parameter_name))

    @property
    def weight(self) -> torch.Tensor:
        return self.parameter

    def _path(self) -> str:
        """The parameter's name relative to ``base_layer``, through any inner wrappers."""
        path, module = self.parameter_name, self.base_layer
        while isinstance(module, LoRAParameter):
            path, module = f"base_layer.{path}", module.base_layer
        return path

    def add(self, name: str, rank: int, alpha: float, *, dropout: float = 0.0, use_rslora: bool = False,
            init_A: str = "kaiming", init_B: str = "zero", dropout_position: str = "pre",
            lora_bias: bool = False) -> None:
        if dropout or lora_bias:  # validated by the config; kept for direct callers
            raise ConfigError("LoRA on parameters (target_parameters) takes neither dropout nor lora_bias")
        weight = self.parameter
        factory: dict[str, Any] = {"device": weight.device, "dtype": adapter_dtype(weight)}
        self.lora_A[name] = nn.Linear(self.in_features, rank * self.num_experts, bias=False, **factory)
        self.lora_B[name] = nn.Linear(rank * self.num_experts, self.out_features, bias=False, **factory)
        A, B = self.factor_weights(name)
        init_factor(A, init_A, rank)
        init_factor(B, init_B, rank)
        self._add_common(name, rank, alpha, 0.0, use_rslora, dropout_position)

    def factor_weights(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Adapter ``name``'s packed A (E·r × in) and B (out × r·E) weights."""
        return cast(torch.Tensor, self.lora_A[name].weight), cast(torch.Tensor, self.lora_B[name].weight)

    def _experts(self, name: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B_e, A_e)`` stacked over experts: (E, out, r) and (E, r, in), in ``dtype``."""
        A, B = self.factor_weights(name)
        E = self.num_experts
        A3 = A.reshape(E, -1, self.in_features)
        B3 = B.reshape(self.out_features, -1, E).permute(2, 0, 1)
        return B3.to(dtype), A3.to(dtype)

    def _added(self, base: torch.Tensor, name: str, sign: float = 1.0) -> torch.Tensor:
        """``base ± s·ΔW`` for adapter ``name`` in one ``baddbmm`` (no separate delta tensor)."""
        B3, A3 = self._experts(name, base.dtype)
        alpha = sign * self.scaling[name]
        stacked = base if base.dim() == 3 else base.unsqueeze(0)
        if self.transposed:  # (E, in, out): (B_e A_e)ᵀ = A_eᵀ B_eᵀ
            out = torch.baddbmm(stacked, A3.transpose(1, 2), B3.transpose(1, 2), alpha=alpha)
        else:
            out = torch.baddbmm(stacked, B3, A3, alpha=alpha)
        return out.view_as(base)

    def delta_weight(self, name: str) -> torch.Tensor:
        weight = self.parameter
        return self._added(torch.zeros_like(weight, dtype=torch.promote_types(weight.dtype, torch.float32)), name)

    def _base_weight(self) -> torch.Tensor:
        return self.parameter

    def _set_base_weight(self, weight: torch.Tensor) -> float | None:
        with torch.no_grad():
            self.parameter.copy_(weight)
        return None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        names = self._applied()
        if not names:
            return self.base_layer(*args, **kwargs)
        weight: torch.Tensor = self.parameter
        for name in names:
            weight = self._added(weight, name)
        return torch.func.functional_call(self.base_layer, {self._path(): weight}, args, kwargs)

    def describe(self, qualname: str) -> tuple[str, str, tuple[int, ...]]:
        path = qualname
        while path.endswith(".base_layer"):  # an inner wrapper: named like the module the outer one replaced
            path = path.removesuffix(".base_layer")
        return f"{path}.{self.parameter_name}", "Parameter", tuple(self.parameter.shape)

    def extra_repr(self) -> str:
        return f"parameter_name={self.parameter_name!r}, num_experts={self.num_experts}"


def parameter_targets(model: nn.Module, patterns: Sequence[str]) -> list[str]:
    """The keys (``<module path>.<parameter name>``) of the parameters ``patterns`` select, in model order.

    A key matches a pattern as a module name does (the name, a dotted suffix such as ``experts.gate_up_proj``, or
    a glob such as ``*.layers.1.*.gate_up_proj``). As in HF PEFT, ``exclude_modules`` and layer indices do not
    apply to parameters. Parameters of other adapter layers (an adapted ``q_proj``'s weight) are not candidates.

    Raises:
        TargetNotFoundError: a pattern matches no parameter (the closest parameter keys are named).
    """
    params = {f"{path}.{p}": param for path, module in iter_modules(model)
              if path and (isinstance(module, LoRAParameter) or not isinstance(module, AdapterLayer))
              for p, param in owner_of(module).named_parameters(recurse=False)}
    keys = list(params)
    selected: set[str] = set()
    for pattern in patterns:
        hits = [k for k in keys if matches(k, pattern)]
        if not hits:
            raise TargetNotFoundError(
                f"target_parameters entry {pattern!r} matches no parameter of {type(model).__name__}; "
                f"{_closest(pattern, params)}. Entries name a parameter by its key or a dotted suffix of it, e.g. "
                "'experts.gate_up_proj'"
            )
        selected.update(hits)
    chosen = [k for k in keys if k in selected]
    flat = [k for k in chosen if params[k].dim() not in (2, 3)]
    if flat:
        raise _not_adaptable(flat[0], params[flat[0]].shape)
    return chosen


def _not_adaptable(name: str, shape: torch.Size) -> ConfigError:
    return ConfigError(f"target parameter {name!r} has shape {tuple(shape)}; LoRA adapts 2-D weights (out × in) and "
                       "3-D expert stacks (experts × out × in) only")


def _closest(pattern: str, params: dict[str, nn.Parameter]) -> str:
    """The adaptable parameters closest to ``pattern``, written as entries (``experts.gate_up_proj``, not a bare
    ``weight``, which would select every weight), expert stacks first; or that the model has no expert stacks."""
    entries: dict[str, int] = {}
    for key, param in params.items():
        path, _, name = key.rpartition(".")
        leaf = next((part for part in reversed(path.split(".")) if not part.isdigit()), "")
        if param.dim() in (2, 3):
            entries.setdefault(f"{leaf}.{name}" if leaf else name, param.dim())
    stacks = sorted(e for e, dim in entries.items() if dim == 3)
    close = difflib.get_close_matches(pattern, stacks + sorted(set(entries) - set(stacks)), n=5, cutoff=0.5)
    found = [f"closest parameters: {close}"] if close else [f"its expert stacks: {stacks[:5]}"] if stacks else []
    if not stacks:
        found.append("it has no 3-D expert stacks (adapt its linear layers with target_modules)")
    return "; ".join(found)


def inject_parameters(model: nn.Module, keys: Sequence[str], name: str, rank_alpha: Any, **options: Any) -> None:
    """Add adapter ``name`` on the parameters ``keys`` (from :func:`parameter_targets`), wrapping as HF PEFT does.

    Args:
        rank_alpha: ``key → (rank, alpha)``.
        options: passed to :meth:`LoRAParameter.add` (``use_rslora``, ``init_A``, ``init_B``).
    """
    for key in keys:
        path, _, parameter = key.rpartition(".")
        module = model.get_submodule(path)
        layer = module
        while isinstance(layer, LoRAParameter) and layer.parameter_name != parameter:
            layer = layer.base_layer
        if not isinstance(layer, LoRAParameter):  # a new outermost wrapper
            layer = LoRAParameter(module, parameter)
            set_module(model, path, layer)
        rank, alpha = rank_alpha(key)
        layer.add(name, rank, alpha, **options)


# -- the config's side: validation and selection (called by pk.LoRA) ---------------------------------------------
def check_config(config: LoRA) -> None:
    """Normalise ``config.target_parameters`` to a list and refuse what cannot go with it (``__post_init__``).

    Raises:
        ConfigError: entries that are not names, or ``init``, a LoRA variant, dropout or ``lora_bias`` with them.
    """
    spec = config.target_parameters
    config.target_parameters = [spec] if isinstance(spec, str) else list(spec or [])
    if not all(isinstance(t, str) and t for t in config.target_parameters):
        raise ConfigError(f"target_parameters={spec!r} must be a list of parameter names, e.g. "
                          "['experts.gate_up_proj', 'experts.down_proj']")
    if not config.target_parameters:
        return
    if config.init is not None:
        raise ConfigError(f"init={config.init!r} cannot initialise target_parameters={spec!r} (expert stacks are "
                          "initialised with init_A/init_B); put the parameters in an adapter with init=None")
    if not config.takes_parameters:
        raise ConfigError(f"{type(config).__name__} cannot adapt parameters (target_parameters={spec!r}; HF PEFT "
                          "refuses it too): use pk.LoRA for them")
    for name, value, fix in (("dropout", config.dropout, "dropout=0"), ("lora_bias", config.lora_bias,
                                                                        "lora_bias=False")):
        if value:
            raise ConfigError(
                f"{name}={value!r} cannot be used with target_parameters={spec!r}: the update of a parameter "
                f"is added to the weight, not computed from the input (HF PEFT refuses it too); set {fix}, or "
                "put the modules that need it in a second adapter"
            )


def selected(config: LoRA, model: nn.Module, module_targets: list[str], name: str = "") -> list[str]:
    """The keys of the parameters ``config.target_parameters`` selects on ``model``, checked against the module
    targets, ``modules_to_save`` and the model's adapters other than ``name`` (``[]`` without target_parameters).

    Raises:
        TargetNotFoundError: an entry matches no parameter. ConfigError: a selected parameter belongs to a
            module target or lies inside a ``modules_to_save`` module, or another adapter adapts a different set.
    """
    if not config.target_parameters:
        return []
    from peftkit.core.state import get_state

    keys = parameter_targets(model, config.target_parameters)
    both = sorted({k.rpartition(".")[0] for k in keys} & set(module_targets))
    if both:
        held = [k for k in keys if k.rpartition(".")[0] in both]
        raise ConfigError(
            f"{both[:3]} are module targets and hold target_parameters {held[:3]}; a layer is adapted as a "
            "module or through its parameters, so remove it from one"
        )
    for key in keys:  # a trained full copy of a module would hold the wrapper
        parts = key.split(".")[:-1]
        outer = next((".".join(parts[:i]) for i in range(1, len(parts) + 1)
                      if first_match(".".join(parts[:i]), config.modules_to_save) is not None), None)
        if outer is not None:
            raise ConfigError(
                f"target parameter {key!r} lies inside {outer!r}, which modules_to_save={config.modules_to_save} "
                "trains in full; a module is either trained in full or adapted, so remove it from one of the two"
            )
    for other, theirs_config in get_state(model).configs.items():
        theirs = getattr(theirs_config, "target_parameters", None)
        if other != name and theirs and set(theirs) != set(keys):
            raise ConfigError(
                f"adapter {other!r} adapts the parameters {sorted(theirs)[:3]}…; every adapter using "
                f"target_parameters must adapt the same ones (HF PEFT's rule: they share nested wrappers), but "
                f"this one selects {sorted(keys)[:3]}… ({len(keys)} against {len(theirs)})"
            )
    return keys
