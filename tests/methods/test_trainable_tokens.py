"""Trainable tokens: the formula, HF PEFT parity both ways (untied and tied output layers), gradients on the
selected rows only, merge/unmerge, several adapters, and errors raised before the model changes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

import peftkit as pk
from peftkit.core.state import adapter_layers, get_state
from peftkit.errors import (
    AdapterStateError,
    CheckpointError,
    ConfigError,
    ShapeMismatchError,
    UnsupportedLayerError,
)
from peftkit.methods.trainable_tokens import TrainableTokensLayer

from models import build

TOKENS = [1, 5, 7, 90]
IDS = torch.tensor([[1, 2, 5, 7, 90, 3], [7, 7, 0, 95, 1, 4]])


def tied_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=96, max_position_embeddings=64, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


BUILD = {"llama": lambda: build("llama"), "llama_tied": tied_llama, "gpt2": lambda: build("gpt2")}
EMBEDDING = {"llama": "model.embed_tokens", "llama_tied": "model.embed_tokens", "gpt2": "transformer.wte"}
TIED = {"llama": False, "llama_tied": True, "gpt2": True}


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def perturb(model: nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen))


def adapted(arch: str, seed: int = 0) -> nn.Module:
    model = pk.apply(BUILD[arch](), pk.TrainableTokens(token_indices=TOKENS))
    perturb(model, seed)
    return model


def saved_tensors(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "adapter_model.safetensors"))


def test_formula_rows_replaced_and_embedding_options_kept() -> None:
    torch.manual_seed(0)
    base = nn.Embedding(10, 4, padding_idx=0).requires_grad_(False)
    layer = TrainableTokensLayer(base)
    layer.add("a", [2, 3])
    layer.add("b", [7])
    x = torch.tensor([[0, 2, 3, 7, 9]])
    assert torch.equal(layer(x), base(x))  # not active yet
    layer.set_active(["a"])
    assert torch.equal(layer(x), base(x))  # initialised to the current rows: a no-op
    with torch.no_grad():
        layer.trainable_tokens_delta["a"].copy_(torch.randn(2, 4))
        layer.trainable_tokens_delta["b"].copy_(torch.randn(1, 4))
    layer.set_active(["a", "b"])
    table = base.weight.detach().clone()
    table[[2, 3]] = layer.trainable_tokens_delta["a"].detach()
    table[7] = layer.trainable_tokens_delta["b"].detach()[0]
    assert torch.equal(layer(x), F.embedding(x, table, padding_idx=0))
    layer(x).sum().backward()
    assert base.weight.grad is None
    assert torch.equal(layer.trainable_tokens_delta["a"].grad, torch.ones(2, 4))  # one use of each token


@pytest.mark.parametrize("arch", list(BUILD))
def test_hf_peft_file_loads_with_hf_logits_and_is_written_back_identically(arch: str, tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    hf = peft.get_peft_model(BUILD[arch](), peft.TrainableTokensConfig(token_indices=TOKENS))
    perturb(hf)
    hf.eval().save_pretrained(str(tmp_path / "hf"))
    ours = pk.load_adapter(BUILD[arch](), tmp_path / "hf")
    expected = logits(hf)
    assert not torch.allclose(expected, logits(BUILD[arch]()), atol=1e-3)
    assert torch.allclose(logits(ours), expected, atol=1e-5)

    pk.save_adapter(ours, tmp_path / "pk")
    theirs, mine = saved_tensors(tmp_path / "hf"), saved_tensors(tmp_path / "pk")
    assert sorted(mine) == sorted(theirs)
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs)
    tied_key = "base_model.model.lm_head.trainable_tokens_delta"
    assert (tied_key in theirs) == TIED[arch]  # HF PEFT saves the tied output layer's rows a second time


@pytest.mark.parametrize("arch", list(BUILD))
def test_peftkit_file_loads_in_hf_peft_with_the_same_logits(arch: str, tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    model = adapted(arch)
    pk.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "TRAINABLE_TOKENS" and config["token_indices"] == TOKENS
    assert config["target_modules"] == EMBEDDING[arch] and config["init_weights"] is True
    mine = saved_tensors(tmp_path)
    assert sorted(mine) == sorted(
        [f"base_model.model.{EMBEDDING[arch]}.trainable_tokens_delta"]
        + (["base_model.model.lm_head.trainable_tokens_delta"] if TIED[arch] else [])
    )
    hf = peft.PeftModel.from_pretrained(BUILD[arch](), str(tmp_path)).eval()
    assert torch.allclose(logits(hf), logits(model), atol=1e-5)
    reference = peft.get_peft_model(BUILD[arch](), peft.TrainableTokensConfig(token_indices=TOKENS))
    assert pk.count_parameters(model) == tuple(reference.get_nb_trainable_parameters())


@pytest.mark.parametrize("arch", ["llama_tied", "gpt2"])
def test_tied_output_layer_uses_the_same_parameter(arch: str) -> None:
    model = adapted(arch)
    embedding = model.get_input_embeddings()
    assert isinstance(embedding, TrainableTokensLayer) and isinstance(model.lm_head, TrainableTokensLayer)
    assert model.lm_head.trainable_tokens_delta["default"] is embedding.trainable_tokens_delta["default"]
    # The logits of the selected tokens are the final hidden state times the trained rows.
    hidden = model(input_ids=IDS, output_hidden_states=True).hidden_states[-1].detach()
    rows = embedding.trainable_tokens_delta["default"].detach()
    assert torch.allclose(logits(model)[..., TOKENS], hidden @ rows.T, atol=1e-5)
    pk.delete_adapter(model, "default")
    assert not list(adapter_layers(model)) and model.lm_head.weight is model.get_input_embeddings().weight


def test_untied_output_layer_is_left_alone() -> None:
    model = adapted("llama")
    assert isinstance(model.lm_head, nn.Linear) and len(list(adapter_layers(model))) == 1


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_training_step_changes_only_the_selected_rows(arch: str) -> None:
    model = pk.apply(BUILD[arch](), pk.TrainableTokens(token_indices=TOKENS))
    layer = model.get_input_embeddings()
    frozen = layer.base_layer.weight.detach().clone()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable == [layer.trainable_tokens_delta["default"]]

    def effective() -> torch.Tensor:
        return layer(torch.arange(96)).detach()

    before = effective()
    assert torch.equal(before, frozen)  # a no-op until trained
    optimizer = torch.optim.SGD(trainable, lr=1.0)
    model(input_ids=IDS, labels=IDS).loss.backward()
    optimizer.step()
    after = effective()
    changed = sorted({int(i) for i in (after != before).any(dim=1).nonzero()})
    assert changed == TOKENS
    assert torch.equal(layer.base_layer.weight, frozen) and layer.base_layer.weight.grad is None


@pytest.mark.parametrize("arch", list(BUILD))
def test_merge_unmerge_unload_and_disable(arch: str) -> None:
    model = adapted(arch)
    base_logits = logits(BUILD[arch]())
    weight = model.get_input_embeddings().base_layer.weight
    original = weight.detach().clone()
    expected = logits(model)
    with pk.disable_adapters(model):
        assert torch.equal(logits(model), base_logits)
    pk.merge(model, safe=True)
    assert torch.equal(weight[TOKENS], model.get_input_embeddings().trainable_tokens_delta["default"].detach())
    assert torch.allclose(logits(model), expected, atol=1e-5)
    with pk.disable_adapters(model):  # merged adapters come out and go back in
        assert torch.equal(logits(model), base_logits)
    pk.unmerge(model)
    assert torch.equal(weight, original)
    assert torch.allclose(logits(model), expected, atol=1e-5)
    plain = pk.unload(model, merge=True)
    assert not list(adapter_layers(plain)) and isinstance(plain.get_input_embeddings(), nn.Embedding)
    assert torch.allclose(logits(plain), expected, atol=1e-5)


def test_several_adapters_switch_combine_and_round_trip(tmp_path: Path) -> None:
    model = pk.apply(BUILD["gpt2"](), pk.TrainableTokens(token_indices=[1, 2]), name="a")
    pk.apply(model, pk.TrainableTokens(token_indices=[3]), name="b")
    pk.apply(model, pk.TrainableTokens(token_indices=[2, 4]), name="c")
    perturb(model)  # only the active adapter "a" is trainable
    pk.set_adapter(model, "b")
    perturb(model, seed=1)
    pk.set_adapter(model, "c")
    perturb(model, seed=2)
    outputs = {}
    for name in ("a", "b", "c"):
        pk.set_adapter(model, name)
        outputs[name] = logits(model)
    assert not torch.allclose(outputs["a"], outputs["b"], atol=1e-3)
    pk.set_adapter(model, ["a", "b"])
    both = logits(model)
    assert not torch.allclose(both, outputs["a"], atol=1e-3) and not torch.allclose(both, outputs["b"], atol=1e-3)
    with pytest.raises(AdapterStateError, match=r"'a' and 'c' both replace token 2"):
        pk.set_adapter(model, ["a", "c"])  # refused before anything changes
    assert pk.active_adapters(model) == ["a", "b"]
    assert torch.equal(logits(model), both)

    pk.set_adapter(model, ["a", "b"])
    pk.save_adapter(model, tmp_path)
    loaded = pk.load_adapter(BUILD["gpt2"](), tmp_path / "a", name="a")
    pk.load_adapter(loaded, tmp_path / "b", name="b")
    pk.set_adapter(loaded, ["a", "b"])
    assert torch.allclose(logits(loaded), both, atol=1e-6)
    pk.delete_adapter(model, "a")
    pk.set_adapter(model, "c")
    assert torch.allclose(logits(model), outputs["c"], atol=1e-6)


def test_random_initialisation() -> None:
    model = pk.apply(build("llama"), pk.TrainableTokens(token_indices=TOKENS, init_weights=False))
    layer = model.get_input_embeddings()
    assert not torch.allclose(layer.trainable_tokens_delta["default"], layer.base_layer.weight[TOKENS])
    assert torch.equal(layer.original("default"), layer.base_layer.weight[TOKENS])


def _untouched(model: nn.Module) -> None:
    assert not list(adapter_layers(model)) and not get_state(model).configs
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize(("indices", "message"), [
    ([], r"token_indices=\[\] must be a non-empty list"),
    ([3, -1], r"not token ids: \[-1\]"),
    ([3, True], r"not token ids: \[True\]"),
    ([3, 3], r"lists \[3\] more than once"),
])
def test_invalid_token_indices(indices: list[int], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        pk.TrainableTokens(token_indices=indices)


def test_index_outside_the_vocabulary_is_refused_before_the_model_changes() -> None:
    model = build("llama")
    with pytest.raises(ConfigError, match=r"token_indices \[96, 100\] are out of range for model.embed_tokens, "
                                          r"which has 96 tokens .*resize_token_embeddings"):
        pk.apply(model, pk.TrainableTokens(token_indices=[1, 96, 100]))
    _untouched(model)


def test_a_target_that_is_neither_an_embedding_nor_a_linear_layer_is_refused() -> None:
    model = build("llama")
    with pytest.raises(UnsupportedLayerError, match=r"'input_layernorm' matches only modules of type LlamaRMSNorm"
                                                    r".*Embedding, Linear"):
        pk.apply(model, pk.TrainableTokens(token_indices=[1], target_modules=["input_layernorm"]))
    _untouched(model)
    with pytest.raises(ConfigError, match="has no get_input_embeddings"):
        pk.apply(nn.Sequential(nn.Embedding(4, 2)), pk.TrainableTokens(token_indices=[1]))
    explicit = pk.apply(nn.Sequential(nn.Embedding(4, 2)), pk.TrainableTokens(token_indices=[1], target_modules="0"))
    assert isinstance(explicit[0], TrainableTokensLayer)


def test_tied_output_layer_held_by_another_method_is_refused() -> None:
    model = pk.apply(tied_llama(), pk.LoRA(target_modules=["lm_head"]), name="lora")
    with pytest.raises(ConfigError, match=r"lm_head shares its weight with the input embedding .* LoRALinear"):
        pk.apply(model, pk.TrainableTokens(token_indices=[1]), name="tokens")
    assert isinstance(model.get_input_embeddings(), nn.Embedding) and list(get_state(model).configs) == ["lora"]


def test_loading_rows_of_the_wrong_shape_leaves_the_model_unchanged(tmp_path: Path) -> None:
    pk.save_adapter(adapted("llama"), tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["token_indices"] = TOKENS[:2]
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    model = build("llama")
    with pytest.raises(ShapeMismatchError, match=r"trainable_tokens_delta: the file holds shape \(4, 32\) but the "
                                                 r"model needs \(2, 32\)"):
        pk.load_adapter(model, tmp_path)
    _untouched(model)
    assert torch.equal(logits(model), logits(build("llama")))


# -- LoRA's trainable_token_indices ------------------------------------------------------------------------
LORA_TARGETS = {"llama": ["q_proj", "v_proj"], "llama_tied": ["q_proj", "v_proj"], "gpt2": ["c_attn"]}


@pytest.mark.parametrize("arch", list(BUILD))
@pytest.mark.parametrize("as_dict", [False, True])
def test_lora_trainable_tokens_match_hf_peft_both_ways(arch: str, as_dict: bool, tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    leaf = EMBEDDING[arch].rsplit(".", 1)[-1]
    spec = {leaf: TOKENS} if as_dict else TOKENS
    hf = peft.get_peft_model(BUILD[arch](), peft.LoraConfig(target_modules=LORA_TARGETS[arch],
                                                            trainable_token_indices=spec))
    perturb(hf)
    hf.eval().save_pretrained(str(tmp_path / "hf"))
    ours = pk.load_adapter(BUILD[arch](), tmp_path / "hf")
    assert isinstance(ours.get_input_embeddings(), TrainableTokensLayer)
    assert isinstance(ours.lm_head, TrainableTokensLayer) == TIED[arch]
    assert torch.allclose(logits(ours), logits(hf), atol=1e-5)
    pk.save_adapter(ours, tmp_path / "back")
    theirs, mine = saved_tensors(tmp_path / "hf"), saved_tensors(tmp_path / "back")
    assert f"base_model.model.{EMBEDDING[arch]}.token_adapter.trainable_tokens_delta" in mine
    assert sorted(mine) == sorted(theirs) and all(torch.equal(mine[k], theirs[k]) for k in theirs)

    model = pk.apply(BUILD[arch](), pk.LoRA(target_modules=LORA_TARGETS[arch], trainable_token_indices=spec))
    assert pk.count_parameters(model) == tuple(
        peft.get_peft_model(BUILD[arch](), peft.LoraConfig(target_modules=LORA_TARGETS[arch],
                                                           trainable_token_indices=spec)).get_nb_trainable_parameters())
    perturb(model, seed=3)
    expected = logits(model)
    pk.save_adapter(model, tmp_path / "pk")
    assert json.loads((tmp_path / "pk" / "adapter_config.json").read_text())["trainable_token_indices"] == spec
    back = peft.PeftModel.from_pretrained(BUILD[arch](), str(tmp_path / "pk")).eval()
    assert torch.allclose(logits(back), expected, atol=1e-5)
    pk.merge(model)
    assert torch.allclose(logits(model), expected, atol=1e-5)
    plain = pk.unload(model, merge=True)
    assert not list(adapter_layers(plain)) and torch.allclose(logits(plain), expected, atol=1e-5)


def test_lora_trainable_tokens_conflicts_are_refused_before_the_model_changes() -> None:
    model = build("llama")
    with pytest.raises(ConfigError, match=r"model.embed_tokens is a LoRA target and an embedding in "
                                          r"trainable_token_indices"):
        pk.apply(model, pk.LoRA(target_modules=["q_proj", "embed_tokens"], trainable_token_indices=[1]))
    _untouched(model)
    tied = tied_llama()
    with pytest.raises(ConfigError, match=r"lm_head is a LoRA target and tied to an embedding"):
        pk.apply(tied, pk.LoRA(target_modules=["q_proj", "lm_head"], trainable_token_indices=[1]))
    _untouched(tied)
    with pytest.raises(ConfigError, match=r"token_indices \[100\] are out of range for model.embed_tokens"):
        pk.apply(model, pk.LoRA(target_modules=["q_proj"], trainable_token_indices={"embed_tokens": [1, 100]}))
    _untouched(model)
    with pytest.raises(ConfigError, match=r"trainable_token_indices\['embed_tokens'\]=\[\] must be a non-empty"):
        pk.LoRA(target_modules=["q_proj"], trainable_token_indices={"embed_tokens": []})


def test_lora_file_whose_config_names_tokens_it_lacks_is_refused(tmp_path: Path) -> None:
    model = pk.apply(build("llama"), pk.LoRA(target_modules=["q_proj"]))
    pk.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["trainable_token_indices"] = [1, 2]
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    fresh = build("llama")
    with pytest.raises(CheckpointError, match=r"missing keys \['base_model.model.model.embed_tokens.token_adapter"):
        pk.load_adapter(fresh, tmp_path)
    _untouched(fresh)


@pytest.mark.parametrize("kind", ["embedding", "tied linear"])
def test_row_and_column_paths_equal_the_updated_table(kind: str) -> None:
    """The forward that replaces only the trained rows (or logit columns) equals the base layer's forward on the
    whole updated table, values and gradients, for two adapters at once and repeated tokens."""
    torch.manual_seed(0)
    base: nn.Module = nn.Embedding(50, 8) if kind == "embedding" else nn.Linear(8, 50)
    layer = TrainableTokensLayer(base.requires_grad_(False))
    layer.add("a", [3, 7, 49])
    layer.add("b", [0, 11])
    layer.set_active(["a", "b"])
    with torch.no_grad():
        for delta in layer.trainable_tokens_delta.values():
            delta.add_(torch.randn_like(delta))
    x = torch.tensor([[3, 3, 0, 5], [49, 11, 7, 2]]) if kind == "embedding" else torch.randn(2, 4, 8)
    outs, grads = [], []
    for forward in (layer, lambda t: layer._on_updated_table(t, ["a", "b"])):
        inp = x if kind == "embedding" else x.clone().requires_grad_(True)
        out = forward(inp)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        outs.append(out.detach())
        grads.append([p.grad.clone() for p in layer.trainable_tokens_delta.values()]
                     + ([] if kind == "embedding" else [inp.grad]))
        for p in layer.trainable_tokens_delta.values():
            p.grad = None
    torch.testing.assert_close(outs[0], outs[1])
    for ours, reference in zip(grads[0], grads[1], strict=True):
        torch.testing.assert_close(ours, reference)


def test_an_untied_output_layer_as_target_matches_hf_peft_both_ways(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    from transformers import LlamaConfig, LlamaForCausalLM

    def untied() -> nn.Module:
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, vocab_size=96,
                                            tie_word_embeddings=False)).eval()

    hf = peft.get_peft_model(untied(), peft.TrainableTokensConfig(target_modules=["lm_head"], token_indices=TOKENS))
    with torch.no_grad():
        for p in hf.parameters():
            if p.requires_grad:
                p.normal_()
    hf.save_pretrained(str(tmp_path / "hf"))
    with torch.no_grad():
        expected = hf(input_ids=IDS).logits
    ours = pk.load_adapter(untied(), tmp_path / "hf")
    base = untied()
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=IDS).logits, expected, rtol=0, atol=1e-6)
        assert not torch.equal(expected, base(input_ids=IDS).logits)
        columns = [i for i in range(96) if i not in TOKENS]  # every other logit is the base model's
        torch.testing.assert_close(ours(input_ids=IDS).logits[..., columns], base(input_ids=IDS).logits[..., columns])
        pk.merge(ours)
        torch.testing.assert_close(ours(input_ids=IDS).logits, expected, rtol=0, atol=1e-5)
        pk.unmerge(ours)
        assert torch.equal(ours.lm_head.base_layer.weight, base.lm_head.weight)
    pk.save_adapter(ours, tmp_path / "pk")
    assert load_file(str(tmp_path / "pk" / "adapter_model.safetensors")).keys() == load_file(
        str(tmp_path / "hf" / "adapter_model.safetensors")).keys()
    back = peft.PeftModel.from_pretrained(untied(), str(tmp_path / "pk")).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=IDS).logits, expected, rtol=0, atol=1e-6)


def test_an_output_layer_tied_to_the_embedding_is_refused_as_target() -> None:
    model = tied_llama()
    with pytest.raises(ConfigError, match=r"lm_head shares its weight with the input embedding model.embed_tokens.*"
                                          r"target 'model.embed_tokens' instead"):
        pk.apply(model, pk.TrainableTokens(token_indices=[1], target_modules=["lm_head"]))
    assert type(model.lm_head) is nn.Linear and not get_state(model).configs
