"""LoRA's ``layer_replication``: the block stack rebuilt from ranges of the original blocks before the adapter is added.

Adapters cross-load with HF PEFT both ways (Llama and BERT, whose stacks sit in different places) with the same
logits; the rebuilt stack matches HF PEFT's (shared base tensors, ``layer_idx``, the config's layer count); each
position trains its own adapter; invalid ranges and combinations are refused with the model left as it was.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import peftkit as pk
from peftkit.core.state import adapter_layers, get_state
from peftkit.errors import CheckpointError, ConfigError, MergeError, TargetNotFoundError
from peftkit.methods.lora_layers import LoRALayer
from peftkit.methods.lora_replication import find_stack, replication_of

from models import randomize_adapters, randomize_trainable

peft = pytest.importorskip("peft")

LAYER_MAP = [[0, 2], [1, 3]]  # three blocks become four: 0 1 1 2
ORDER = [0, 1, 1, 2]
IDS = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(1))


def llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=96,
                                        max_position_embeddings=64))


def bert() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    return BertForSequenceClassification(BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                                    num_attention_heads=4, vocab_size=96, max_position_embeddings=64,
                                                    num_labels=3))


QWEN2_TYPES = ["full_attention", "sliding_attention", "full_attention"]


def qwen2() -> nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=96,
                                        max_position_embeddings=64,
                                        use_sliding_window=True, sliding_window=3, layer_types=QWEN2_TYPES))


def gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=3, n_head=4, vocab_size=96, n_positions=64))


BUILDERS: dict[str, Callable[[], nn.Module]] = {"llama": llama, "bert": bert, "qwen2": qwen2, "gpt2": gpt2}
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "bert": ["query", "value"], "qwen2": ["q_proj", "o_proj"]}


def build(arch: str) -> nn.Module:
    torch.manual_seed(0)
    return BUILDERS[arch]().eval()


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def blocks(model: nn.Module) -> nn.ModuleList:
    path, _ = find_stack(model)
    stack: nn.ModuleList = model.get_submodule(path)  # type: ignore[assignment]
    return stack


def snapshot(model: nn.Module) -> tuple[dict[str, torch.Tensor], int, Any]:
    """Everything replication changes: the state dict (its keys name the blocks), the config's layer count, the
    record."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return state, model.config.num_hidden_layers, replication_of(model)


def assert_unchanged(model: nn.Module, before: tuple[dict[str, torch.Tensor], int, Any]) -> None:
    state, count, record = before
    after = model.state_dict()
    assert after.keys() == state.keys()
    assert all(torch.equal(after[k], v) for k, v in state.items())
    assert (model.config.num_hidden_layers, replication_of(model), len(blocks(model))) == (count, record, count)
    assert not list(adapter_layers(model)) and not get_state(model).configs


def hf_randomized(arch: str, **kwargs: Any) -> nn.Module:
    """An HF PEFT model with ``layer_replication`` whose every trainable tensor is random."""
    hf = peft.get_peft_model(build(arch), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[arch],
                                                          layer_replication=LAYER_MAP, **kwargs))
    return randomize_trainable(hf, scale=0.1, seed=3).eval()


# ------------------------------------------------------------------------------------ HF PEFT parity


@pytest.mark.parametrize("arch,kwargs", [("llama", {}), ("bert", {"task_type": "SEQ_CLS"}),
                                         ("llama", {"layers_to_transform": [2, 3], "use_dora": True})])
