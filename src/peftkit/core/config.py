"""The base of every method config: which modules to adapt, and how to describe the adapter on disk."""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from torch import nn

from peftkit.core.matching import DEFAULT_LAYER_CONTAINERS, resolve_targets
from peftkit.errors import ConfigError, UnknownFieldError

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self from Python 3.11 on


def _as_list(value: str | Sequence[str] | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


_TASK_TYPES = (
    ("ForCausalLM", "CAUSAL_LM"),
    ("LMHeadModel", "CAUSAL_LM"),  # GPT2LMHeadModel, GPTJ..., CodeGen...
    ("ForConditionalGeneration", "SEQ_2_SEQ_LM"),
    ("ForSeq2SeqLM", "SEQ_2_SEQ_LM"),
    ("ForSequenceClassification", "SEQ_CLS"),
    ("ForTokenClassification", "TOKEN_CLS"),
    ("ForQuestionAnswering", "QUESTION_ANS"),
)


def infer_task_type(model: nn.Module) -> str | None:
    """HF PEFT's ``task_type`` for a ``transformers`` model class, or ``None``."""
    cls = type(model).__name__
    return next((task for suffix, task in _TASK_TYPES if cls.endswith(suffix)), None)


#: HF PEFT's names for peftkit's config fields → (the field that must exist, what to use instead), for users
#: writing HF PEFT's spelling.
_HF_NAMES = {"r": ("rank", "rank"), "lora_alpha": ("alpha", "alpha"), "lora_dropout": ("dropout", "dropout"),
             "layers_to_transform": ("layers", "layers"), "init_r": ("init_rank", "init_rank"),
             "target_r": ("target_rank", "target_rank"),
             "init_lora_weights": ("init", "init='pissa' | 'pissa_niter_<N>' | 'olora' | 'orthogonal' | 'eva' | "
                                           "'corda', or init_A and init_B ('kaiming', 'xavier', 'gaussian', 'zero')"),
             "use_dora": ("shared_A", "pk.DoRA(...) instead of pk.LoRA(...)")}


def _unknown_fields(config: str, unknown: list[str], fields: list[str]) -> str:
    hints = []
    for name in unknown:
        needed, ours = _HF_NAMES.get(name, ("", ""))
        close = difflib.get_close_matches(name, fields, n=1)
        if needed in fields:
            hints.append(f"{name!r} is HF PEFT's name: use {ours}")
        elif close:
            hints.append(f"{name!r}: did you mean {close[0]!r}?")
        else:
            hints.append(f"{name!r} is not a field")
    return f"pk.{config} got unknown fields ({'; '.join(hints)}); its fields are {', '.join(fields)}"


@dataclass(kw_only=True)  # fields every method shares go by name; a method's own come first
class AdapterConfig:
    """Fields shared by every method.

    A method that wraps layers implements ``supports``, ``supported_layer_names`` and ``transform``.
    A method that adds modules instead (prompt tuning, ...) defines ``inject(model, name) -> list[str]``
    and ``remove(model, name)``; ``after_apply(model, name)`` and ``on_set_active(model, name, active)``
    are optional hooks for either kind, as are ``prepare_model(model)`` (reshape the model before targets are
    resolved; return what undoes it, or ``None``), the class method ``planned_module_names(data, model, names)`` (the
    names an ``adapter_config.json`` is resolved against, once so reshaped) and ``check_merge(model, name)`` (raise
    ``MergeError`` to refuse ``pk.merge``). A wrapping method may also define ``inject_parameters(model, name)``, run
    after the targets are wrapped (LoRA's ``target_parameters``).

    Attributes:
        target_modules: patterns selecting the modules to adapt: leaf names (``"q_proj"``), globs on
            qualified names (``"*.layers.0.*.q_proj"``) or aliases (``"all-linear"``, role names).
        exclude_modules: patterns removed from the selection afterwards.
        layers: keep only modules inside these transformer-block indices (``None``: all blocks).
        layers_pattern: names of the containers whose numbered children are the blocks.
        modules_to_save: modules trained in full (a copy per adapter) and saved with the adapter, such
            as a classification head. When empty on a sequence or token classifier (``task_type="SEQ_CLS"`` or
            ``"TOKEN_CLS"``, or a ``*ForSequenceClassification``/``*ForTokenClassification`` model) ``pk.apply`` adds
            its head, ``classifier`` or ``score`` (whichever exists), and on a question-answering model
            (``"QUESTION_ANS"``) ``qa_outputs``, as Hugging Face PEFT does. For such a task the head is never adapted:
            a target in it is trained in full instead (added to ``modules_to_save``), as in Hugging Face PEFT.
        task_type: Hugging Face PEFT's task type (``"CAUSAL_LM"``, ``"SEQ_CLS"``, ...), written to
            ``adapter_config.json``; inferred from the model class when ``None``.
    """

    peft_type: ClassVar[str] = ""
    #: Whether ``pk.apply`` trains a sequence classifier's head in full when ``modules_to_save`` is empty, as HF
    #: PEFT does for this method.
    adds_heads: ClassVar[bool] = True

    def __new__(cls, *args: Any, **kwargs: Any) -> Self:
        # Checked before the generated __init__, whose TypeError would not say which name was meant.
        fields = [f.name for f in dataclasses.fields(cls) if f.init]
        unknown = [k for k in kwargs if k not in fields]
        if unknown:
            raise UnknownFieldError(_unknown_fields(cls.__name__, unknown, fields))
        return super().__new__(cls)

    target_modules: str | Sequence[str] = ()
    exclude_modules: str | Sequence[str] = ()
    layers: Sequence[int] | None = None
    layers_pattern: str | Sequence[str] = DEFAULT_LAYER_CONTAINERS
    modules_to_save: str | Sequence[str] = ()
    task_type: str | None = None
    #: Free-form extra fields read from an ``adapter_config.json`` and written back unchanged.
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.target_modules = _as_list(self.target_modules)
        self.exclude_modules = _as_list(self.exclude_modules)
        self.modules_to_save = _as_list(self.modules_to_save)
        self.layers_pattern = _as_list(self.layers_pattern)
        if self.layers is not None:
            if isinstance(self.layers, int):
                self.layers = [self.layers]
            bad = [i for i in self.layers if not isinstance(i, int) or i < 0]
            if bad:
                raise ConfigError(f"layers={list(self.layers)!r} must be non-negative integers; got {bad}")
            self.layers = list(self.layers)

    # -- what the method adapts -------------------------------------------------------------------
    def for_model(self, model: nn.Module) -> AdapterConfig:
        """This config as applied to ``model``: a copy with the defaults it takes from the model filled in
        (LoRA's, AdaLoRA's and IA3's ``target_modules`` per architecture when omitted), else ``self``.

        Raises:
            ConfigError: a default is needed that ``model``'s architecture has none of.
        """
        return self

    def supports(self, module: nn.Module) -> bool:
        """True if this method can wrap ``module``."""
        raise NotImplementedError

    def supported_layer_names(self) -> list[str]:
        """Names of the layer types this method can wrap, for error messages."""
        raise NotImplementedError

    def resolve(self, model: nn.Module) -> list[str]:
        """Qualified names of the modules this config adapts on ``model`` (see ``resolve_targets``)."""
        if not self.target_modules:
            raise ConfigError(
                f"{type(self).__name__}.target_modules is empty; name the modules of {type(model).__name__} to "
                "adapt (target_modules=[...] or 'all-linear')"
            )
        return resolve_targets(
            model,
            list(self.target_modules),
            supported=self.supports,
            supported_names=self.supported_layer_names(),
            exclude=list(self.exclude_modules),
            layers=self.layers,
            layer_containers=list(self.layers_pattern),
        )

    def transform(self, module: nn.Module, qualname: str, adapter_name: str) -> nn.Module:
        """Return ``module`` adapted with a new adapter called ``adapter_name``.

        ``module`` is either the plain base layer (return a new wrapper) or an adapter layer of this
        method already wrapping it (add the adapter to it and return it).
        """
        raise NotImplementedError

    # -- the file format --------------------------------------------------------------------------
    def to_hf_dict(self, targets: list[str], module_names: list[str]) -> dict[str, Any]:
        """This config as Hugging Face PEFT's ``adapter_config.json``.

        Args:
            targets: the qualified names this adapter was applied to.
            module_names: every module name of the (unwrapped) model, to write targets HF PEFT matches exactly.
        """
        raise NotImplementedError

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any], module_names: list[str]) -> AdapterConfig:
        """Build a config from ``adapter_config.json``; ``module_names`` resolves regex targets."""
        raise NotImplementedError

    def replace(self, **changes: Any) -> AdapterConfig:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)
