"""X-LoRA against HF PEFT: the classifier's initialisation, the two-pass forward for every scaling option, gradients,
files both ways (peftkit's and an HF PEFT-saved X-LoRA directory), several adapters, disabling, refused merging and
layers, and where peftkit deliberately differs, on a tiny Llama."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, cast

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import peftkit as pk
from peftkit.errors import ConfigError, MergeError, UnknownFieldError, UnsupportedLayerError
from peftkit.methods.xlora import ATTR, KEY_PREFIX
from peftkit.train.config import PEFT_METHODS

from models import build, run

peft = pytest.importorskip("peft")

#: Two LoRA experts on different layers and ranks, one with dropout (inactive in evaluation).
EXPERTS: list[dict[str, Any]] = [
    {"target_modules": ["q_proj", "v_proj"], "r": 2, "lora_alpha": 4},
    {"target_modules": ["q_proj", "down_proj"], "r": 3, "lora_alpha": 5, "lora_dropout": 0.1},
]


def base() -> nn.Module:
    model: Any = build("llama")
    model.config.use_cache = False  # HF PEFT's X-LoRA refuses a model that caches
    return cast(nn.Module, model)


def save_expert(path: Path, fields: dict[str, Any], seed: int) -> str:
    torch.manual_seed(seed)
    model = peft.get_peft_model(base(), peft.LoraConfig(**fields))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.3)
    model.save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="module")
def experts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("experts")
    return {str(i): save_expert(root / f"e{i}", fields, seed=10 + i) for i, fields in enumerate(EXPERTS)}


def pair(experts: dict[str, str], seed: int = 1, **fields: Any) -> tuple[nn.Module, Any]:
    """peftkit's and HF PEFT's X-LoRA models over the same experts, from the same global seed."""
    ours, theirs = base(), base()
    torch.manual_seed(seed)
    pk.apply(ours, pk.XLoRA(adapters=experts, **fields))
    torch.manual_seed(seed)
    hf = peft.get_peft_model(theirs, peft.XLoraConfig(task_type="CAUSAL_LM", hidden_size=32, adapters=experts,
                                                       **fields)).eval()
    return ours.eval(), hf


def classifier(model: nn.Module, name: str = "default") -> nn.Module:
    return getattr(model, ATTR)[name]  # type: ignore[no-any-return]


def hf_classifier(hf: Any) -> nn.Module:
    return hf.base_model.internal_xlora_classifier  # type: ignore[no-any-return]


def randomized(ours: nn.Module, hf: Any, seed: int = 0) -> None:
    """Random classifier tensors in ``ours``, copied into ``hf``, so the scalings are far from uniform."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in classifier(ours).parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
        hf_classifier(hf).load_state_dict(classifier(ours).state_dict())


OPTIONS = [
    {},
    {"xlora_depth": 3, "xlora_size": 8, "layerwise_scalings": True, "softmax_temperature": 0.5},
    {"top_k_lora": 1, "enable_softmax_topk": True, "enable_softmax": False},
    {"top_k_lora": 1, "scaling_pass_value": 0.5, "global_scaling_weight": 2.0, "xlora_depth": 2, "xlora_size": 6},
]


