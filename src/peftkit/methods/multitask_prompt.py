"""Multi-task prompt tuning: one shared prompt, modulated per task by a low-rank matrix.

Paper: Wang, Panda, Karlinsky, Feris, Sun and Kim, "Multitask Prompt Tuning Enables Parameter-Efficient
Transfer Learning", ICLR 2023 (https://arxiv.org/abs/2303.02861).

A shared table P ∈ ℝ^{m×d}, and for each of T tasks a rank-r factor pair C_t ∈ ℝ^{m×r}, R_t ∈ ℝ^{r×d}.
Example i of a batch, of task tᵢ (the ``task_ids`` the caller passes), is given the prompt::

    Pᵢ = P ⊙ (C_{tᵢ} R_{tᵢ}),      model(xᵢ) = f([Pᵢ ; E(xᵢ)])

(⊙ is the elementwise product: the task matrix rescales the shared prompt, it is not added to it.)
Masks and labels grow by m as in prompt tuning; the prompt is injected through the hooks of
:mod:`peftkit.methods.prompt`, and this method's pre-hook takes ``task_ids`` out of the call before the
model sees them. Matches Hugging Face PEFT 0.21 (``MULTITASK_PROMPT_TUNING``): keys ``prompt_embeddings``
(P), ``prefix_task_cols`` (T×m×r) and ``prefix_task_rows`` (T×r×d); the same initialisations (random,
text, and the three from a source-task adapter file). Decoder-only and sequence-classification models
only: HF PEFT also prepends a second prompt to the decoder of encoder-decoder models, which peftkit's
encoder hook does not do.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from safetensors.torch import load_file
from torch import nn

from peftkit.core.registry import register_method
from peftkit.errors import CheckpointError, ConfigError, ShapeMismatchError
from peftkit.io.hf_names import hf_modules_to_save
from peftkit.methods.prompt import (
    ATTR,
    PromptEmbedding,
    PromptLearningConfig,
    PromptLearningLayer,
    attach,
    check_task_ids,
    check_virtual_tokens,
    hf_init_fields,
    hf_prompt_dict,
    input_embeddings,
    is_seq2seq,
    model_dims,
    text_token_ids,
)

#: ``init`` values and HF PEFT's names for them; the last three read a source adapter's tensors.
INITS = {"random": "RANDOM", "text": "TEXT", "average_source_tasks": "AVERAGE_SOURCE_TASKS",
         "exact_source_task": "EXACT_SOURCE_TASK", "only_source_shared": "ONLY_SOURCE_SHARED"}
SOURCE_INITS = ("average_source_tasks", "exact_source_task", "only_source_shared")


class MultitaskPromptEmbedding(PromptEmbedding):
    """One adapter's P (``embedding.weight``) and task factors C (``prefix_task_cols``), R (``prefix_task_rows``)."""

    def __init__(self, token_dim: int, num_virtual_tokens: int, num_tasks: int, num_ranks: int) -> None:
        super().__init__(num_virtual_tokens, token_dim, num_virtual_tokens)
        self.num_tasks = num_tasks
        # HF PEFT's initialisation: P ~ N(0, 1) (``nn.Embedding``), C and R ~ N(0, 0.02²).
        self.prefix_task_cols = nn.Parameter(torch.normal(0.0, 0.02, (num_tasks, num_virtual_tokens, num_ranks)))
        self.prefix_task_rows = nn.Parameter(torch.normal(0.0, 0.02, (num_tasks, num_ranks, token_dim)))
        # The current call's task ids, set by ``prepare`` for ``batch_prompt`` and cleared afterwards.
        self._task_ids: torch.Tensor | None = None

    def task_prompts(self, task_ids: torch.Tensor) -> torch.Tensor:
        """Pᵢ = P ⊙ (C_{tᵢ} R_{tᵢ}) for each task id, (len(task_ids), m, d)."""
        cols = self.prefix_task_cols.index_select(0, task_ids)
        rows = self.prefix_task_rows.index_select(0, task_ids)
        return self.prompt().unsqueeze(0) * torch.matmul(cols, rows)

    def batch_prompt(self, batch: int) -> torch.Tensor:
        """The prompts of the current call's examples, (batch, m, d).

        Raises:
            ConfigError: the call passed no ``task_ids``, or not one valid task id per example.
        """
        ids = self._task_ids
        if ids is None:
            raise ConfigError(
                "multi-task prompt tuning needs task_ids, one task index per example: call "
                f"model(input_ids=..., task_ids=torch.tensor([...])) with {batch} values in [0, {self.num_tasks})"
            )
        ids = check_task_ids(ids, batch)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_tasks):
            raise ConfigError(f"task_ids={ids.tolist()} has values outside [0, {self.num_tasks}); the adapter has "
                              f"num_tasks={self.num_tasks}")
        return self.task_prompts(ids.to(self.prefix_task_cols.device))

    def prepare(self, model: nn.Module, kwargs: dict[str, Any]) -> None:
        """Take ``task_ids`` out of the call, then rewrite it as prompt tuning does with this call's prompts."""
        self._task_ids = kwargs.pop("task_ids", None)
        try:
            super().prepare(model, kwargs)
        finally:
            self._task_ids = None


