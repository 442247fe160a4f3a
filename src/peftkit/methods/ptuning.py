"""P-tuning: virtual tokens produced by a small trained encoder.

Paper: Liu, Zheng, Du, Ding, Qian, Yang and Tang, "GPT Understands, Too", AI Open 2023
(https://arxiv.org/abs/2103.10385).

A table E ∈ ℝ^{m×d} of m virtual-token embeddings is reparametrised by a prompt encoder g, and its
output is prepended to the input embeddings exactly as in prompt tuning::

    P = g(E),  model(x) = f([P ; E(x)])
    g_MLP(E)  = W₃ ReLU(W₂ ReLU(W₁E + b₁) + b₂) + b₃           (hidden width h)
    g_LSTM(E) = W₂ ReLU(W₁ BiLSTM(E) + b₁) + b₂                 (h per direction, L layers)

The encoder only helps optimisation: once trained, P is all the model needs. As in Hugging Face PEFT
0.21 (``P_TUNING``, ``PromptEncoderConfig``) a saved adapter therefore holds P (not E and the encoder)
under ``prompt_embeddings``, with the encoder's settings in ``adapter_config.json``, and a loaded adapter
runs P as a fixed table (``fixed_table=True``, HF's ``inference_mode``): it cannot be trained further
through the encoder, only as a plain table (``pk.load_adapter(..., trainable=True)``). Training
checkpoints keep the encoder's own tensors, so resuming is unaffected. Encoder-decoder models get 2m
virtual tokens, all passed through the encoder together, of which the encoder input uses the first m
(as there). The prompt is injected through the hooks of :mod:`peftkit.methods.prompt`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from peftkit.core.registry import register_method
from peftkit.errors import ConfigError
from peftkit.io.hf_names import hf_modules_to_save
from peftkit.methods.prompt import (
    ATTR,
    PromptEmbedding,
    PromptLearningConfig,
    attach,
    check_virtual_tokens,
    hf_prompt_dict,
    is_seq2seq,
    model_dims,
)

ENCODER_TYPES = ("MLP", "LSTM")


class PromptEncoder(PromptEmbedding):
    """One P-tuning adapter while training: the table E (``embedding``) and the encoder g.

    Submodule names and shapes are HF PEFT's (``embedding``, ``lstm_head``, ``mlp_head``), so the state
    dicts of the two libraries' encoders are interchangeable.
    """

    def __init__(self, total_tokens: int, token_dim: int, num_virtual_tokens: int, kind: str, hidden: int,
                 num_layers: int, dropout: float) -> None:
        super().__init__(total_tokens, token_dim, num_virtual_tokens)
        self.lstm_head: nn.LSTM | None = None
        if kind == "LSTM":
            self.lstm_head = nn.LSTM(token_dim, hidden, num_layers=num_layers, dropout=dropout, bidirectional=True,
                                     batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(),
                                          nn.Linear(2 * hidden, token_dim))
        else:
            self.mlp_head = nn.Sequential(nn.Linear(token_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                                          nn.ReLU(), nn.Linear(hidden, token_dim))

    def prompt(self) -> torch.Tensor:
        """P = g(E), (total tokens, d), recomputed on every call so that gradients reach E and g."""
        x = self.embedding.weight.unsqueeze(0)  # one sequence of all virtual tokens (the LSTM reads them in order)
        if self.lstm_head is not None:
            x = self.lstm_head(x)[0]
        out: torch.Tensor = self.mlp_head(x)[0]
        return out

    def saved_table(self) -> torch.Tensor:
        """P without dropout and without a graph: what the file holds (HF PEFT saves in the current mode)."""
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                return self.prompt()
        finally:
            self.train(was_training)


@register_method
@dataclass
class PTuning(PromptLearningConfig):
    """Virtual tokens from a trained prompt encoder (HF PEFT's ``PromptEncoderConfig``).

    Attributes:
        num_virtual_tokens: m, the number of virtual tokens.
        encoder_reparameterization_type: ``"MLP"`` (three linear layers, HF PEFT's default) or ``"LSTM"``
            (a bidirectional LSTM, then two linear layers).
        encoder_hidden_size: h, the encoder's hidden width (default: the model's hidden size).
        encoder_num_layers: the LSTM's layers; the MLP always has its fixed depth, so only 2 is valid with it.
        encoder_dropout: dropout between the LSTM's layers; the MLP has none, so only 0.0 is valid with it.
        fixed_table: the adapter is the encoder's output P as a plain table, with no encoder (HF PEFT's
            ``inference_mode``); ``pk.load_adapter`` sets it, since a saved adapter holds only P.
    """

    peft_type = "P_TUNING"

    num_virtual_tokens: int = 20
    encoder_reparameterization_type: str = "MLP"
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0
    fixed_table: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_virtual_tokens(self.num_virtual_tokens)
        kind = self.encoder_reparameterization_type
        if not isinstance(kind, str) or kind.upper() not in ENCODER_TYPES:
            raise ConfigError(f"encoder_reparameterization_type={kind!r} must be 'MLP' (the default) or 'LSTM'")
        self.encoder_reparameterization_type = kind.upper()
        if self.encoder_hidden_size is not None:
            _check_positive("encoder_hidden_size", self.encoder_hidden_size, "e.g. 128, or None for the model's size")
        _check_positive("encoder_num_layers", self.encoder_num_layers, "e.g. 2")
        dropout = self.encoder_dropout
        if isinstance(dropout, bool) or not isinstance(dropout, int | float) or not 0.0 <= dropout < 1.0:
            raise ConfigError(f"encoder_dropout={dropout!r} must be a probability in [0, 1), e.g. 0.1")
        if self.encoder_reparameterization_type == "MLP" and not self.fixed_table:
            # HF PEFT ignores these for the MLP with a warning; a setting that does nothing is an error here.
            if self.encoder_num_layers != 2:
                raise ConfigError(f"encoder_num_layers={self.encoder_num_layers} has no effect on the MLP encoder, "
                                  "whose depth is fixed; leave it at 2, or use encoder_reparameterization_type='LSTM'")
            if dropout:
                raise ConfigError(f"encoder_dropout={dropout} has no effect on the MLP encoder, which has no "
                                  "dropout; set it to 0.0, or use encoder_reparameterization_type='LSTM'")

    def dims(self, model: nn.Module) -> dict[str, int]:
        """The sizes HF PEFT writes to ``adapter_config.json`` for this model."""
        d = model_dims(model)
        return {"token_dim": d["token_dim"], "num_attention_heads": d["num_heads"], "num_layers": d["num_layers"],
                "num_transformer_submodules": 2 if is_seq2seq(model) else 1}

    def inject(self, model: nn.Module, name: str) -> list[str]:
        d = self.dims(model)
        m, token_dim = self.num_virtual_tokens, d["token_dim"]
        total = m * d["num_transformer_submodules"]
        module = PromptEmbedding(total, token_dim, m) if self.fixed_table else PromptEncoder(
            total, token_dim, m, self.encoder_reparameterization_type, self.encoder_hidden_size or token_dim,
            self.encoder_num_layers, self.encoder_dropout)
        attach(model, name, module)
        self.extra = {**self.extra, **d}  # written to adapter_config.json
        return [ATTR]

    def to_hf_dict(self, targets: list[str], module_names: list[str]) -> dict[str, Any]:
        own = {
            "encoder_reparameterization_type": self.encoder_reparameterization_type,
            "encoder_hidden_size": self.encoder_hidden_size or self.extra.get("token_dim"),
            "encoder_num_layers": self.encoder_num_layers,
            "encoder_dropout": float(self.encoder_dropout),
        }
        return hf_prompt_dict(self, self.num_virtual_tokens, own, _HF_FIELDS)

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any], module_names: list[str]) -> PTuning:
        # The file holds the encoder's output, so the adapter loads as a fixed table; the encoder's settings
        # are kept to be written back unchanged.
        return cls(
            num_virtual_tokens=int(data["num_virtual_tokens"]),
            encoder_reparameterization_type=str(data.get("encoder_reparameterization_type") or "MLP"),
            encoder_hidden_size=data.get("encoder_hidden_size"),
            encoder_num_layers=int(data.get("encoder_num_layers") or 2),
            encoder_dropout=float(data.get("encoder_dropout") or 0.0),
            fixed_table=True,
            task_type=data.get("task_type"),
            modules_to_save=hf_modules_to_save(data.get("modules_to_save"), module_names),
            extra={k: v for k, v in data.items() if k not in _HF_FIELDS},
        )


_HF_FIELDS = frozenset(
    "peft_type task_type num_virtual_tokens encoder_reparameterization_type encoder_hidden_size encoder_num_layers "
    "encoder_dropout inference_mode modules_to_save".split()
)


def _check_positive(field: str, value: Any, hint: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{field}={value!r} must be a positive integer ({hint})")
