"""CPT: context-aware prompt tuning, virtual tokens that start as given context and stay near it.

Paper: Blau, Kimhi, Elad, Bruckstein and Baskin, "Context-aware Prompt Tuning: Advancing In-Context Learning
with Adversarial Methods" (https://arxiv.org/abs/2410.17222). Hugging Face PEFT 0.21.2's ``CPT`` is the reference.

The m virtual tokens are the embeddings of given context tokens c (``cpt_token_ids``, e.g. a few solved
examples), a frozen table E₀ = E(c), plus a trained offset Δ kept inside a ball per token::

    P = E₀ + Π(Δ),    Π(Δ)ᵢ = Δᵢ · εᵢ / max(‖Δᵢ‖, εᵢ),    model(x) = f([P ; E(x)])

Each context token has a type tᵢ (``cpt_tokens_type_mask``): example k's input template, input, output template
and output are 4k+1, 4k+2, 4k+3, 4k+4. Templates get the radius ε_format·√(d/2048), inputs ε_input·√(d/2048);
outputs (t ≡ 0 mod 4) are not trained (their rows get no gradient). Each forward first replaces Δ by Π(Δ), so the
optimizer steps from inside the ball, and the gradient reaches Δ as if Π were the identity, as in HF PEFT.

With labels, the loss is HF PEFT's: the context's own tokens are labels too, at its output positions; the call's
tokens are typed by ``input_type_mask`` (default 4: every token is an output), shifted past the context's types,
and only output positions (t > 0, t ≡ 0 mod 4) are labels. With ``opt_weighted_loss_type="decay"`` the output
positions of the j-th last example are weighted by ``opt_loss_decay_factor``ʲ; the loss is the weighted mean.

Saved as HF PEFT saves it: one key, ``prompt_embeddings`` = E₀ + Π(Δ); loading puts it in E₀ with Δ = 0.
Causal language models only, as in HF PEFT.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from peftkit.core.registry import register_method
from peftkit.errors import ConfigError
from peftkit.io.hf_names import hf_modules_to_save
from peftkit.methods.prompt import (
    ATTR,
    PromptEmbedding,
    PromptLearningConfig,
    PromptLearningLayer,
    attach,
    detach,
    hf_prompt_dict,
    input_embeddings,
    model_dims,
    task_of,
)

_LOSS_HOOK = "_peftkit_cpt_loss_hook"
#: The key of Δ among the adapter's tensors; the file holds E₀ + Π(Δ) under ``prompt_embeddings`` instead.
DELTA = "cpt_delta_embeddings"


def is_output(types: torch.Tensor) -> torch.Tensor:
    """Which positions are outputs (labels): type > 0 and ≡ 0 mod 4."""
    return (types > 0) & (types % 4 == 0)


def radii(types: Sequence[int], token_dim: int, input_eps: float, format_eps: float) -> torch.Tensor:
    """εᵢ per context token (1e-10 for outputs and untyped tokens, whose offset is thus kept at zero)."""
    scale = torch.sqrt(torch.tensor([token_dim / 2048], dtype=torch.float32))
    t = torch.tensor(list(types), dtype=torch.long)
    eps = torch.full((len(t),), 1e-10, dtype=torch.float32)
    eps[(t > 0) & (t % 4 % 2 == 1)] = format_eps * scale  # templates: 1 and 3 mod 4
    eps[(t > 0) & (t % 4 == 2)] = input_eps * scale
    return eps


def project(delta: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Π(Δ): each row scaled into the ball of radius εᵢ (rows inside it, and zero rows, unchanged)."""
    eps = eps.to(delta.device)
    norm = torch.linalg.vector_norm(delta, dim=1)
    scale: torch.Tensor = (eps / norm.clamp(min=eps)).unsqueeze(1)
    return delta * scale


