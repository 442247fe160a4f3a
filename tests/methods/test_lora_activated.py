"""Activated LoRA (HF PEFT's ``alora_invocation_tokens``): the update applies from the last invocation on only.

HF PEFT parity both ways (logits and greedy generations, Llama and GPT-2, invocations at different positions, twice,
absent, straddling padding), the positions found on hand-built inputs and across KV-cache calls, reusing the base
model's cache, training (activation checkpointing included), the fast paths left to plain adapters, and refusals.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import peftkit as pk
from peftkit.core.state import adapter_layers
from peftkit.errors import ConfigError, MergeError, UnsupportedLayerError
from peftkit.methods.lora_activated import ActivatedLinear, invocation_starts, token_masks
from peftkit.methods.lora_kernels import plain_adapter
from peftkit.methods.lora_layers import LoRALinear

from models import build, randomize_adapters, randomize_trainable

peft = pytest.importorskip("peft")

INV = [7, 8, 9]
#: lm_head checks the masks' alignment with the end of the token axis (generate() keeps only the last logits).
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj", "lm_head"], "gpt2": ["c_attn", "c_proj", "c_fc"]}
ROWS = [
    [20, 21, 7, 8, 9, 30, 31, 32, 33],  # in the middle
    [7, 8, 9, 40, 7, 8, 9, 41],  # twice: the last one counts
    [50, 51, 52, 53, 54, 55],  # absent: the base model everywhere
    [60, 61, 62, 63, 64, 65, 66, 7, 8, 9],  # at the end
]
STARTS = [2, 4, None, 7]  # in each row (before padding)


def batch(rows: list[list[int]] = ROWS) -> dict[str, torch.Tensor]:
    """``rows`` left-padded with 0 (as for generation), with their attention mask."""
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return {"input_ids": ids, "attention_mask": mask}


def hf_model(arch: str, **kwargs: Any) -> Any:
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[arch], alora_invocation_tokens=INV,
                             task_type="CAUSAL_LM", fan_in_fan_out=arch == "gpt2", **kwargs)
    return randomize_trainable(peft.get_peft_model(build(arch), config), scale=0.2, seed=3).eval()


def ours(arch: str = "llama", **kwargs: Any) -> nn.Module:
    model = pk.apply(build(arch), pk.LoRA(target_modules=TARGETS[arch], rank=4, alpha=8, alora_invocation_tokens=INV,
                                          **kwargs))
    randomize_adapters(model, seed=2)
    return model


def logits(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def generated(model: nn.Module, inputs: dict[str, torch.Tensor], **kwargs: Any) -> torch.Tensor:
    return model.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=0, **kwargs)


def base_logits(arch: str, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return logits(build(arch), inputs)


def assert_activated(arch: str, got: torch.Tensor, inputs: dict[str, torch.Tensor]) -> None:
    """Each row equals the base model exactly before its invocation (everywhere without one), and differs from it
    at every position from the invocation on."""
    base = base_logits(arch, inputs)
    width = inputs["input_ids"].shape[1]
    for i, (row, start) in enumerate(zip(ROWS, STARTS, strict=True)):
        first = width - len(row) + start if start is not None else width
        torch.testing.assert_close(got[i, :first], base[i, :first], rtol=0, atol=0)
        if start is not None:
            assert (got[i, first:] - base[i, first:]).abs().amax(-1).min() > 1e-3


# ------------------------------------------------------------------------------------------- HF PEFT parity


@pytest.mark.parametrize("arch,extra", [("llama", {}), ("gpt2", {}), ("llama", {"lora_bias": True})])
def test_hf_peft_adapter_loads_with_its_logits_and_generations(arch: str, extra: dict[str, Any],
                                                               tmp_path: Path) -> None:
    hf = hf_model(arch, **extra)
    hf.save_pretrained(str(tmp_path), save_embedding_layers=False)  # (lm_head's base weight is the model's)
    inputs = batch()
    want, want_ids = logits(hf, inputs), generated(hf, inputs)

    model = pk.load_adapter(build(arch), tmp_path)
    got = logits(model, inputs)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert_activated(arch, got, inputs)
    assert torch.equal(generated(model, inputs), want_ids)
    # Without a cache every step sees the whole sequence: the same tokens (HF PEFT shifts its window there).
    assert torch.equal(generated(model, inputs, use_cache=False), want_ids)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_peftkit_adapter_loads_in_hf_peft_with_its_logits_and_generations(arch: str, tmp_path: Path) -> None:
    model = ours(arch).eval()
    pk.save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["alora_invocation_tokens"] == INV
    inputs = batch()
    want = logits(model, inputs)
    assert_activated(arch, want, inputs)

    hf = peft.PeftModel.from_pretrained(build(arch), str(tmp_path)).eval()
    assert hf.peft_config["default"].alora_invocation_tokens == INV
    torch.testing.assert_close(logits(hf, inputs), want, rtol=0, atol=1e-5)
    assert torch.equal(generated(hf, inputs), generated(model, inputs))


def test_gradients_match_hf_peft_with_and_without_activation_checkpointing() -> None:
    """The recomputation during the backward pass sees the forward's masks (as HF PEFT's hooks arrange)."""
    inputs = batch()
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)

    def grads(model: nn.Module, checkpointing: dict[str, bool] | None) -> dict[str, torch.Tensor]:
        model.train()
        if checkpointing is not None:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
            model.enable_input_require_grads()
        model(**inputs, labels=labels).loss.backward()
        return {n.removeprefix("base_model.model."): p.grad for n, p in model.named_parameters() if p.requires_grad}

    hf = grads(hf_model("llama"), None)
    for checkpointing in (None, {"use_reentrant": False}, {"use_reentrant": True}):
        model = build("llama")
        pk.apply(model, pk.LoRA(target_modules=TARGETS["llama"], rank=4, alpha=8, alora_invocation_tokens=INV))
        state = hf_model("llama").state_dict()
        model.load_state_dict({k.removeprefix("base_model.model."): v for k, v in state.items()})
        got = grads(model, checkpointing)
        assert got.keys() == hf.keys()
        for key, grad in hf.items():
            torch.testing.assert_close(got[key], grad, rtol=1e-5, atol=1e-6, msg=f"{key} {checkpointing}")


# ------------------------------------------------------------------------------------ finding the invocation


def test_invocation_starts_on_hand_built_rows() -> None:
    ids = torch.tensor([[1, 7, 8, 9, 2, 7, 8, 9], [7, 8, 9, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 7, 8],
                        [9, 8, 7, 8, 9, 0, 0, 0], [7, 7, 8, 8, 9, 9, 7, 8]])
    assert invocation_starts(ids, (7, 8, 9)).tolist() == [5, 0, -1, 2, -1]
    assert invocation_starts(torch.tensor([[5, 5, 5, 5]]), (5, 5)).tolist() == [2]  # overlapping: the last
    assert invocation_starts(torch.tensor([[7, 8]]), (7, 8, 9)).tolist() == [-1]  # shorter than the invocation


def test_invocation_starts_agree_with_hf_peft_offsets() -> None:
    """HF PEFT's offset counts from the end: offset = length − start, None where absent."""
    from peft.tuners.lora.variants import calculate_alora_offsets

    gen = torch.Generator().manual_seed(0)
    for tokens in ([1], [1, 2], [2, 1, 2]):
        ids = torch.randint(0, 3, (64, 9), generator=gen)
        hf = calculate_alora_offsets({"a": peft.LoraConfig(alora_invocation_tokens=tokens)}, "a", ids)
        starts = invocation_starts(ids, tuple(tokens)).tolist()
        assert [None if s < 0 else 9 - s for s in starts] == hf
        assert any(o is None for o in hf) and any(o is not None for o in hf)


