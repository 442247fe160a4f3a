"""LoHa and LoKr: formulas, HF PEFT parity (initialisation, forward, gradients, training-mode dropout, files both
ways), merging, several adapters, errors."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import peftkit as pk
from peftkit.core.state import adapter_layers
from peftkit.errors import ConfigError, UnknownFieldError, UnsupportedLayerError
from peftkit.io.hf_format import adapter_state_dict
from peftkit.methods.lokr import LoKrLayer, factorization
from peftkit.methods.lycoris import LycorisLayer, cp_weight

from models import assert_same_tensors_as_hf, build, hf_pair, randomize_adapters, randomize_trainable, run

peft = pytest.importorskip("peft")


class ConvStack(nn.Module):
    """A grouped 3×3 Conv2d, a 1×1 Conv2d (never in CP form), a Conv1d and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, kernel_size=3, padding=1, groups=2)
        self.point = nn.Conv2d(8, 12, kernel_size=1)
        self.seq = nn.Conv1d(12, 6, kernel_size=3, padding=1)
        self.head = nn.Linear(6 * 16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.point(torch.relu(self.conv(x)))    # (b, 12, 4, 4)
        h = torch.relu(self.seq(h.flatten(2)))      # (b, 6, 16)
        return self.head(h.flatten(1))


def conv_stack(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return ConvStack().eval()


def conv_input() -> torch.Tensor:
    return torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(3))


#: model → (builder, forward)
MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[nn.Module], torch.Tensor]]] = {
    "llama": (lambda: build("llama"), lambda m: run(m, "llama")),
    "conv": (conv_stack, lambda m: m(conv_input())),
}
LLAMA = ["q_proj", "v_proj", "down_proj"]
CONV = ["conv", "point", "seq", "head"]
#: case → (method, model, peftkit config fields; HF PEFT's are the same, with ``r`` for ``rank``)
CASES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "loha-linear-patterns": ("loha", "llama", {"target_modules": LLAMA, "rank": 4, "alpha": 8,
                                               "rank_pattern": {"v_proj": 2}, "alpha_pattern": {"down_proj": 3}}),
    "loha-conv": ("loha", "conv", {"target_modules": CONV, "rank": 3, "alpha": 6}),
    "loha-conv-effective": ("loha", "conv", {"target_modules": CONV, "rank": 2, "use_effective_conv2d": True}),
    "lokr-linear-patterns": ("lokr", "llama", {"target_modules": LLAMA, "rank": 2, "alpha": 4,
                                               "rank_pattern": {"v_proj": 8}, "alpha_pattern": {"q_proj": 3}}),
    "lokr-decompose-both": ("lokr", "llama", {"target_modules": LLAMA, "rank": 1, "decompose_both": True,
                                              "decompose_factor": 4}),
    "lokr-conv-full": ("lokr", "conv", {"target_modules": CONV, "rank": 8, "init_weights": "lycoris"}),
    # HF PEFT 0.21.2 cannot run a CP Conv1d (torch.kron fails): the Conv1d is tested against the formula below.
    "lokr-conv-effective": ("lokr", "conv", {"target_modules": ["conv", "point", "head"], "rank": 1,
                                             "use_effective_conv2d": True}),
}


def configs(method: str, **fields: Any) -> tuple[pk.AdapterConfig, Any]:
    """The peftkit config and HF PEFT's for the same fields."""
    ours = (pk.LoHa if method == "loha" else pk.LoKr)(**fields)
    theirs = (peft.LoHaConfig if method == "loha" else peft.LoKrConfig)(
        **{("r" if k == "rank" else k): v for k, v in fields.items()})
    return ours, theirs


def pair(case: str, seed: int = 1) -> tuple[nn.Module, Any, Callable[[nn.Module], torch.Tensor]]:
    """The case's peftkit and HF PEFT models on the same base weights, each initialised from global seed ``seed``."""
    method, model, fields = CASES[case]
    builder, forward = MODELS[model]
    ours_config, hf_config = configs(method, **fields)
    ours, hf = hf_pair(builder, ours_config, hf_config, seed)
    return ours, hf, forward