def test_hf_peft_adapter_loads_and_saves_back_exactly(arch: str, kwargs: dict[str, Any], tmp_path: Path) -> None:
    """HF PEFT's file → peftkit (same logits, same stack) → peftkit's file (same tensors) → HF PEFT (same logits)."""
    hf = hf_randomized(arch, **kwargs)
    hf.save_pretrained(str(tmp_path / "hf"))
    want = logits(hf)

    ours = pk.load_adapter(build(arch), tmp_path / "hf")
    torch.testing.assert_close(logits(ours), want, rtol=1e-5, atol=1e-6)
    theirs_model = hf.base_model.model
    assert ours.config.num_hidden_layers == theirs_model.config.num_hidden_layers == len(ORDER)
    assert sorted(n for n, m in adapter_layers(ours) if isinstance(m, LoRALayer)) == sorted(
        n for n, m in theirs_model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer))

    pk.save_adapter(ours, tmp_path / "pk")
    saved = json.loads((tmp_path / "pk" / "adapter_config.json").read_text())
    assert saved["layer_replication"] == LAYER_MAP
    theirs = load_file(str(tmp_path / "hf" / "adapter_model.safetensors"))
    mine = load_file(str(tmp_path / "pk" / "adapter_model.safetensors"))
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(tensor, theirs[key]) for key, tensor in mine.items())
    back = peft.PeftModel.from_pretrained(build(arch), str(tmp_path / "pk")).eval()
    torch.testing.assert_close(logits(back), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch,config", [
    ("llama", pk.LoRA(target_modules=TARGETS["llama"], rank=4, alpha=8, layer_replication=LAYER_MAP)),
    ("bert", pk.LoRA(target_modules=TARGETS["bert"], rank=4, alpha=8, layer_replication=LAYER_MAP)),
    # one repeat only (targets HF PEFT can only read as a regex of exact names), and DoRA
    ("llama", pk.LoRA(target_modules=["q_proj"], layers=[3], rank=2, layer_replication=LAYER_MAP)),
    ("llama", pk.DoRA(target_modules=["v_proj"], rank=2, layer_replication=LAYER_MAP)),
])
def test_peftkit_adapter_loads_in_hf_peft_and_back(arch: str, config: pk.LoRA, tmp_path: Path) -> None:
    ours = pk.apply(build(arch), config)
    randomize_adapters(ours, seed=4)
    want = logits(ours)
    assert not torch.allclose(want, logits(build(arch)))  # the adapters on the repeats matter
    pk.save_adapter(ours, tmp_path)
    hf = peft.PeftModel.from_pretrained(build(arch), str(tmp_path)).eval()
    torch.testing.assert_close(logits(hf), want, rtol=1e-5, atol=1e-6)
    again = pk.load_adapter(build(arch), tmp_path)
    torch.testing.assert_close(logits(again), want, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_stack_is_hf_peft_s_with_shared_base_tensors(arch: str) -> None:
    original = build(arch)
    before = list(blocks(original))
    ours = pk.apply(original, pk.LoRA(target_modules=TARGETS[arch], layer_replication=LAYER_MAP))
    theirs = peft.get_peft_model(build(arch), peft.LoraConfig(target_modules=TARGETS[arch],
                                                              layer_replication=LAYER_MAP)).base_model.model
    stack, hf_stack = blocks(ours), blocks(theirs)
    assert len(stack) == len(hf_stack) == len(ORDER)
    for position, (block, source) in enumerate(zip(stack, ORDER, strict=True)):
        assert block is not before[source]  # a new module at every position, as in HF PEFT
        assert _base_tensors(block) == _base_tensors(before[source])
        ours_idx = {n: m.layer_idx for n, m in block.named_modules() if hasattr(m, "layer_idx")}
        hf_idx = {n: m.layer_idx for n, m in hf_stack[position].named_modules() if hasattr(m, "layer_idx")}
        assert ours_idx == hf_idx and set(ours_idx.values()) == {position}
    # Base tensors are stored once: the replicated model holds as many of them as the original.
    assert len(set(_base_tensors(ours).values())) == len(set(_base_tensors(build(arch)).values()))


def test_blocks_follow_the_model_config() -> None:
    """The copies keep the model's config object (HF PEFT deep-copies it): later changes to it reach every block."""
    model = pk.apply(build("llama"), pk.LoRA(target_modules=["q_proj"], layer_replication=LAYER_MAP))
    assert all(block.self_attn.config is model.config for block in blocks(model))
    model.set_attn_implementation("eager")
    assert [block.self_attn.config._attn_implementation for block in blocks(model)] == ["eager"] * len(ORDER)


def _base_tensors(module: nn.Module) -> dict[str, int]:
    """Name (as before wrapping) → storage address of every parameter and buffer that is not an adapter's."""
    tensors = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
    return {k.replace(".base_layer", ""): t.untyped_storage().data_ptr()
            for k, t in tensors if "lora_" not in k and ".copies." not in k}  # not a modules_to_save copy


def test_cached_decoding_equals_the_full_forward() -> None:
    """Each position writes its own KV-cache slot (``layer_idx``): repeats of a block must not share one."""
    model = pk.apply(build("llama"), pk.LoRA(target_modules=TARGETS["llama"], layer_replication=LAYER_MAP))
    randomize_adapters(model, seed=5)
    full = logits(model)
    with torch.no_grad():
        out = model(input_ids=IDS[:, :4], use_cache=True)
        steps = [out.logits]
        for t in range(4, IDS.shape[1]):
            out = model(input_ids=IDS[:, t:t + 1], past_key_values=out.past_key_values, use_cache=True)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_each_position_trains_its_own_adapter() -> None:
    model = pk.apply(build("llama"), pk.LoRA(target_modules=["q_proj"], layer_replication=LAYER_MAP, init_B="gaussian"))
    model.train()
    base = {id(p): p.detach().clone() for p in model.parameters() if not p.requires_grad}
    layers = [block.self_attn.q_proj for block in blocks(model)]
    factors = [(layer.lora_A["default"].weight, layer.lora_B["default"].weight) for layer in layers]
    assert len({id(t) for pair in factors for t in pair}) == 2 * len(ORDER)  # no factor shared between positions
    start = [(a.detach().clone(), b.detach().clone()) for a, b in factors]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    out = model(input_ids=IDS, labels=IDS)
    out.loss.backward()
    for position, (a, b) in enumerate(factors):
        assert a.grad is not None and b.grad is not None and a.grad.abs().sum() > 0, position
    # The two positions of block 1 see different inputs, so their adapters get different gradients.
    assert not torch.allclose(factors[1][1].grad, factors[2][1].grad)  # type: ignore[arg-type]
    opt.step()
    assert all(not torch.equal(a, a0) for (a, _), (a0, _) in zip(factors, start, strict=True))
    assert all(p.grad is None and torch.equal(p, base[id(p)]) for p in model.parameters() if id(p) in base)


def test_layer_types_follow_the_blocks_and_round_trip(tmp_path: Path) -> None:
    """Qwen2 indexes ``config.layer_types`` per position (HF PEFT 0.21 leaves it short and fails there)."""
    model = pk.apply(build("qwen2"), pk.LoRA(target_modules=TARGETS["qwen2"], layer_replication=LAYER_MAP))
    assert model.config.layer_types == [QWEN2_TYPES[i] for i in ORDER]
    randomize_adapters(model, seed=6)
    want = logits(model)
    pk.save_adapter(model, tmp_path)
    torch.testing.assert_close(logits(pk.load_adapter(build("qwen2"), tmp_path)), want, rtol=0, atol=0)
    with pk.disable_adapters(model):  # position 2 (block 1 again) attends through a sliding window, like block 1
        torch.testing.assert_close(logits(model), logits(expanded_by_copying(build("qwen2"))), rtol=0, atol=0)


def expanded_by_copying(model: nn.Module) -> nn.Module:
    """``model`` with its blocks in ``ORDER`` as plain deep copies: what a replicated model must compute."""
    model.model.layers = nn.ModuleList(copy.deepcopy(model.model.layers[i]) for i in ORDER)
    for position, block in enumerate(model.model.layers):
        block.self_attn.layer_idx = position
    model.config.num_hidden_layers = len(ORDER)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in ORDER]
    return model


