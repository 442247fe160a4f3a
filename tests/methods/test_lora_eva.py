"""EVA (``pk.LoRA(init="eva")`` then ``pk.init_eva``): factors, redistributed ranks and α against HF PEFT's
``initialize_lora_eva_weights`` on the same model, data and seed (Llama's ``nn.Linear``, GPT-2's ``Conv1D``), saved
adapters in both libraries, HF PEFT files of data-driven initialisations loading unchanged, and the refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import peftkit as pk
from peftkit.core.state import get_state
from peftkit.errors import AdapterNotFoundError, ConfigError

from models import build, lora_layers, randomize_adapters

peft = pytest.importorskip("peft")

IDS = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(5))
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_proj"]}


def batches(n: int = 4, seed: int = 3) -> list[dict[str, torch.Tensor]]:
    """Token batches with padding (attention_mask 0) and prompt tokens (labels -100), which EVA leaves out."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 96, (4, 12), generator=gen)
        mask = torch.ones_like(ids)
        mask[0, 9:] = 0
        labels = ids.clone()
        labels[:, :3] = -100
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def ours(arch: str, targets: list[str] | None = None, data: list | None = None, **kwargs: object) -> nn.Module:
    model = build(arch)
    torch.manual_seed(7)
    pk.apply(model, pk.LoRA(target_modules=targets or TARGETS[arch], rank=4, alpha=8, init="eva"))
    pk.init_eva(model, batches() if data is None else data, show_progress=False, **kwargs)  # type: ignore[arg-type]
    return model


def theirs(arch: str, targets: list[str] | None = None, data: list | None = None, **kwargs: object) -> nn.Module:
    model = build(arch)
    torch.manual_seed(7)
    hf_kwargs = {"adjust_scaling_factors" if k == "adjust_scaling" else k: v for k, v in kwargs.items()}
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets or TARGETS[arch], init_lora_weights="eva",
                             eva_config=peft.EvaConfig(**hf_kwargs))
    hf = peft.get_peft_model(model, config)
    peft.initialize_lora_eva_weights(hf, batches() if data is None else data, show_progress_bar=False)
    return hf.eval()


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


# ------------------------------------------------------------------------------------ HF PEFT parity


@pytest.mark.parametrize("arch,targets,kwargs", [
    ("llama", None, {"rho": 2.0, "tau": 0.8}),
    ("llama", ["q_proj", "down_proj"], {"rho": 1.5, "tau": 0.8, "whiten": True, "adjust_scaling": False}),
    ("gpt2", None, {"rho": 2.0, "tau": 0.8, "use_label_mask": False}),
])
def test_factors_ranks_and_scales_equal_hf_peft(arch: str, targets: list[str] | None, kwargs: dict) -> None:
    model, hf = ours(arch, targets, **kwargs), theirs(arch, targets, **kwargs)
    config, hf_config = get_state(model).configs["default"], hf.peft_config["default"]
    assert config.rank_pattern == hf_config.rank_pattern and config.rank_pattern  # type: ignore[attr-defined]
    assert config.alpha_pattern == hf_config.alpha_pattern  # type: ignore[attr-defined]
    assert bool(config.alpha_pattern) == kwargs.get("adjust_scaling", True)  # type: ignore[attr-defined]
    ranks = []
    for qualname, layer in lora_layers(model):
        other = hf.base_model.model.get_submodule(qualname)
        A, B = layer.factor_weights("default")
        torch.testing.assert_close(A, other.lora_A["default"].weight, rtol=1e-5, atol=1e-6)
        assert torch.equal(B, torch.zeros_like(B)) and A.abs().sum() > 0 and A.requires_grad and B.requires_grad
        assert layer.rank["default"] == other.r["default"]
        assert layer.scaling["default"] == pytest.approx(other.scaling["default"])
        ranks.append(layer.rank["default"])
    assert len(set(ranks)) > 1  # the ranks were redistributed
    torch.testing.assert_close(logits(model), logits(build(arch)), rtol=0, atol=0)  # B = 0: the base output