class CPTEmbedding(PromptEmbedding):
    """One CPT adapter: the frozen context table E₀ (``embedding.weight``) and the trained Δ (``delta_embedding``)."""

    def __init__(self, config: CPT, token_dim: int) -> None:
        m = len(config.token_ids)
        super().__init__(m, token_dim, m)
        self.config = config
        self.embedding.weight.requires_grad_(False)
        self.delta_embedding = nn.Embedding(m, token_dim)
        nn.init.zeros_(self.delta_embedding.weight)
        types = torch.tensor(config.types, dtype=torch.long)
        self.register_buffer("types", types, persistent=False)
        self.register_buffer("token_ids", torch.tensor(config.token_ids, dtype=torch.long), persistent=False)
        self.register_buffer("eps", config.radii(token_dim), persistent=False)
        self.register_buffer("trained_rows", (types % 4 != 0).unsqueeze(1), persistent=False)
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None  # this call's labels and types, for the loss

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        yield cast(nn.Parameter, self.delta_embedding.weight)

    def project_(self) -> None:
        """Replace Δ by Π(Δ) in place (HF PEFT does so on each forward, so the next step starts in the ball)."""
        with torch.no_grad():
            self.delta_embedding.weight.copy_(project(self.delta_embedding.weight, cast(torch.Tensor, self.eps)))

    def prompt(self) -> torch.Tensor:
        self.project_()
        delta = self.delta_embedding.weight
        # Output rows are frozen: same value, no gradient (HF PEFT masks the gradient with a hook).
        delta = torch.where(cast(torch.Tensor, self.trained_rows), delta, delta.detach())
        return self.embedding.weight.detach() + delta

    def prepare(self, model: nn.Module, kwargs: dict[str, Any]) -> None:
        """Prompt tuning's rewrite, with the labels and ``input_type_mask`` kept for the loss (:func:`cpt_loss`)."""
        labels, types = kwargs.pop("labels", None), kwargs.pop("input_type_mask", None)
        self._pending = None
        super().prepare(model, kwargs)
        if labels is None:
            return
        ctx_types = cast(torch.Tensor, self.types).to(labels.device)
        # The call's types shifted past the context's (HF PEFT shifts the caller's tensor in place; we copy).
        types = torch.full_like(labels, 4) if types is None else types.to(labels.device, torch.long)
        types = torch.where(types > 0, types + ctx_types.max(), types)
        batch = labels.shape[0]
        all_types = torch.cat([ctx_types.expand(batch, -1), types], dim=1)
        all_labels = torch.cat([cast(torch.Tensor, self.token_ids).to(labels.device).expand(batch, -1), labels], 1)
        self._pending = (all_labels.masked_fill(~is_output(all_types), -100), all_types)

    def add_loss(self, output: Any) -> None:
        """Set ``output.loss`` to the CPT loss of the call :meth:`prepare` just rewrote (if it had labels)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            labels, types = pending
            output.loss = cpt_loss(output.logits, labels, types, self.config)


def cpt_loss(logits: torch.Tensor, labels: torch.Tensor, types: torch.Tensor, config: CPT) -> torch.Tensor:
    """The next-token loss over output positions, each example's outputs weighted by decay from the last one."""
    logits, labels, types = logits[:, :-1], labels[:, 1:].to(logits.device), types[:, 1:].to(logits.device)
    kept = labels != -100
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none",
                           ignore_index=-100).view(labels.shape)
    weights = kept.float()
    if config.opt_weighted_loss_type == "decay":
        for row, row_types in enumerate(types):
            decay, value = torch.ones_like(weights[row]), 1.0
            for example in row_types[is_output(row_types)].unique().flip(0):  # the last example first
                decay[row_types == example] = value
                value *= config.opt_loss_decay_factor
            weights[row] *= decay
    return (loss[kept] * weights[kept]).mean()


def _loss_hook(layer: PromptLearningLayer) -> Any:
    def hook(module: nn.Module, args: Any, kwargs: Any, output: Any) -> Any:
        current = layer.current()
        if isinstance(current, CPTEmbedding):
            current.add_loss(output)
        return output

    return hook