class _Cache:
    """A KV cache as far as the masks are concerned: its length."""

    def __init__(self) -> None:
        self.length = 0

    def get_seq_length(self) -> int:
        return self.length


def test_masks_follow_the_invocation_across_cached_calls() -> None:
    cache, tokens = _Cache(), (7, 8, 9)

    def call(*rows: list[int]) -> list[list[int]]:
        mask = token_masks(torch.tensor(rows), [tokens], cache)[tokens]
        cache.length += len(rows[0])
        return mask.int().tolist()

    # Prefill: from the invocation on; a row without one stays off; one whose invocation is cut by the chunk too.
    assert call([1, 7, 8, 9, 2], [1, 2, 3, 4, 5], [1, 2, 3, 7, 8]) == [[0, 1, 1, 1, 1], [0] * 5, [0] * 5]
    # Decoding: on after an earlier invocation, including one that straddles two calls.
    assert call([3], [3], [9]) == [[1], [0], [1]]
    # A later occurrence moves the start: positions of this call before it are off again.
    assert call([4, 7, 8, 9], [7, 8, 9, 4], [4, 4, 4, 4]) == [[0, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1]]
    # A cropped cache (its length no longer where the record ended) counts this call's tokens only.
    cache.length -= 2
    assert call([4, 4], [4, 4], [4, 4]) == [[0, 0]] * 3
    # No cache: this call's tokens only.
    assert token_masks(torch.tensor([[9, 4]]), [tokens])[tokens].tolist() == [[False, False]]