@register_method
@dataclass
class MultitaskPromptTuning(PromptLearningConfig):
    """A shared prompt rescaled per task by a low-rank matrix; each call passes ``task_ids``.

    Attributes:
        num_virtual_tokens: m, the number of virtual tokens.
        num_tasks: T, the number of tasks (``task_ids`` take values in [0, T)).
        num_ranks: r, the rank of each task's matrix C_t R_t.
        init: how P, C and R start: ``"random"``; ``"text"`` (P from the embeddings of ``init_text``);
            from a source adapter's file ``init_state_dict_path`` (HF PEFT's ``MULTITASK_PROMPT_TUNING``
            tensors): ``"average_source_tasks"`` (its P, and C, R averaged over its tasks),
            ``"exact_source_task"`` (its P, and the C, R of its task ``init_task``) or
            ``"only_source_shared"`` (its P only). The first two give one task, so need ``num_tasks=1``.
        init_text: the text for ``init="text"``.
        tokenizer: a ``transformers`` tokenizer for ``init="text"``.
        init_state_dict_path: the source adapter's ``.safetensors`` (or ``.bin``) file.
        init_task: the source task for ``init="exact_source_task"``.
    """

    peft_type = "MULTITASK_PROMPT_TUNING"

    num_virtual_tokens: int = 20
    num_tasks: int = 1
    num_ranks: int = 1
    init: str = "random"
    init_text: str | None = None
    tokenizer: Any = None
    init_state_dict_path: str | None = None
    init_task: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_virtual_tokens(self.num_virtual_tokens)
        for field in ("num_tasks", "num_ranks"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{field}={value!r} must be a positive integer (e.g. 2)")
        if self.init not in INITS:
            raise ConfigError(f"init={self.init!r} is not supported; use one of {sorted(INITS)}")
        if self.init == "text" and (not self.init_text or self.tokenizer is None):
            raise ConfigError("init='text' needs init_text='...' and tokenizer=<a tokenizer> to embed it")
        if self.init in SOURCE_INITS and not self.init_state_dict_path:
            raise ConfigError(f"init={self.init!r} needs init_state_dict_path='<source adapter>.safetensors'")
        if self.init in ("average_source_tasks", "exact_source_task") and self.num_tasks != 1:
            raise ConfigError(f"init={self.init!r} gives the adapter one task's C and R, but num_tasks="
                              f"{self.num_tasks}; set num_tasks=1, or use init='only_source_shared'")

    def inject(self, model: nn.Module, name: str) -> list[str]:
        if is_seq2seq(model):
            raise ConfigError(
                f"MultitaskPromptTuning supports decoder-only and sequence-classification models, not the "
                f"encoder-decoder {type(model).__name__}; use pk.PromptTuning for it"
            )
        dims = model_dims(model)
        module = MultitaskPromptEmbedding(dims["token_dim"], self.num_virtual_tokens, self.num_tasks, self.num_ranks)
        words = input_embeddings(model)
        with torch.no_grad():
            if self.init == "text":
                ids = text_token_ids(self.tokenizer, cast(str, self.init_text), self.num_virtual_tokens,
                                      words.num_embeddings)
                module.embedding.weight.copy_(words(ids.to(words.weight.device)).float())
            elif self.init in SOURCE_INITS:
                self._copy_source(module)
        attach(model, name, module)
        self.extra = {**self.extra, "token_dim": dims["token_dim"], "num_attention_heads": dims["num_heads"],
                      "num_layers": dims["num_layers"], "num_transformer_submodules": 1}  # written to the JSON
        return [ATTR]

    def _copy_source(self, module: MultitaskPromptEmbedding) -> None:
        """Initialise from the source adapter's tensors, as HF PEFT does for the three source inits."""
        keys = ["prompt_embeddings"] + ([] if self.init == "only_source_shared" else ["prefix_task_cols",
                                                                                     "prefix_task_rows"])
        source = read_source(cast(str, self.init_state_dict_path), keys)
        wanted = {"embedding.weight": source["prompt_embeddings"]}
        if self.init != "only_source_shared":
            cols, rows = source["prefix_task_cols"], source["prefix_task_rows"]
            if self.init == "average_source_tasks":
                cols, rows = cols.mean(0, keepdim=True), rows.mean(0, keepdim=True)
            elif not 0 <= self.init_task < cols.shape[0]:
                raise ConfigError(f"init_task={self.init_task} is not a task of the source adapter, which has "
                                  f"{cols.shape[0]}; pick one in [0, {cols.shape[0]})")
            else:
                cols, rows = cols[self.init_task : self.init_task + 1], rows[self.init_task : self.init_task + 1]
            wanted |= {"prefix_task_cols": cols, "prefix_task_rows": rows}
        own = module.state_dict(keep_vars=True)
        for key, value in wanted.items():
            if own[key].shape != value.shape:
                raise ShapeMismatchError(
                    f"{key}: the source adapter {self.init_state_dict_path!r} gives shape {tuple(value.shape)} but "
                    f"this adapter needs {tuple(own[key].shape)}; match num_virtual_tokens and num_ranks to it"
                )
            own[key].copy_(value)

    def extra_tensors(self, model: nn.Module, name: str) -> dict[str, torch.Tensor]:
        layer = cast(PromptLearningLayer, getattr(model, ATTR))
        module = cast(MultitaskPromptEmbedding, layer.prompt_modules[name])
        return {"prompt_embeddings": module.embedding.weight, "prefix_task_cols": module.prefix_task_cols,
                "prefix_task_rows": module.prefix_task_rows}

    def to_hf_dict(self, targets: list[str], module_names: list[str]) -> dict[str, Any]:
        # A loaded adapter's own init fields sit in ``extra`` and are written back unchanged.
        init, tokenizer = hf_init_fields(INITS[self.init], self.tokenizer)
        own = {
            "prompt_tuning_init": init,
            "prompt_tuning_init_text": self.init_text,
            "tokenizer_name_or_path": tokenizer,
            "tokenizer_kwargs": None,
            "prompt_tuning_init_state_dict_path": self.init_state_dict_path,
            "prompt_tuning_init_task": self.init_task,
            "num_ranks": self.num_ranks,
            "num_tasks": self.num_tasks,
        }
        return hf_prompt_dict(self, self.num_virtual_tokens, own, _HF_FIELDS)

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any], module_names: list[str]) -> MultitaskPromptTuning:
        # The tensors are read from the file, so the initialisation is not run again on load.
        return cls(num_virtual_tokens=int(data["num_virtual_tokens"]), num_tasks=int(data.get("num_tasks") or 1),
                   num_ranks=int(data.get("num_ranks") or 1), task_type=data.get("task_type"),
                   modules_to_save=hf_modules_to_save(data.get("modules_to_save"), module_names),
                   extra={k: v for k, v in data.items() if k not in _HF_FIELDS})


_HF_FIELDS = frozenset(
    "peft_type task_type num_virtual_tokens num_ranks num_tasks inference_mode modules_to_save".split()
)


def read_source(path: str, keys: list[str]) -> dict[str, torch.Tensor]:
    """A source adapter's tensors: ``.safetensors``, or a ``.bin`` read with ``torch.load(weights_only=True)``.

    Raises:
        CheckpointError: the file is missing, unreadable, or lacks HF PEFT's multi-task prompt keys.
    """
    if not Path(path).is_file():
        raise CheckpointError(f"init_state_dict_path={path!r} is not a file; point it to a source adapter's "
                              "adapter_model.safetensors")
    try:
        tensors = load_file(path) if path.endswith(".safetensors") else dict(
            torch.load(path, map_location="cpu", weights_only=True))
    except Exception as exc:
        raise CheckpointError(f"init_state_dict_path={path!r} could not be read ({exc})") from exc
    missing = set(keys) - set(tensors)
    if missing:
        raise CheckpointError(f"init_state_dict_path={path!r} lacks {sorted(missing)}; it must be a multi-task "
                              "prompt tuning adapter's weights")
    return tensors