@register_method
@dataclass
class CPT(PromptLearningConfig):
    """Context-aware prompt tuning: virtual tokens initialised from context tokens, trained within a ball.

    Attributes:
        cpt_token_ids: the context's token ids; m = their number (``None``: ``[0]``, as HF PEFT).
        cpt_mask: the context's attention mask, one value per token (``None``: all ones). Recorded in the
            adapter's config; HF PEFT does not use it either.
        cpt_tokens_type_mask: the type of each context token: 4k+1, 4k+2, 4k+3, 4k+4 for example k's input
            template, input, output template and output; 0 for none (``None``: all 1).
        opt_weighted_loss_type: ``"none"`` (a plain mean over output positions) or ``"decay"`` (example j from
            the last weighted ``opt_loss_decay_factor``ʲ).
        opt_loss_decay_factor: the decay factor (> 0).
        opt_projection_epsilon: the radius of input tokens' offsets, before the √(d/2048) scaling (> 0).
        opt_projection_format_epsilon: the radius of template tokens' offsets, likewise (> 0).
        tokenizer_name_or_path: the tokenizer the context was tokenized with; only recorded in the config.
    """

    peft_type = "CPT"

    cpt_token_ids: Sequence[int] | None = None
    cpt_mask: Sequence[int] | None = None
    cpt_tokens_type_mask: Sequence[int] | None = None
    opt_weighted_loss_type: str = "none"
    opt_loss_decay_factor: float = 1.0
    opt_projection_epsilon: float = 0.1
    opt_projection_format_epsilon: float = 0.1
    tokenizer_name_or_path: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.task_type not in (None, "CAUSAL_LM"):
            raise ConfigError(f"task_type={self.task_type!r}: CPT supports causal language models only; "
                              "use task_type='CAUSAL_LM' (or leave it unset)")
        self.task_type = "CAUSAL_LM"
        self.cpt_token_ids = _int_list("cpt_token_ids", [0] if self.cpt_token_ids is None else self.cpt_token_ids)
        m = len(self.cpt_token_ids)
        for name in ("cpt_mask", "cpt_tokens_type_mask"):
            value = getattr(self, name)
            setattr(self, name, _int_list(name, [1] * m if value is None else value))
            if len(getattr(self, name)) != m:
                raise ConfigError(f"{name} has {len(getattr(self, name))} values but cpt_token_ids has {m}; "
                                  "give one per context token")
        if self.opt_weighted_loss_type not in ("none", "decay"):
            raise ConfigError(f"opt_weighted_loss_type={self.opt_weighted_loss_type!r} must be 'none' or 'decay'")
        for name in ("opt_loss_decay_factor", "opt_projection_epsilon", "opt_projection_format_epsilon"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ConfigError(f"{name}={value!r} must be a positive number (e.g. 0.1)")

    @property
    def token_ids(self) -> list[int]:
        return list(cast(Sequence[int], self.cpt_token_ids))

    @property
    def types(self) -> list[int]:
        return list(cast(Sequence[int], self.cpt_tokens_type_mask))

    def radii(self, token_dim: int) -> torch.Tensor:
        return radii(self.types, token_dim, self.opt_projection_epsilon, self.opt_projection_format_epsilon)

    def inject(self, model: nn.Module, name: str) -> list[str]:
        if task_of(model) != "causal":
            raise ConfigError(f"CPT supports causal language models only (as HF PEFT), not {type(model).__name__}; "
                              "use pk.PromptTuning for it")
        dims, words = model_dims(model), input_embeddings(model)
        bad = [i for i in self.token_ids if not 0 <= i < words.num_embeddings]
        if bad:
            raise ConfigError(f"cpt_token_ids has ids {bad[:5]} outside the model's {words.num_embeddings} input "
                              "embeddings; tokenize the context with the model's tokenizer")
        module = CPTEmbedding(self, dims["token_dim"])
        if not words.weight.is_meta:  # a dry run (pk.inspect) has no weights to copy
            with torch.no_grad():
                ids = torch.tensor(self.token_ids, device=words.weight.device)
                module.embedding.weight.copy_(words(ids).float())
        attach(model, name, module)
        if _LOSS_HOOK not in model.__dict__:
            layer = cast(PromptLearningLayer, getattr(model, ATTR))
            model.__dict__[_LOSS_HOOK] = model.register_forward_hook(_loss_hook(layer), with_kwargs=True)
        self.extra = {**self.extra, "token_dim": dims["token_dim"], "num_attention_heads": dims["num_heads"],
                      "num_layers": dims["num_layers"], "num_transformer_submodules": 1}  # written to the JSON
        return [ATTR]

    def remove(self, model: nn.Module, name: str) -> None:
        detach(model, name)
        layer = model._modules.get(ATTR)
        left = layer.prompt_modules.values() if isinstance(layer, PromptLearningLayer) else []
        if not any(isinstance(m, CPTEmbedding) for m in left) and _LOSS_HOOK in model.__dict__:
            model.__dict__.pop(_LOSS_HOOK).remove()

    # -- tensors: live E₀ and Δ; the file holds E₀ + Π(Δ) ------------------------------------------
    def extra_tensors(self, model: nn.Module, name: str) -> dict[str, torch.Tensor]:
        module = cast(CPTEmbedding, cast(PromptLearningLayer, getattr(model, ATTR)).prompt_modules[name])
        return {"prompt_embeddings": module.embedding.weight, DELTA: module.delta_embedding.weight}

    def file_tensors(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = dict(state)
        table, delta = out.pop("prompt_embeddings"), out.pop(DELTA)
        out["prompt_embeddings"] = (table + project(delta, self.radii(table.shape[1]))).detach()
        return out

    def tensors_from_file(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        table = weights.get("prompt_embeddings")
        return weights if table is None else {**weights, DELTA: torch.zeros_like(table)}

    def to_hf_dict(self, targets: list[str], module_names: list[str]) -> dict[str, Any]:
        own = {name: getattr(self, name) for name in _OWN}
        return hf_prompt_dict(self, len(self.token_ids), own, _HF_FIELDS)

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any], module_names: list[str]) -> CPT:
        return cls(**{name: data[name] for name in _OWN if name in data}, task_type=data.get("task_type"),
                   modules_to_save=hf_modules_to_save(data.get("modules_to_save"), module_names),
                   extra={k: v for k, v in data.items() if k not in _HF_FIELDS})


_OWN = ("cpt_token_ids", "cpt_mask", "cpt_tokens_type_mask", "opt_weighted_loss_type", "opt_loss_decay_factor",
        "opt_projection_epsilon", "opt_projection_format_epsilon", "tokenizer_name_or_path")
_HF_FIELDS = frozenset({"peft_type", "task_type", "num_virtual_tokens", "inference_mode", "modules_to_save", *_OWN})


def _int_list(name: str, values: Any) -> list[int]:
    if isinstance(values, str | bytes) or not isinstance(values, Sequence) or not values:
        raise ConfigError(f"{name}={values!r} must be a non-empty list of integers")
    bad = [v for v in values if isinstance(v, bool) or not isinstance(v, int) or v < 0]
    if bad:
        raise ConfigError(f"{name} has {bad[:5]}, which are not non-negative integers")
    return [int(v) for v in values]