def test_continuing_the_base_models_cache_gives_the_full_sequences_logits() -> None:
    """The point of activated LoRA: the prompt's cache from the base model serves the adapter's turn."""
    model = ours().eval()
    prompt, turn = torch.tensor([[20, 21, 22, 23, 24]]), torch.tensor([[7, 8, 9, 30, 31]])
    want = logits(model, {"input_ids": torch.cat([prompt, turn], 1)})[:, 5:]
    with torch.no_grad():
        with pk.disable_adapters(model):
            cache = model(input_ids=prompt, use_cache=True).cache
        got = model(input_ids=turn, cache=cache).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - base_logits("llama", {"input_ids": torch.cat([prompt, turn], 1)})[:, 5:]).abs().min() > 0


# -------------------------------------------------------------------------------------- the layer and its paths


class _Tokens(nn.Module):
    """Embedding then one linear layer, on (batch, tokens) ids; ``flat`` runs the layer on every token as one row."""

    def __init__(self, flat: bool = False) -> None:
        super().__init__()
        self.embed, self.proj, self.flat = nn.Embedding(12, 6), nn.Linear(6, 5), flat

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids)
        return self.proj(h.reshape(-1, 6) if self.flat else h)


def test_formula_on_a_single_layer(caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    model = _Tokens()
    with caplog.at_level(logging.WARNING, logger="peftkit"):  # HF PEFT warns too: not a causal language model
        pk.apply(model, pk.LoRA(target_modules=["proj"], rank=2, alpha=4, alora_invocation_tokens=[3, 4],
                                lora_bias=True))
    assert "CAUSAL_LM" in caplog.text
    randomize_adapters(model)
    ids = torch.tensor([[1, 3, 4, 2, 5], [3, 4, 1, 1, 1], [1, 2, 3, 5, 4]])
    layer = model.proj
    assert isinstance(layer, LoRALinear) and isinstance(layer.lora_B["default"], ActivatedLinear)
    x = model.embed(ids).detach()
    A, B = layer.factor_weights("default")
    update = 2.0 * (x @ A.T @ B.T + layer.lora_B["default"].bias)
    on = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]]).bool()[..., None]
    torch.testing.assert_close(model(ids), layer.base_layer(x) + update * on)
    # Called outside a model call (no invocation known), the layer is the base layer, as in HF PEFT.
    torch.testing.assert_close(layer(x), layer.base_layer(x))


def test_a_layer_that_does_not_see_the_calls_tokens_is_an_error() -> None:
    model = pk.apply(_Tokens(flat=True), pk.LoRA(target_modules=["proj"], alora_invocation_tokens=[3]))
    with pytest.raises(UnsupportedLayerError, match=r"\(batch, tokens, features\)"):
        model(torch.tensor([[1, 3, 2], [3, 1, 1]]))


def test_inputs_embeds_only_run_the_base_model(caplog: pytest.LogCaptureFixture) -> None:
    model = ours().eval()
    embeds = model.get_input_embeddings()(batch()["input_ids"])
    with caplog.at_level(logging.WARNING, logger="peftkit"), torch.no_grad():
        got = model(inputs_embeds=embeds).logits
    assert "input_ids" in caplog.text
    torch.testing.assert_close(got, build("llama")(inputs_embeds=embeds).logits, rtol=0, atol=0)


def test_plain_adapters_keep_their_fast_path_beside_an_activated_one() -> None:
    model = build("llama")
    pk.apply(model, pk.LoRA(target_modules=["q_proj", "v_proj"], rank=4), name="plain")
    randomize_adapters(model, seed=1)
    inputs = batch()
    want = logits(model, inputs)
    pk.apply(model, pk.LoRA(target_modules=["q_proj", "v_proj"], rank=4, alora_invocation_tokens=INV), name="act")
    x = torch.randn(2, 3, 32)
    layers = [layer for _, layer in adapter_layers(model) if isinstance(layer, LoRALinear)]
    assert layers and all(plain_adapter(layer, x) is not None for layer in layers)
    torch.testing.assert_close(logits(model, inputs), want, rtol=0, atol=0)
    pk.set_adapter(model, "act")
    assert all(plain_adapter(layer, x) is None for layer in layers)