def hf_layers(hf: Any) -> dict[str, Any]:
    prefix = "base_model.model."
    lycoris = peft.tuners.lycoris_utils.LycorisLayer
    return {n.removeprefix(prefix): m for n, m in hf.named_modules() if isinstance(m, lycoris)}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_hf_peft_initialisation_forward_gradients_and_files(case: str, tmp_path) -> None:
    ours, hf, forward = pair(case)
    # Same seed, same tensors: HF PEFT's names, shapes and initialisation (ΔW = 0: the output is the base's).
    assert_same_tensors_as_hf(ours, hf)
    with torch.no_grad():
        with pk.disable_adapters(ours):
            base = forward(ours)
        assert torch.allclose(forward(ours), base, atol=1e-6)

    # HF PEFT's file → peftkit: the same tensors and outputs.
    randomize_trainable(hf, 0.3, seed=0)
    hf.save_pretrained(str(tmp_path / "hf"))
    loaded = pk.load_adapter(MODELS[CASES[case][1]][0](), tmp_path / "hf")
    with torch.no_grad():
        expected = forward(hf)
        assert not torch.allclose(expected, base, atol=1e-3)
        torch.testing.assert_close(forward(loaded), expected, rtol=1e-5, atol=1e-5)

    # The same gradients (HF PEFT's LoHa has hand-written backward passes). Its CP form's are wrong for hada_w1_a and
    # hada_w2_a (see test_loha_cp_gradients_are_those_of_its_forward): those are left out.
    pk.set_adapter(loaded, "default")  # trainable again
    forward(loaded).square().sum().backward()
    forward(hf).square().sum().backward()
    grads = {k: p.grad for k, p in hf.named_parameters() if p.requires_grad}
    cp = {f"base_model.model.{n}.{a}" for n, layer in hf_layers(hf).items()
          if "default" in getattr(layer, "hada_t1", {}) for a in ("hada_w1_a", "hada_w2_a")}
    for key, tensor in adapter_state_dict(loaded, "default").items():
        if key not in cp:
            torch.testing.assert_close(tensor.grad, grads[f"{key}.default"], rtol=1e-4, atol=1e-5)

    # peftkit's file → HF PEFT: the same config values in every layer, the same outputs.
    randomize_adapters(ours, seed=2)
    with torch.no_grad():
        expected = forward(ours)
    pk.save_adapter(ours, tmp_path / "pk")
    back = peft.PeftModel.from_pretrained(MODELS[CASES[case][1]][0](), str(tmp_path / "pk")).eval()
    with torch.no_grad():
        torch.testing.assert_close(forward(back), expected, rtol=1e-5, atol=1e-5)
    mine_layers = dict(adapter_layers(ours))
    for name, layer in hf_layers(back).items():
        own = mine_layers[name]
        assert isinstance(own, LycorisLayer)
        assert (layer.r["default"], layer.scaling["default"]) == (own.rank["default"], own.scaling["default"])
        assert (layer.rank_dropout["default"], layer.module_dropout["default"]) == (0.0, 0.0)
    assert set(hf_layers(back)) == set(mine_layers)
    written = json.loads((tmp_path / "pk" / "adapter_config.json").read_text())
    defaults = (peft.LoHaConfig if CASES[case][0] == "loha" else peft.LoKrConfig)().to_dict()
    assert {k for k in written if k not in defaults} == set()  # only fields HF PEFT has


@pytest.mark.parametrize("case", ["loha-conv", "loha-linear-patterns", "lokr-linear-patterns", "lokr-conv-full"])
def test_training_mode_dropout_draws_hf_peft_masks(case: str) -> None:
    """With the same global seed, module and rank dropout skip the same updates and zero the same rows."""
    method, model, fields = CASES[case]
    builder, forward = MODELS[model]
    # Without module dropout HF PEFT still draws its number: the rank-dropout masks come after it.
    extra = {"rank_dropout": 0.3, "module_dropout": 0.25 if "conv" in case else 0.0, "init_weights": False}
    if method == "lokr":
        extra["rank_dropout_scale"] = case != "lokr-linear-patterns"
    ours_config, hf_config = configs(method, **{**fields, **extra})
    torch.manual_seed(5)
    ours = pk.apply(builder(), ours_config).train()
    torch.manual_seed(5)
    hf = peft.get_peft_model(builder(), hf_config).train()
    with torch.no_grad():
        with pk.disable_adapters(ours):
            base = forward(ours)
        outputs = []
        for step in range(4):
            torch.manual_seed(10 + step)
            mine = forward(ours)
            torch.manual_seed(10 + step)
            torch.testing.assert_close(mine, forward(hf), rtol=1e-5, atol=1e-5)
            outputs.append(mine)
    assert not torch.allclose(outputs[0], base, atol=1e-4)
    assert not all(torch.allclose(o, outputs[0]) for o in outputs[1:])  # the masks change between forwards