def test_a_quantized_base_shares_its_packed_weights() -> None:
    """Quantized layers keep their packed weights as buffers, which are shared too (HF PEFT copies buffers)."""
    def quantized() -> nn.Module:
        model = build("llama")
        pk.quantize(model, bits=4)
        return model

    model = pk.apply(quantized(), pk.LoRA(target_modules=["q_proj"], layer_replication=LAYER_MAP))
    stack = blocks(model)
    assert stack[1].mlp.up_proj.qweight is stack[2].mlp.up_proj.qweight
    assert stack[1].self_attn.q_proj.base_layer.qweight is stack[2].self_attn.q_proj.base_layer.qweight
    with pk.disable_adapters(model):
        torch.testing.assert_close(logits(model), logits(expanded_by_copying(quantized())), rtol=0, atol=0)


# ------------------------------------------------------------------------------------ several adapters, merge, unload


def test_second_adapter_shares_the_replication_and_saves_with_it(tmp_path: Path) -> None:
    model = pk.apply(build("llama"), pk.LoRA(target_modules=["q_proj"], layer_replication=LAYER_MAP))
    stack = list(blocks(model))
    pk.apply(model, pk.LoRA(target_modules=["v_proj"], layer_replication=LAYER_MAP), name="same")
    pk.apply(model, pk.LoRA(target_modules=["k_proj"], rank=2), name="none")
    assert list(blocks(model)) == stack  # not rebuilt a second time
    assert get_state(model).configs["none"].layer_replication == LAYER_MAP  # type: ignore[attr-defined]
    randomize_adapters(model, seed=7)
    pk.set_adapter(model, "none")
    want = logits(model)
    pk.save_adapter(model, tmp_path, name="none")
    assert json.loads((tmp_path / "adapter_config.json").read_text())["layer_replication"] == LAYER_MAP
    hf = peft.PeftModel.from_pretrained(build("llama"), str(tmp_path)).eval()
    torch.testing.assert_close(logits(hf), want, rtol=1e-5, atol=1e-6)
    mixed = pk.load_adapter(pk.apply(build("llama"), pk.LoRA(target_modules=["q_proj"], layer_replication=LAYER_MAP)),
                            tmp_path, name="none", activate=True)
    pk.set_adapter(mixed, "none")
    torch.testing.assert_close(logits(mixed), want, rtol=0, atol=0)