class Branches(nn.Module):
    """Two layers reading the same 16-dim input, ``b`` only its projection onto 4 dimensions: b's components
    explain far more of its variance than a's, so with rho=2 b takes the whole budget and a gets rank 0."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(16, 8), nn.Linear(16, 8)
        self.register_buffer("project", torch.diag(torch.tensor([1.0] * 4 + [0.0] * 12)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(x @ self.project)


def test_a_layer_given_no_rank_loses_its_adapter_as_in_hf_peft(tmp_path: Path) -> None:
    """Also tensor batches (every row counts) and a custom forward, against HF PEFT without its token masks; the
    saved adapter names the remaining target only, and loads in HF PEFT."""
    data = [torch.randn(32, 16, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    torch.manual_seed(0)
    model = pk.apply(Branches(), pk.LoRA(target_modules=["a", "b"], rank=2, alpha=4, init="eva"))
    ranks = pk.init_eva(model, data, rho=2.0, tau=0.9, forward=lambda m, x: m(x), show_progress=False)
    torch.manual_seed(0)
    hf = peft.get_peft_model(Branches(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["a", "b"],
                                                         init_lora_weights="eva", eva_config=peft.EvaConfig(tau=0.9)))
    peft.initialize_lora_eva_weights(hf, data, forward_fn=lambda m, x: m(x), prepare_model_inputs_fn=None,
                                     prepare_layer_inputs_fn=None, show_progress_bar=False)
    assert ranks == {"a": 0, "b": 4} and isinstance(model.a, nn.Linear) and not isinstance(hf.base_model.model.a,
                                                                                            peft.tuners.lora.LoraLayer)
    assert get_state(model).targets["default"] == ["b"]
    config = get_state(model).configs["default"]
    assert config.rank_pattern == hf.peft_config["default"].rank_pattern == {"b": 4}  # type: ignore[attr-defined]
    assert config.alpha_pattern == hf.peft_config["default"].alpha_pattern == {"b": 8.0}  # type: ignore[attr-defined]
    torch.testing.assert_close(model.b.lora_A["default"].weight, hf.base_model.model.b.lora_A["default"].weight,
                               rtol=1e-5, atol=1e-6)
    randomize_adapters(model, seed=1)
    pk.save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"] == ["b"]
    torch.manual_seed(0)
    loaded = peft.PeftModel.from_pretrained(Branches(), str(tmp_path)).eval()
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=1e-6)


def test_tensor_batches_use_every_token_and_a_custom_forward_runs_them() -> None:
    data = [b["input_ids"] for b in batches()]
    plain = ours("llama", ["q_proj"], data, rho=1.0, tau=0.9)
    calls: list[int] = []
    custom = ours("llama", ["q_proj"], data, rho=1.0, tau=0.9,
                  forward=lambda m, b: calls.append(1) or m(input_ids=b))
    assert calls
    for (_, a), (_, b) in zip(lora_layers(plain), lora_layers(custom), strict=True):
        assert torch.equal(a.factor_weights("default")[0], b.factor_weights("default")[0])
    masked = ours("llama", ["q_proj"], rho=1.0, tau=0.9)  # the same tokens minus padding and prompts
    assert not torch.equal(lora_layers(plain)[0][1].factor_weights("default")[0],
                           lora_layers(masked)[0][1].factor_weights("default")[0])


def test_mode_and_adapters_are_restored_and_progress_is_shown(capsys: pytest.CaptureFixture[str]) -> None:
    model = pk.apply(build("llama"), pk.LoRA(target_modules=["q_proj"], rank=2, init="eva")).train()
    pk.init_eva(model, batches(), rho=1.0, tau=0.9)
    assert model.training and not any(layer.disabled for _, layer in lora_layers(model))
    assert "EVA" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ files, both ways


def test_saved_adapter_loads_in_hf_peft_and_back_with_equal_logits(tmp_path: Path) -> None:
    model = ours("llama", rho=2.0, tau=0.9)
    randomize_adapters(model, seed=1)  # a trained adapter: B ≠ 0
    want = logits(model)
    pk.save_adapter(model, tmp_path / "pk")
    data = json.loads((tmp_path / "pk" / "adapter_config.json").read_text())
    assert data["init_lora_weights"] == "eva" and data["eva_config"]["rho"] == 2.0
    hf = peft.PeftModel.from_pretrained(build("llama"), str(tmp_path / "pk")).eval()
    torch.testing.assert_close(logits(hf), want, rtol=0, atol=1e-5)
    hf.save_pretrained(str(tmp_path / "hf"))
    back = pk.load_adapter(build("llama"), tmp_path / "hf")
    torch.testing.assert_close(logits(back), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("init,field,value", [("eva", "eva_config", {"rho": 2.0, "tau": 0.8, "whiten": True}),
                                              ("corda", "corda_config", {"corda_method": "kpm"})])
def test_hf_adapters_of_data_driven_inits_load_their_weights_unchanged(init: str, field: str, value: dict,
                                                                       tmp_path: Path) -> None:
    """The initialisation only happened when the adapter was created: loading takes the saved factors as they are
    (no data is needed, nothing is recomputed), and saving again keeps HF PEFT's fields."""
    hf = peft.get_peft_model(build("llama"), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"],
                                                              rank_pattern={"down_proj": 2}))
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for key, param in hf.named_parameters():
            if "lora_" in key:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    hf.save_pretrained(str(tmp_path / "hf"))
    path = tmp_path / "hf" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "init_lora_weights": init, field: value}))
    saved = load_file(tmp_path / "hf" / "adapter_model.safetensors")
    model = pk.load_adapter(build("llama"), tmp_path / "hf")
    for qualname, layer in lora_layers(model):
        A, B = layer.factor_weights("default")
        assert torch.equal(A, saved[f"base_model.model.{qualname}.lora_A.weight"])
        assert torch.equal(B, saved[f"base_model.model.{qualname}.lora_B.weight"])
    torch.testing.assert_close(logits(model), logits(hf.eval()), rtol=0, atol=1e-5)
    pk.save_adapter(model, tmp_path / "again")
    assert json.loads((tmp_path / "again" / "adapter_config.json").read_text())[field] == value