@pytest.mark.parametrize("method", ["loha", "lokr"])
def test_without_dropout_training_equals_evaluation_and_full_module_dropout_is_the_base(method: str) -> None:
    model = build("llama")
    pk.apply(model, configs(method, target_modules=LLAMA, init_weights=False)[0])
    model.train()
    with torch.no_grad():
        state = torch.random.get_rng_state()
        trained = run(model, "llama")
        assert torch.equal(torch.random.get_rng_state(), state)  # nothing drawn without dropout
        model.eval()
        evaluated = run(model, "llama")
        with pk.disable_adapters(model):
            base = run(model, "llama")
    assert torch.equal(trained, evaluated) and not torch.allclose(evaluated, base, atol=1e-4)

    dropped = build("llama")
    pk.apply(dropped, configs(method, target_modules=LLAMA, init_weights=False, module_dropout=1.0)[0])
    dropped.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(run(dropped.train(), "llama"), base)  # every update skipped in training
        assert torch.allclose(run(dropped.eval(), "llama"), evaluated, atol=1e-6)  # none in evaluation


def test_loha_cp_gradients_are_those_of_its_forward() -> None:
    """peftkit differentiates ΔW with autograd; HF PEFT 0.21.2's hand-written backward of the CP form fails this
    check for hada_w1_a and hada_w2_a, so HF PEFT trains those factors along other directions."""
    torch.manual_seed(0)
    model = pk.apply(nn.Sequential(nn.Conv2d(3, 4, 3)).double(), pk.LoHa(target_modules=["0"], rank=2,
                                                                         use_effective_conv2d=True))
    layer = model[0]
    names = [f"{n}.default" for n in ("hada_t1", "hada_w1_a", "hada_w1_b", "hada_t2", "hada_w2_a", "hada_w2_b")]
    factors = [torch.randn(layer.get_parameter(n).shape, dtype=torch.float64, requires_grad=True) for n in names]
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)

    def output(*values: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(layer, dict(zip(names, values, strict=True)), (x,))

    assert torch.autograd.gradcheck(output, factors)


def test_loha_formula_on_a_linear_layer() -> None:
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    model = pk.apply(nn.Sequential(base), pk.LoHa(target_modules=["0"], rank=2, alpha=3))
    randomize_adapters(model)
    layer = model[0]
    w1a, w1b, w2a, w2b = (getattr(layer, f"hada_{n}")["default"] for n in ("w1_a", "w1_b", "w2_a", "w2_b"))
    assert (w1a.shape, w1b.shape) == ((5, 2), (2, 6))
    delta = (w1a @ w1b) * (w2a @ w2b) * 1.5
    x = torch.randn(4, 6)
    torch.testing.assert_close(model(x), x @ (base.weight + delta).T + base.bias)


def test_lokr_formula_kronecker_factors_and_cp_conv1d() -> None:
    torch.manual_seed(0)
    model = pk.apply(nn.Sequential(nn.Linear(12, 8), nn.Conv1d(6, 4, 3)),
                     pk.LoKr(target_modules=["0", "1"], rank=1, alpha=2, use_effective_conv2d=True))
    randomize_adapters(model)
    linear, conv = model[0], model[1]
    assert isinstance(linear, LoKrLayer) and isinstance(conv, LoKrLayer)
    # 8 = 2·4 out, 12 = 3·4 in; rank 1 < 4/2: W2 low rank; W1 full (decompose_both is off)
    w1, w2 = linear.lokr_w1["default"], linear.lokr_w2_a["default"] @ linear.lokr_w2_b["default"]
    assert (w1.shape, w2.shape) == ((2, 3), (4, 4))
    torch.testing.assert_close(linear.delta_weight("default"), torch.kron(w1, w2) * 2.0)
    # A CP Conv1d (which HF PEFT 0.21.2 cannot compute): (W1 ⊗ T-form W2) with the kernel kept whole.
    w1 = conv.lokr_w1["default"]
    w2 = cp_weight(conv.lokr_t2["default"], conv.lokr_w2_a["default"], conv.lokr_w2_b["default"])[..., 0]
    assert conv.lokr_t2["default"].shape == (1, 1, 3, 1)
    expected = torch.stack([torch.kron(w1, w2[..., k]) for k in range(3)], dim=-1) * 2.0
    torch.testing.assert_close(conv.delta_weight("default"), expected)


@pytest.mark.parametrize("dimension", [1, 6, 7, 12, 32, 64, 96, 127, 128, 256, 360])
@pytest.mark.parametrize("factor", [-1, 1, 2, 4, 5, 8, 32])
def test_factorization_is_hf_peft_s(dimension: int, factor: int) -> None:
    from peft.tuners.lokr.layer import factorization as theirs

    assert factorization(dimension, factor) == theirs(dimension, factor)


@pytest.mark.parametrize("method", ["loha", "lokr"])
def test_merge_unmerge_several_adapters_and_delete(method: str) -> None:
    model = conv_stack()
    weights = {n: p.clone() for n, p in model.named_parameters()}
    pk.apply(model, configs(method, target_modules=CONV, rank=2)[0], name="a")
    pk.apply(model, configs(method, target_modules=["conv", "head"], rank=4, use_effective_conv2d=True)[0], name="b")
    randomize_adapters(model, seed=3)
    with torch.no_grad():
        with pk.disable_adapters(model):
            base = model(conv_input())
        only_a = model(conv_input())
        pk.set_adapter(model, ["a", "b"])
        both = model(conv_input())
        pk.set_adapter(model, "b")
        only_b = model(conv_input())
        assert not any(torch.allclose(x, y, atol=1e-4) for x, y in [(base, only_a), (only_a, only_b), (both, only_a)])

        pk.set_adapter(model, ["a", "b"])
        pk.merge(model, safe=True)  # W + ΔW_a + ΔW_b computes what the two updates summed in forward did
        torch.testing.assert_close(model(conv_input()), both, rtol=1e-5, atol=1e-5)
        with pk.disable_adapters(model):
            torch.testing.assert_close(model(conv_input()), base, rtol=1e-5, atol=1e-6)
        pk.unmerge(model)
        for name, p in model.named_parameters():
            original = name.replace(".base_layer", "")
            if original in weights:
                torch.testing.assert_close(p, weights[original], rtol=0, atol=1e-6)
        torch.testing.assert_close(model(conv_input()), both, rtol=1e-5, atol=1e-6)

        pk.delete_adapter(model, "a")
        assert pk.list_adapters(model) == ["b"] and not hasattr(model.point, "base_layer")
        torch.testing.assert_close(model(conv_input()), only_b, rtol=1e-5, atol=1e-6)
        plain = pk.unload(model, merge=True)
        torch.testing.assert_close(plain(conv_input()), only_b, rtol=1e-5, atol=1e-5)


def test_a_convolution_s_update_uses_its_padding_mode() -> None:
    """The update is the base convolution's forward with ΔW, so it equals the merged layer whatever the padding (HF
    PEFT zero-pads the update: its unmerged and merged outputs differ for other padding modes)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"))
    pk.apply(model, pk.LoHa(target_modules=["0"], rank=2, init_weights=False))
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        unmerged = model(x)
        pk.merge(model)
        torch.testing.assert_close(model(x), unmerged, rtol=1e-5, atol=1e-6)


def test_hf_file_with_an_option_peftkit_lacks_is_refused(tmp_path) -> None:
    model = pk.apply(build("llama"), pk.LoKr(target_modules=["q_proj"]))
    pk.save_adapter(model, tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "use_new_thing": True}))
    with pytest.raises(ConfigError, match="use_new_thing=True, an option of HF PEFT's LOKR that peftkit does not"):
        pk.load_adapter(build("llama"), tmp_path)
    path.write_text(json.dumps({**json.loads(path.read_text()), "use_new_thing": None}))
    pk.load_adapter(build("llama"), tmp_path)  # an unset option is harmless


@pytest.mark.parametrize(("fields", "message"), [
    ({"rank": 0}, "rank=0 must be a positive integer"),
    ({"rank": 2.5}, "rank=2.5 must be a positive integer"),
    ({"alpha": 0}, "alpha=0 must be a positive number"),
    ({"rank_pattern": {"q_proj": -1}}, r"rank_pattern\['q_proj'\]=-1 must be a positive integer"),
    ({"rank_dropout": 1.0}, r"rank_dropout=1.0 must be in \[0, 1\)"),
    ({"module_dropout": 1.5}, r"module_dropout=1.5 must be in \[0, 1\]"),
    ({"init_weights": "lycoris"}, "init_weights='lycoris' must be one of True, False"),
])
def test_bad_loha_fields_are_refused(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        pk.LoHa(target_modules=["q_proj"], **fields)


#: layer kind → (model builder, target) for layers HF PEFT 0.21.2's LoHa and LoKr do not adapt
UNSUPPORTED: dict[str, tuple[Callable[[], nn.Module], str]] = {
    "Conv1D": (lambda: build("gpt2"), "c_attn"),  # GPT-2's transposed linear layer
    "Embedding": (lambda: build("gpt2"), "wte"),
    "Conv3d": (lambda: nn.Sequential(nn.Conv3d(2, 4, 3)), "0"),
}


@pytest.mark.parametrize("kind", list(UNSUPPORTED))
@pytest.mark.parametrize("method", ["loha", "lokr"])
def test_layers_hf_peft_does_not_adapt_are_refused_as_there(method: str, kind: str) -> None:
    """HF PEFT 0.21.2 adapts nn.Linear, nn.Conv1d and nn.Conv2d only (it raises TypeError for other targets), so an
    adapter on any other layer would have no HF PEFT meaning nor a file it loads: peftkit refuses the same layers."""
    builder, target = UNSUPPORTED[kind]
    ours, theirs = configs(method, target_modules=[target])
    with pytest.raises(UnsupportedLayerError, match=f"only modules of type {kind}, .*: Conv1d, Conv2d, Linear"):
        pk.apply(builder(), ours)
    with pytest.raises(TypeError, match=f"{kind}'> not supported"):
        peft.get_peft_model(builder(), theirs)


def test_bad_lokr_fields_and_targets_are_refused() -> None:
    with pytest.raises(ConfigError, match="decompose_factor=0 must be -1"):
        pk.LoKr(decompose_factor=0)
    with pytest.raises(UnknownFieldError, match="'r' is HF PEFT's name: use rank"):
        pk.LoKr(r=8)
    with pytest.raises(UnsupportedLayerError, match="matches only modules of type Linear4bit"):
        pk.apply(pk.quantize(build("llama"), compute_dtype=torch.float32), pk.LoHa(target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match="rank_pattern key 'q_prj' matches no module"):
        pk.apply(build("llama"), pk.LoHa(target_modules=["q_proj"], rank_pattern={"q_prj": 2}))
    model = pk.apply(build("llama"), pk.LoHa(target_modules=["q_proj"]))
    with pytest.raises(UnsupportedLayerError, match="already adapted by LoHaLayer"):
        pk.apply(model, pk.LoKr(target_modules=["q_proj"]), name="other")


def test_default_targets_and_the_command_line_method_names() -> None:
    from peftkit.train.config import config_from_dict
    from peftkit.train.tasks import peft_config

    model = pk.apply(build("llama"), pk.LoHa())
    assert sorted(n.rsplit(".", 1)[-1] for n, _ in adapter_layers(model)) == ["q_proj"] * 2 + ["v_proj"] * 2
    base = {"checkpoint": {"pretrained": {"config": {"model_type": "llama"}}}}
    for method, cls in (("loha", pk.LoHa), ("lokr", pk.LoKr)):
        config = peft_config(config_from_dict({**base, "peft": {"method": method, "rank": 4}}))
        assert type(config) is cls and config.rank == 4


def test_merging_into_a_weight_tied_to_the_embeddings_is_refused() -> None:
    from peftkit.errors import MergeError

    model = build("gemma")  # lm_head shares the input embeddings' weight
    pk.apply(model, pk.LoKr(target_modules=["lm_head"], init_weights=False))
    weight = model.lm_head.base_layer.weight.clone()
    with pytest.raises(MergeError, match="tied"):
        pk.merge(model)
    assert torch.equal(model.lm_head.base_layer.weight, weight)