def test_merge_is_refused_and_unload_without_merge_and_delete_keep_the_stack() -> None:
    model = pk.apply(build("llama"), pk.LoRA(target_modules=["q_proj"], layer_replication=LAYER_MAP))
    pk.apply(model, pk.IA3(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]), name="ia3")
    randomize_adapters(model, seed=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for names in ("default", "ia3"):  # any method's adapter on the shared blocks, not only the replicating one
        with pytest.raises(MergeError, match=rf"\['{names}'\] sit on replicated blocks.*share their base weights.*"
                                             r"nothing was\s+merged.*pk\.unload\(model\)"):
            pk.merge(model, names)
        assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    pk.delete_adapter(model, "ia3")
    with pk.disable_adapters(model):
        base = logits(model)
    plain = pk.unload(model, merge=False)  # as HF PEFT: the replicated base model, weights still shared
    assert not list(adapter_layers(plain)) and len(blocks(plain)) == len(ORDER)
    assert blocks(plain)[1].self_attn.q_proj.weight is blocks(plain)[2].self_attn.q_proj.weight
    torch.testing.assert_close(logits(plain), base, rtol=0, atol=0)
    pk.apply(plain, pk.LoRA(target_modules=["v_proj"]), name="later")  # recorded with the stack it sits on
    assert get_state(plain).configs["later"].layer_replication == LAYER_MAP  # type: ignore[attr-defined]
    pk.delete_adapter(plain, "later")
    assert len(blocks(plain)) == len(ORDER) and replication_of(plain) is not None


def test_unload_with_merge_gives_every_position_its_own_weights(tmp_path: Path) -> None:
    """What ``peftkit merge`` writes: a plain model of the new depth, each repeat with its own merged update."""
    from transformers import AutoModelForCausalLM

    model = pk.apply(build("qwen2"), pk.LoRA(target_modules=TARGETS["qwen2"], layer_replication=LAYER_MAP))
    randomize_adapters(model, seed=8)
    want = logits(model)
    merged = pk.unload(model)
    stack = blocks(merged)
    assert not list(adapter_layers(merged)) and replication_of(merged) is None
    assert stack[1].self_attn.q_proj.weight is not stack[2].self_attn.q_proj.weight
    assert stack[1].mlp.up_proj.weight is not stack[2].mlp.up_proj.weight
    torch.testing.assert_close(stack[1].mlp.up_proj.weight, stack[2].mlp.up_proj.weight, rtol=0, atol=0)
    torch.testing.assert_close(logits(merged), want, rtol=1e-5, atol=1e-5)
    merged.save_pretrained(str(tmp_path))  # shared tensors would be refused here
    again = AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    assert again.config.num_hidden_layers == len(ORDER)
    assert again.config.layer_types == [QWEN2_TYPES[i] for i in ORDER]
    torch.testing.assert_close(logits(again), want, rtol=1e-5, atol=1e-5)


def test_convert_and_layouts_keep_the_replication(tmp_path: Path) -> None:
    model = pk.apply(build("llama"), pk.LoRA(target_modules=["linear_qkv"], rank=2, layer_replication=LAYER_MAP))
    randomize_adapters(model, seed=9)
    want = logits(model)
    pk.save_adapter(model, tmp_path, layout="canonical")
    assert json.loads((tmp_path / "adapter_config.json").read_text())["layer_replication"] == LAYER_MAP
    pk.convert(model, to="canonical")
    assert get_state(model).configs["default"].layer_replication == LAYER_MAP  # type: ignore[attr-defined]
    torch.testing.assert_close(logits(model), want, rtol=1e-5, atol=1e-6)


def test_inspect_shows_the_repeats_and_changes_nothing() -> None:
    model = build("llama")
    before = snapshot(model)
    report = pk.inspect(model, pk.LoRA(target_modules=["q_proj"], layer_replication=LAYER_MAP, layers=[3]))
    assert [row.name for row in report.rows] == ["model.layers.3.self_attn.q_proj"]
    assert_unchanged(model, before)


# ------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("value", [[], "0-4", [0, 4], [[0]], [[0, 1, 2]], [[2, 2]], [[3, 1]], [[-1, 2]],
                                   [[0, 1.5]], [[True, 2]], [["0", "2"]], {"0": 2}])