def test_each_activated_adapter_uses_its_own_invocation_and_the_hooks_go_with_the_last() -> None:
    model = build("llama")
    hooks = len(model._forward_pre_hooks), len(model._forward_hooks)
    pk.apply(model, pk.LoRA(target_modules=["q_proj"], alora_invocation_tokens=[7, 8, 9]), name="a")
    pk.apply(model, pk.LoRA(target_modules=["q_proj"], alora_invocation_tokens=[40]), name="b")
    randomize_adapters(model)
    inputs, base = batch(), base_logits("llama", batch())
    pk.set_adapter(model, "b")  # only row 1 holds token 40, at its position 3 (5 after padding)
    got = logits(model, inputs)
    torch.testing.assert_close(got[[0, 2, 3]], base[[0, 2, 3]], rtol=0, atol=0)
    torch.testing.assert_close(got[1, :5], base[1, :5], rtol=0, atol=0)
    assert (got[1, 5:] - base[1, 5:]).abs().amax(-1).min() > 0
    pk.set_adapter(model, ["a", "b"])  # both at once, each from its own invocation
    assert (logits(model, inputs)[0] - got[0]).abs().max() > 0
    pk.delete_adapter(model, "a")
    assert (len(model._forward_pre_hooks), len(model._forward_hooks)) == (hooks[0] + 1, hooks[1] + 1)
    pk.unload(model, merge=False)
    assert (len(model._forward_pre_hooks), len(model._forward_hooks)) == hooks
    torch.testing.assert_close(logits(model, inputs), base, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("tokens", [[], "ab", [-1, 2], [True], 5, [1.5]])
def test_invalid_invocation_tokens_are_refused(tokens: Any) -> None:
    with pytest.raises(ConfigError, match="alora_invocation_tokens"):
        pk.LoRA(target_modules=["q_proj"], alora_invocation_tokens=tokens)


@pytest.mark.parametrize("make,match", [
    (lambda: pk.DoRA(target_modules=["q_proj"], alora_invocation_tokens=INV), "DoRA"),
    (lambda: pk.CanonicalLoRA(target_modules=["linear_q"], alora_invocation_tokens=INV), "CanonicalLoRA"),
    (lambda: pk.LoRA(target_parameters=["mlp.experts.gate_up_proj"], alora_invocation_tokens=INV),
     "target_parameters"),
    (lambda: pk.LoRA(target_modules=["q_proj"], init="pissa", alora_invocation_tokens=INV), "pissa"),
])
def test_combinations_are_refused(make: Any, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        make()


@pytest.mark.parametrize("target", ["embed_tokens", "conv1"])
def test_layers_other_than_linear_are_refused_before_the_model_changes(target: str) -> None:
    from models import ConvNet

    model = build("llama") if target == "embed_tokens" else ConvNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UnsupportedLayerError, match=target):
        pk.apply(model, pk.LoRA(target_modules=[target, "q_proj" if target == "embed_tokens" else "proj"],
                                alora_invocation_tokens=INV))
    assert not list(adapter_layers(model)) and not model._forward_pre_hooks and not model._forward_hooks
    assert model.state_dict().keys() == before.keys()


def test_an_hf_file_with_dora_and_invocation_tokens_is_refused_before_the_model_changes(tmp_path: Path) -> None:
    hf_model("llama").save_pretrained(str(tmp_path), save_embedding_layers=False)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "use_dora": True}))
    model = build("llama")
    with pytest.raises(ConfigError, match="DoRA"):
        pk.load_adapter(model, tmp_path)
    assert not list(adapter_layers(model))


def test_merging_is_refused_before_any_weight_changes() -> None:
    model = build("llama")
    pk.apply(model, pk.LoRA(target_modules=["q_proj", "v_proj"]), name="plain")
    pk.apply(model, pk.LoRA(target_modules=["q_proj"], alora_invocation_tokens=INV), name="act")
    randomize_adapters(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    both = ["plain", "act"]
    for call in (lambda: pk.merge(model, both), lambda: pk.unload(model, merge=True, names=both)):
        with pytest.raises(MergeError, match="'act'.*every token"):
            call()
        for key, value in model.state_dict().items():
            assert torch.equal(value, before[key]), key
    assert not any(layer.merged_adapters for _, layer in adapter_layers(model))


@pytest.mark.parametrize("action", [
    lambda m: pk.combine(m, {"act": 1.0}, method="cat", name="mix"),
    lambda m: pk.prune(m, "act", target_rank=2),
    lambda m: pk.convert(m, to="canonical", name="act"),
])
def test_combine_prune_and_convert_refuse_activated_adapters(action: Any) -> None:
    model = pk.apply(build("llama"), pk.LoRA(target_modules=["q_proj"], alora_invocation_tokens=INV), name="act")
    with pytest.raises(ConfigError, match="activated LoRA"):
        action(model)