@pytest.mark.parametrize("fields", OPTIONS)
def test_initialisation_and_forward_match_hf(experts: dict[str, str], fields: dict[str, Any]) -> None:
    ours, hf = pair(experts, **fields)
    theirs = hf_classifier(hf).state_dict()
    mine = classifier(ours).state_dict()
    assert sorted(mine) == sorted(theirs)
    for key, value in theirs.items():
        assert torch.equal(mine[key], value), key
    randomized(ours, hf)
    with torch.no_grad():
        out = run(ours, "llama")
        torch.testing.assert_close(out, run(hf, "llama"), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(classifier(ours).latest, hf.base_model.get_latest_scalings())
        assert not torch.allclose(out, run(base(), "llama"), atol=1e-3)  # the experts do change the output
        with pk.disable_adapters(ours):
            assert torch.equal(run(ours, "llama"), run(base(), "llama"))


def test_gradients_and_trainable_parameters_match_hf(experts: dict[str, str]) -> None:
    ours, hf = pair(experts, xlora_depth=2, xlora_size=8, xlora_dropout_p=0.0)
    assert pk.count_parameters(ours) == tuple(hf.get_nb_trainable_parameters())
    randomized(ours, hf)
    run(ours, "llama").square().sum().backward()
    run(hf, "llama").square().sum().backward()
    trained = {k: p for k, p in ours.named_parameters() if p.requires_grad}
    theirs = {k: p for k, p in hf.named_parameters() if p.requires_grad}
    assert sorted(k.removeprefix(f"{ATTR}.default.") for k in trained) == sorted(
        k.removeprefix("base_model.internal_xlora_classifier.") for k in theirs)
    for key, p in trained.items():
        other = theirs["base_model.internal_xlora_classifier." + key.removeprefix(f"{ATTR}.default.")]
        torch.testing.assert_close(p.grad, other.grad, rtol=1e-4, atol=1e-6)


def test_trainable_experts(experts: dict[str, str]) -> None:
    model = pk.apply(base(), pk.XLoRA(adapters=experts, use_trainable_adapters=True))
    trained = [k for k, p in model.named_parameters() if p.requires_grad]
    assert any(".lora_A.default-0." in k for k in trained) and any(".lora_B.default-1." in k for k in trained)
    frozen = pk.apply(base(), pk.XLoRA(adapters=experts))
    assert all(k.startswith(ATTR) for k, p in frozen.named_parameters() if p.requires_grad)


def test_files_load_in_hf(experts: dict[str, str], tmp_path: Path) -> None:
    ours, hf = pair(experts, xlora_depth=2, xlora_size=8)
    randomized(ours, hf)
    pk.save_adapter(ours, tmp_path / "x")
    hf.save_pretrained(str(tmp_path / "hf"))
    data = json.loads((tmp_path / "x" / "adapter_config.json").read_text())
    theirs = json.loads((tmp_path / "hf" / "adapter_config.json").read_text())
    assert sorted(set(data) - {"peft_version"}) == sorted(set(theirs) - {"peft_version"})
    assert {k: v for k, v in data.items() if k not in ("adapters", "peft_version")} == {
        k: v for k, v in theirs.items() if k not in ("adapters", "peft_version")}
    assert data["adapters"] == {k: str((tmp_path / "x" / k).resolve()) for k in experts}
    assert sorted(pk.list_adapters(ours)) == ["default", "default-0", "default-1"]
    keys = sorted(load_file(str(tmp_path / "x" / "adapter_model.safetensors")))
    assert keys == sorted(KEY_PREFIX + k for k in classifier(ours).state_dict())
    # every key HF PEFT writes (it leaves layers.0 out, see test_hf_saved_directory_loads)
    assert set(load_file(str(tmp_path / "hf" / "adapter_model.safetensors"))) < set(keys)
    for key in experts:  # each expert a LoRA adapter HF PEFT reads, beside the config
        assert json.loads((tmp_path / "x" / key / "adapter_config.json").read_text())["peft_type"] == "LORA"
        assert sorted(load_file(str(tmp_path / "x" / key / "adapter_model.safetensors"))) == sorted(
            load_file(str(Path(experts[key]) / "adapter_model.safetensors")))
    # HF PEFT rebuilds the experts from the saved directories and reads every classifier tensor
    loaded = peft.PeftModel.from_pretrained(base(), str(tmp_path / "x")).eval()
    with torch.no_grad():
        torch.testing.assert_close(run(loaded, "llama"), run(ours, "llama"), rtol=1e-5, atol=1e-6)
    # moved elsewhere, peftkit finds the experts beside the config
    (tmp_path / "x").rename(tmp_path / "moved")
    again = pk.load_adapter(base().eval(), tmp_path / "moved")
    with torch.no_grad():
        torch.testing.assert_close(run(again, "llama"), run(ours, "llama"), rtol=1e-5, atol=1e-6)


def test_hf_saved_directory_loads(experts: dict[str, str], tmp_path: Path) -> None:
    _, hf = pair(experts, xlora_depth=2, xlora_size=8)
    with torch.no_grad():
        for p in hf_classifier(hf).parameters():
            p.add_(torch.randn_like(p))
    hf.save_pretrained(str(tmp_path / "hf"))
    # HF PEFT 0.21.2 leaves layers.0 out of its own file (its expert "0" filter); its loader keeps the initial values
    torch.manual_seed(5)
    theirs = peft.PeftModel.from_pretrained(base(), str(tmp_path / "hf")).eval()
    torch.manual_seed(5)
    ours = pk.load_adapter(base().eval(), tmp_path / "hf")
    for key, value in hf_classifier(theirs).state_dict().items():
        assert torch.equal(classifier(ours).state_dict()[key], value), key
    with torch.no_grad():
        torch.testing.assert_close(run(ours, "llama"), run(theirs, "llama"), rtol=1e-5, atol=1e-6)


def test_several_adapters(experts: dict[str, str]) -> None:
    model = base().eval()
    pk.apply(model, pk.XLoRA(adapters=experts))
    pk.apply(model, pk.XLoRA(adapters={"a": experts["1"]}, enable_softmax=False), name="other")
    with torch.no_grad():
        for p in classifier(model, "other").parameters():
            p.normal_()
        first = run(model, "llama")
        pk.set_adapter(model, "other")
        second = run(model, "llama")
        assert not torch.allclose(first, second)
        # "other" alone: expert "a" weighted by its classifier's logit, as a single-expert HF PEFT model
        solo, hf = pair({"0": experts["1"]}, enable_softmax=False)
        hf_classifier(hf).load_state_dict(classifier(model, "other").state_dict())
        torch.testing.assert_close(second, run(hf, "llama"), rtol=1e-5, atol=1e-6)
        pk.delete_adapter(model, "other")
        assert sorted(pk.list_adapters(model)) == ["default", "default-0", "default-1"]
        pk.set_adapter(model, "default")
        torch.testing.assert_close(run(model, "llama"), first)
        pk.delete_adapter(model, "default")
        assert pk.list_adapters(model) == [] and not hasattr(model, ATTR)
        assert torch.equal(run(model, "llama"), run(base(), "llama"))


def test_merge_refused_and_unload(experts: dict[str, str]) -> None:
    model = pk.apply(base(), pk.XLoRA(adapters=experts))
    with pytest.raises(MergeError, match="X-LoRA.*cannot be merged"):
        pk.merge(model)
    with pytest.raises(MergeError, match="cannot be merged"):
        pk.unload(model, merge=True)
    plain = pk.unload(model, merge=False)
    assert not hasattr(plain, ATTR) and not plain._forward_pre_hooks
    assert torch.equal(run(plain, "llama"), run(base(), "llama"))


def test_embedding_experts_match_hf(experts: dict[str, str], tmp_path: Path) -> None:
    embedding = save_expert(tmp_path / "emb", {"target_modules": ["embed_tokens", "q_proj"], "r": 2}, seed=3)
    ours, hf = pair({"0": experts["0"], "1": embedding}, layerwise_scalings=True)
    randomized(ours, hf)
    with torch.no_grad():
        torch.testing.assert_close(run(ours, "llama"), run(hf, "llama"), rtol=1e-5, atol=1e-6)


def test_unsupported_experts_refused(experts: dict[str, str], tmp_path: Path) -> None:
    pk.apply(dora := base(), pk.DoRA(target_modules=["q_proj"], rank=2))
    pk.save_adapter(dora, tmp_path / "dora")  # a LORA adapter with use_dora
    model = base()
    with pytest.raises(UnsupportedLayerError, match="q_proj.*nn.Linear.*not DoRA"):
        pk.apply(model, pk.XLoRA(adapters={"0": experts["0"], "1": str(tmp_path / "dora")}))
    assert pk.list_adapters(model) == [] and not hasattr(model, ATTR)  # left as it was
    vera = tmp_path / "vera"
    peft.get_peft_model(base(), peft.VeraConfig(target_modules=["q_proj"], r=2)).save_pretrained(str(vera))
    with pytest.raises(ConfigError, match="VERA adapter.*LoRA"):
        pk.apply(base(), pk.XLoRA(adapters={"0": str(vera)}))


@pytest.mark.parametrize(("fields", "match"), [
    ({"adapters": {}}, "adapters=.*expert keys"),
    ({"xlora_depth": 0}, "xlora_depth=0 must be a positive integer"),
    ({"xlora_dropout_p": 1.0}, r"xlora_dropout_p=1.0 must be in \[0, 1\)"),
    ({"softmax_temperature": 0.0}, "softmax_temperature=0.0 must be positive"),
    ({"top_k_lora": 3}, r"top_k_lora=3 .*\[1, 2\]"),
    ({"hidden_size": 16}, "hidden_size=16 but the model's hidden size is 32"),
])
def test_config_errors(experts: dict[str, str], fields: dict[str, Any], match: str) -> None:
    model = base()
    with pytest.raises(ConfigError, match=match):
        pk.apply(model, pk.XLoRA(**{"adapters": experts, **fields}))
    assert pk.list_adapters(model) == []
    with pytest.raises(UnknownFieldError):
        pk.XLoRA(adapters=experts, rank=4)  # type: ignore[call-arg]


def test_generation_without_a_cache(experts: dict[str, str]) -> None:
    model: Any = pk.apply(build("llama"), pk.XLoRA(adapters=experts)).eval()  # config.use_cache=True is fine
    assert model.config.use_cache and not model.generation_config.use_cache  # generate defaults to no cache
    ids = torch.tensor([[1, 2, 3]])
    out = model.generate(ids, max_new_tokens=2, do_sample=False)
    assert out.shape == (1, 5)
    with torch.no_grad():
        step = model(input_ids=out[:, :4]).logits[:, -1].argmax(-1)
    assert torch.equal(step, out[:, 4])  # each token from a full two-pass call
    with pytest.raises(ConfigError, match="use_cache=False"):
        model.generate(ids, max_new_tokens=2, use_cache=True, do_sample=False)
    pk.delete_adapter(model, "default")
    assert model.generation_config.use_cache


def test_method_name() -> None:
    assert PEFT_METHODS["xlora"] == "XLoRA"


def test_copies_and_state_dicts(experts: dict[str, str]) -> None:
    ours, hf = pair(experts, xlora_depth=2, xlora_size=8)
    randomized(ours, hf)
    with torch.no_grad():
        want = run(ours, "llama")
        twin = copy.deepcopy(ours)
        torch.testing.assert_close(run(twin, "llama"), want, rtol=0, atol=0)
        with torch.no_grad():
            for p in classifier(twin).parameters():
                p.zero_()
        torch.testing.assert_close(run(ours, "llama"), want, rtol=0, atol=0)  # the copy computes on its own
        other = pk.apply(base(), pk.XLoRA(adapters=experts, xlora_depth=2, xlora_size=8)).eval()
        other.load_state_dict(ours.state_dict())
        torch.testing.assert_close(run(other, "llama"), want, rtol=0, atol=0)


def test_train_resume_eval_and_merge_on_the_command_line(tmp_path: Path, capsys: Any, monkeypatch: Any) -> None:
    from test_method_surfaces import _run_config, train_and_resume
    from transformers import LlamaConfig, LlamaForCausalLM

    from peftkit.cli.main import main

    from models import LLAMA_CONFIG

    config = LlamaConfig(**{k: v for k, v in LLAMA_CONFIG.items() if k != "model_type"})
    paths = {}
    for key, fields in enumerate(EXPERTS):
        model = pk.apply(LlamaForCausalLM(config), pk.LoRA(target_modules=fields["target_modules"], rank=2))
        pk.save_adapter(model, tmp_path / f"expert{key}")
        paths[str(key)] = str(tmp_path / f"expert{key}")
    run = _run_config(tmp_path, "xlora")
    run["peft"] = {"method": "xlora", "adapters": paths, "xlora_depth": 2, "xlora_size": 8}
    train_and_resume(run, tmp_path, monkeypatch)
    final = tmp_path / "xlora" / "final"
    a, b = (load_file(str(d / "adapter_model.safetensors")) for d in (final, tmp_path / "cut" / "final"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(k for k in a) == sorted(f"{KEY_PREFIX}layers.{i}.{p}" for i in (0, 3) for p in ("weight", "bias"))
    capsys.readouterr()
    assert main(["eval", "-p", str(final), "--json"]) == 0
    assert set(json.loads(capsys.readouterr().out)) == {"base", "adapted"}
    assert main(["merge", str(final), "--out", str(tmp_path / "merged")]) == 2
    assert "cannot be merged" in capsys.readouterr().err


def test_one_softmaxed_expert_is_plain_lora_on_gpt2_conv1d(tmp_path: Path) -> None:
    """λ = 1 for a single softmaxed expert: X-LoRA computes exactly its LoRA adapter (HF PEFT 0.21.2 cannot load
    experts of a model whose modules are not under ``model.``, such as GPT-2's ``transformer.``)."""
    torch.manual_seed(0)
    expert = peft.get_peft_model(build("gpt2"), peft.LoraConfig(target_modules=["c_attn", "c_fc"], r=2))
    with torch.no_grad():
        for name, p in expert.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.3)
    expert.save_pretrained(str(tmp_path / "e"))
    plain = pk.load_adapter(build("gpt2"), tmp_path / "e")
    mixed = pk.apply(build("gpt2"), pk.XLoRA(adapters={"only": str(tmp_path / "e")}, xlora_depth=2, xlora_size=4))
    mixed.eval()
    with torch.no_grad():
        torch.testing.assert_close(run(mixed, "gpt2"), run(plain, "gpt2"), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(run(plain, "gpt2"), run(build("gpt2"), "gpt2"), atol=1e-3)