def test_invalid_ranges_are_refused_by_the_config(value: object) -> None:
    with pytest.raises(ConfigError, match=r"layer_replication=.*\[\[0, 4\], \[2, 5\]\]"):
        pk.LoRA(target_modules=["q_proj"], layer_replication=value)  # type: ignore[arg-type]


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2", "olora"])
def test_inits_that_rewrite_the_shared_base_weights_are_refused(init: str) -> None:
    model = build("llama")
    before = snapshot(model)
    with pytest.raises(ConfigError, match=rf"init='{init}' rewrites the weight of 'model.layers.1.self_attn.q_proj', "
                                          r"which \['model.layers.2.self_attn.q_proj'\] share"):
        pk.apply(model, pk.LoRA(target_modules=["q_proj"], layer_replication=LAYER_MAP, init=init))
    assert_unchanged(model, before)
    # Blocks that appear once (positions 0 and 3) own their weights: the residual changes nothing else.
    model = pk.apply(build("llama"), pk.LoRA(target_modules=["q_proj"], layers=[0, 3], layer_replication=LAYER_MAP,
                                             init=init))
    torch.testing.assert_close(logits(model), logits(expanded_by_copying(build("llama"))), rtol=0, atol=1e-5)


def test_an_init_outside_the_repeated_blocks_saves_and_loads_both_ways(tmp_path: Path) -> None:
    """A later adapter is recorded with the model's replication: PiSSA beside it must still load."""
    model = pk.apply(build("llama"), pk.LoRA(target_modules=["q_proj"], layer_replication=LAYER_MAP))
    pk.apply(model, pk.LoRA(target_modules=["lm_head"], rank=4, init="pissa"), name="pissa")
    pk.set_adapter(model, "pissa")
    randomize_adapters(model, seed=4)
    want = logits(model)
    pk.save_adapter(model, tmp_path, "pissa")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["init_lora_weights"], config["layer_replication"]) == ("pissa", LAYER_MAP)
    torch.testing.assert_close(logits(pk.load_adapter(build("llama"), tmp_path)), want, rtol=0, atol=1e-5)
    hf = peft.PeftModel.from_pretrained(build("llama"), str(tmp_path)).eval()
    torch.testing.assert_close(logits(hf), want, rtol=0, atol=1e-5)