# ------------------------------------------------------------------------------------ refusals


def eva_model(**kwargs: object) -> nn.Module:
    return pk.apply(build("llama"), pk.LoRA(target_modules=["q_proj"], rank=4, init="eva", **kwargs))  # type: ignore[arg-type]


@pytest.mark.parametrize("make,args,kwargs,error,match", [
    (lambda: build("llama"), (batches(),), {}, AdapterNotFoundError,
     r"no adapter named 'default' on this model \(its adapters: none\); first pk.apply"),
    (eva_model, (batches(),), {"name": "other"}, AdapterNotFoundError, r"no adapter named 'other'.*\['default'\]"),
    (lambda: pk.apply(build("llama"), pk.LoRA(target_modules=["q_proj"])), (batches(),), {}, ConfigError,
     r"adapter 'default' has init=None; EVA initialises an adapter applied with pk.LoRA\(init='eva'"),
    (eva_model, ([],), {}, ConfigError, "got no batches: pass at least one batch"),
    (eva_model, (iter(batches()),), {}, ConfigError, r"pass a list or a DataLoader, not an iterator \(list_iterator\)"),
    (eva_model, (batches(),), {"rho": 0.5}, ConfigError, r"rho=0.5 must be a number >= 1"),
    (eva_model, (batches(),), {"tau": 1.5}, ConfigError, r"tau=1.5 must be in \[0, 1\]"),
    (eva_model, (batches(),), {"rho": 9.0}, ConfigError,
     r"'model.layers.0.self_attn.q_proj' has 32 input features, fewer than the 36 components rank × rho asks for"),
    (eva_model, ([{"input_ids": b["input_ids"][:1, :4]} for b in batches()],), {}, ConfigError,
     r"no batch has 8 selected tokens for 'model.layers.0.self_attn.q_proj'"),
    (eva_model, ([["not", "a", "batch"]],), {}, ConfigError, r"cannot run the model on a batch of type list"),
])
def test_bad_input_is_refused_before_the_model_changes(make: object, args: tuple, kwargs: dict, error: type,
                                                       match: str) -> None:
    model = make()  # type: ignore[operator]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=match):
        pk.init_eva(model, *args, show_progress=False, **kwargs)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(v, after[k]) for k, v in before.items())
    assert not any(m._forward_hooks for m in model.modules())


def test_eva_is_refused_where_it_cannot_apply() -> None:
    with pytest.raises(ConfigError, match=r"DoRA does not support init='eva'; use pk.LoRA"):
        pk.DoRA(target_modules=["q_proj"], init="eva")
    with pytest.raises(ConfigError, match=r"CanonicalLoRA does not support init='eva'; use pk.LoRA"):
        pk.CanonicalLoRA(target_modules=["linear_qkv"], init="eva")
    with pytest.raises(ConfigError, match=r"init='eva' sets both factors; leave init_A and init_B"):
        pk.LoRA(target_modules=["q_proj"], init="eva", init_B="gaussian")
    with pytest.raises(ConfigError, match=r"'evaa' must be one of .*'eva'"):
        pk.LoRA(target_modules=["q_proj"], init="evaa")
    model = pk.apply(build("llama"), pk.LoRA(target_modules=["q_proj"], rank=2, init="eva"))
    pk.merge(model)
    with pytest.raises(ConfigError, match=r"adapter 'default' is merged into 'model.layers.0.self_attn.q_proj'; "
                                          r"pk.unmerge\(model\) first"):
        pk.init_eva(model, batches(), show_progress=False)