def test_tuples_are_accepted_as_in_hf_peft() -> None:
    assert pk.LoRA(target_modules=["q_proj"], layer_replication=[(0, 2), (1, 3)]).layer_replication == LAYER_MAP  # type: ignore[list-item]


REFUSALS: list[tuple[str, Callable[[nn.Module], None], type[Exception], str]] = [
    ("llama", lambda m: pk.apply(m, pk.LoRA(target_modules=["q_proj"], layer_replication=[[0, 2], [1, 4]])),
     ConfigError, r"range \[1, 4\] reaches past the model's 3 blocks \(model\.layers\.0 … model\.layers\.2\)"),
    ("gpt2", lambda m: pk.apply(m, pk.LoRA(target_modules=["c_attn"], layer_replication=LAYER_MAP)),
     ConfigError, r"nn\.ModuleList at layers, encoder\.layer, h .*GPT2LMHeadModel has none"),
    # Checks after the stack is rebuilt put it back: a target that matches nothing, a modules_to_save typo.
    ("llama", lambda m: pk.apply(m, pk.LoRA(target_modules=["q_prj"], layer_replication=LAYER_MAP)),
     TargetNotFoundError, r"q_prj"),
    ("llama", lambda m: pk.apply(m, pk.LoRA(target_modules=["q_proj"], modules_to_save=["nope"],
                                            layer_replication=LAYER_MAP)), TargetNotFoundError, r"nope"),
]


@pytest.mark.parametrize("arch,call,error,match", REFUSALS)
def test_refusals_leave_the_model_as_it_was(arch: str, call: Callable[[nn.Module], None], error: type[Exception],
                                            match: str) -> None:
    model = build(arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=match):
        call(model)
    assert model.state_dict().keys() == before.keys() and not get_state(model).configs
    if arch == "llama":
        assert_unchanged(model, (before, 3, None))


def test_a_different_replication_or_one_after_other_adapters_is_refused() -> None:
    model = pk.apply(build("llama"), pk.LoRA(target_modules=["q_proj"], layer_replication=LAYER_MAP))
    stack = list(blocks(model))
    with pytest.raises(ConfigError, match=r"differs from the replication this model already has .*fresh base model"):
        pk.apply(model, pk.LoRA(target_modules=["q_proj"], layer_replication=[[0, 3], [2, 3]]), name="other")
    assert list(blocks(model)) == stack and pk.list_adapters(model) == ["default"]
    plain = pk.apply(build("llama"), pk.LoRA(target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match=r"must come with the model's first adapter.*\['default'\]"):
        pk.apply(plain, pk.LoRA(target_modules=["v_proj"], layer_replication=LAYER_MAP), name="b")
    assert len(blocks(plain)) == 3 and pk.list_adapters(plain) == ["default"]


def test_a_file_that_does_not_fit_leaves_the_model_as_it_was(tmp_path: Path) -> None:
    hf_randomized("llama").save_pretrained(str(tmp_path))
    weights = load_file(str(tmp_path / "adapter_model.safetensors"))
    from safetensors.torch import save_file

    save_file({k: v for k, v in weights.items() if ".layers.3." not in k}, str(tmp_path / "adapter_model.safetensors"))
    model = build("llama")
    before = snapshot(model)
    with pytest.raises(CheckpointError, match=r"missing keys .*layers\.3\."):
        pk.load_adapter(model, tmp_path)
    assert_unchanged(model, before)

    data = json.loads((tmp_path / "adapter_config.json").read_text())
    data["layer_replication"] = [[0, 5]]
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"range \[0, 5\] reaches past"):
        pk.load_adapter(model, tmp_path)
    assert_unchanged(model, before)


def test_fsdp_training_is_refused() -> None:
    from peftkit.train.config import config_from_dict
    from peftkit.train.distributed import init

    cfg = config_from_dict({"checkpoint": {"pretrained": {"config": {"model_type": "llama"}}},
                            "train": {"parallel": "fsdp"},
                            "peft": {"method": "lora", "target_modules": ["q_proj"], "layer_replication": LAYER_MAP}})
    with pytest.raises(ConfigError, match=r"peft\.layer_replication cannot run with train\.parallel='fsdp'.*ddp"):
        init(cfg)
