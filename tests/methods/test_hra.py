"""HRA: the formula, HF PEFT parity (initialisation, forward, gradients, several adapters, files both ways, biases),
merging, and what is refused."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import peftkit as pk
from peftkit.core.state import adapter_layers
from peftkit.errors import ConfigError, MergeError, UnknownFieldError, UnsupportedLayerError
from peftkit.io.hf_format import adapter_state_dict
from peftkit.methods.hra import HRALayer

from models import (
    assert_loads_in_hf,
    assert_same_grads_as_hf,
    assert_same_tensors_as_hf,
    build,
    hf_pair,
    randomize_adapters,
    randomize_trainable,
    run,
)

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


class ConvStack(nn.Module):
    """A padded, strided 3×3 Conv2d, a 1×1 Conv2d and a linear head, all with biases."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, kernel_size=3, padding=1, stride=2)
        self.point = nn.Conv2d(6, 4, kernel_size=1)
        self.head = nn.Linear(4 * 3 * 3, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.point(torch.relu(self.conv(x))).flatten(1))


def conv_stack() -> nn.Module:
    torch.manual_seed(0)
    return ConvStack().eval()


def conv_input() -> torch.Tensor:
    return torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(3))


#: model → (builder, forward)
MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[nn.Module], torch.Tensor]]] = {
    "llama": (lambda: build("llama"), lambda m: run(m, "llama")),
    "conv": (conv_stack, lambda m: m(conv_input())),
}
LLAMA = ["q_proj", "v_proj", "down_proj"]
CONV = ["conv", "point", "head"]
#: case → (model, peftkit config fields; HF PEFT's are the same, with ``r`` for ``rank``)
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "linear": ("llama", {"target_modules": LLAMA, "rank": 4}),
    "linear-gs": ("llama", {"target_modules": LLAMA, "rank": 3, "apply_GS": True, "init_weights": False}),
    "conv": ("conv", {"target_modules": CONV, "rank": 6}),
    "conv-gs-bias": ("conv", {"target_modules": CONV, "rank": 2, "apply_GS": True, "init_weights": False,
                              "bias": "hra_only"}),
    "conv-bias-all": ("conv", {"target_modules": ["conv"], "rank": 2, "init_weights": False, "bias": "all"}),
}


def hf_config(**fields: Any) -> Any:
    return peft.HRAConfig(**{("r" if k == "rank" else k): v for k, v in fields.items()})


def pair(case: str, seed: int = 1) -> tuple[nn.Module, Any, Callable[[nn.Module], torch.Tensor]]:
    """The case's peftkit and HF PEFT models on the same base weights, each initialised from global seed ``seed``."""
    model, fields = CASES[case]
    builder, forward = MODELS[model]
    ours, hf = hf_pair(builder, pk.HRA(**fields), hf_config(**fields), seed)
    return ours, hf, forward


@pytest.mark.parametrize("case", list(CASES))
def test_matches_hf_peft_initialisation_forward_gradients_and_files(case: str, tmp_path) -> None:
    model_name, fields = CASES[case]
    ours, hf, forward = pair(case)
    # Same seed, same tensors: HF PEFT's names, shapes and initialisation.
    assert_same_tensors_as_hf(ours, hf)
    with torch.no_grad():
        with pk.disable_adapters(ours):
            base = forward(ours)
        torch.testing.assert_close(forward(ours), forward(hf), rtol=1e-5, atol=1e-6)
        if fields.get("init_weights", True):  # pairs of equal reflections: R = I
            torch.testing.assert_close(forward(ours), base, rtol=1e-5, atol=1e-6)

    # HF PEFT's file → peftkit: the same outputs.
    randomize_trainable(hf, 0.3, seed=0, shift=True)
    hf.save_pretrained(str(tmp_path / "hf"))
    loaded = pk.load_adapter(MODELS[model_name][0](), tmp_path / "hf")
    with torch.no_grad():
        expected = forward(hf)
        assert not torch.allclose(expected, base, atol=1e-3)
        torch.testing.assert_close(forward(loaded), expected, rtol=1e-5, atol=1e-5)

    # The same gradients, biases included.
    pk.set_adapter(loaded, "default")  # trainable again
    if fields.get("bias", "none") != "none":
        pk.HRA(**fields).after_apply(loaded, "default")
    assert_same_grads_as_hf(loaded, hf, forward, atol=1e-5)

    # peftkit's file → HF PEFT: the same outputs and settings in every layer.
    back, written = assert_loads_in_hf(ours, MODELS[model_name][0], forward, tmp_path / "pk", atol=1e-5)
    hf_layers = {n.removeprefix("base_model.model."): m for n, m in back.named_modules()
                 if isinstance(m, peft.tuners.hra.HRALayer)}
    mine_layers = dict(adapter_layers(ours))
    assert set(hf_layers) == set(mine_layers)
    for layer in hf_layers.values():
        assert (layer.hra_r["default"], layer.hra_apply_GS["default"]) == (fields["rank"],
                                                                           fields.get("apply_GS", False))
    assert set(written) <= set(peft.HRAConfig().to_dict())  # only fields HF PEFT has
    assert written["bias"] == fields.get("bias", "none")


def test_several_active_adapters_compose_in_order_as_in_hf_peft() -> None:
    """W₀ R_a R_b: HF PEFT multiplies the active adapters' rotations in their order."""
    builder, forward = MODELS["conv"]
    ours, hf = builder(), builder()
    for name, rank in (("a", 2), ("b", 4)):
        pk.apply(ours, pk.HRA(target_modules=CONV, rank=rank, init_weights=False), name=name)
        config = hf_config(target_modules=CONV, rank=rank, init_weights=False)
        hf = peft.get_peft_model(hf, config, adapter_name=name) if name == "a" else hf
        if name == "b":
            hf.add_adapter(name, config)
    randomize_adapters(ours, seed=4)
    hf.base_model.model.load_state_dict(ours.state_dict())  # the same keys: those of the model inside HF PEFT's
    pk.set_adapter(ours, ["a", "b"])
    hf.base_model.set_adapter(["a", "b"])
    with torch.no_grad():
        both = forward(ours)
        torch.testing.assert_close(both, forward(hf), rtol=1e-5, atol=1e-5)
        pk.set_adapter(ours, ["b", "a"])
        assert not torch.allclose(forward(ours), both, atol=1e-3)  # reflections do not commute


def test_formula_on_a_linear_layer_and_a_dilated_reflect_padded_convolution() -> None:
    torch.manual_seed(0)
    model = pk.apply(nn.Sequential(nn.Linear(6, 5), nn.Conv2d(2, 3, 3, dilation=2, padding=2,
                                                              padding_mode="reflect")),
                     pk.HRA(target_modules=["0", "1"], rank=2, init_weights=False))
    linear, conv = model[0], model[1]
    assert isinstance(linear, HRALayer) and isinstance(conv, HRALayer)
    u = linear.hra_u["default"]
    assert u.shape == (6, 2) and conv.hra_u["default"].shape == (2 * 3 * 3, 2)
    h = [torch.eye(6) - 2 * torch.outer(c, c) / c.dot(c) for c in u.t()]
    x = torch.randn(4, 6)
    torch.testing.assert_close(linear(x), x @ (linear.base_layer.weight @ h[0] @ h[1]).T + linear.base_layer.bias)
    # The convolution's update is the base layer's own forward (dilation, padding mode) with W₀R: merged == unmerged.
    x = torch.randn(1, 2, 7, 7)
    with torch.no_grad():
        unmerged = conv(x)
        pk.merge(model)
        torch.testing.assert_close(conv(x), unmerged, rtol=1e-5, atol=1e-6)


def test_gram_schmidt_gives_one_reflection_of_the_span() -> None:
    torch.manual_seed(0)
    model = pk.apply(nn.Sequential(nn.Linear(5, 4)), pk.HRA(target_modules=["0"], rank=3, apply_GS=True,
                                                           init_weights=False))
    layer = model[0]
    q, _ = torch.linalg.qr(layer.hra_u["default"].detach())
    expected = layer.base_layer.weight @ (torch.eye(5) - 2 * q @ q.T)  # I − 2QQᵀ whatever the signs of Q
    torch.testing.assert_close(layer.rotated(layer.base_layer.weight, ["default"]), expected, rtol=1e-5, atol=1e-6)


def test_merge_unmerge_several_adapters_and_delete() -> None:
    builder, forward = MODELS["conv"]
    model = builder()
    weights = {n: p.clone() for n, p in model.named_parameters()}
    for name, rank in (("a", 2), ("b", 4), ("c", 2)):
        pk.apply(model, pk.HRA(target_modules=CONV if name != "c" else ["conv"], rank=rank, init_weights=False),
                 name=name)
    randomize_adapters(model, seed=3)
    with torch.no_grad():
        pk.set_adapter(model, ["a", "b", "c"])
        both = forward(model)
        with pytest.raises(MergeError, match=r"in the order \['b', 'a', 'c'\] instead of \['a', 'b', 'c'\]"):
            pk.merge(model, "b")
        pk.merge(model, "a")  # a prefix of the active order: the rest still act after it
        torch.testing.assert_close(forward(model), both, rtol=1e-5, atol=1e-5)
        pk.merge(model, safe=True)
        torch.testing.assert_close(forward(model), both, rtol=1e-5, atol=1e-5)
        with pk.disable_adapters(model):
            torch.testing.assert_close(forward(model), builder()(conv_input()), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(forward(model), both, rtol=1e-5, atol=1e-5)

        pk.delete_adapter(model, "a")  # merged first: b and c come out, a too, and b and c go back in
        assert model.conv.merged_adapters == ["b", "c"]
        pk.set_adapter(model, ["b", "c"])
        pk.unmerge(model)
        for name, p in model.named_parameters():
            original = name.replace(".base_layer", "")
            if original in weights:
                torch.testing.assert_close(p, weights[original], rtol=0, atol=1e-5)
        only_bc = forward(model)
        plain = pk.unload(model, merge=True)
        torch.testing.assert_close(plain(conv_input()), only_bc, rtol=1e-5, atol=1e-5)


def test_hf_file_with_an_odd_rank_loads_and_unknown_options_are_refused(tmp_path) -> None:
    """HF PEFT draws every column for an odd r (with a warning): the same as init_weights=False."""
    torch.manual_seed(0)
    hf = peft.get_peft_model(build("llama"), hf_config(target_modules=["q_proj"], rank=3)).eval()
    hf.save_pretrained(str(tmp_path))
    model = pk.load_adapter(build("llama"), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(run(model, "llama"), run(hf, "llama"), rtol=1e-5, atol=1e-5)
    config = pk.HRA.from_hf_dict(json.loads((tmp_path / "adapter_config.json").read_text()), [])
    assert (config.rank, config.init_weights) == (3, False)
    torch.manual_seed(0)
    fresh = pk.apply(build("llama"), config)
    assert torch.equal(adapter_state_dict(fresh, "default")["base_model.model.model.layers.0.self_attn.q_proj.hra_u"],
                       peft.get_peft_model_state_dict(hf)["base_model.model.model.layers.0.self_attn.q_proj.hra_u"])

    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "use_new_thing": True}))
    with pytest.raises(ConfigError, match="use_new_thing=True, an option of HF PEFT's HRA that peftkit does not"):
        pk.load_adapter(build("llama"), tmp_path)


@pytest.mark.parametrize(("fields", "error", "message"), [
    ({"rank": 0}, ConfigError, "rank=0 must be a positive integer"),
    ({"rank": -2}, ConfigError, "rank=-2 must be a positive integer"),
    ({"rank": 2.0}, ConfigError, "rank=2.0 must be a positive integer"),
    ({"rank": 3}, ConfigError, "rank=3 is odd: init_weights=True starts from pairs"),
    ({"apply_GS": True}, ConfigError, "apply_GS=True needs init_weights=False"),
    ({"apply_GS": 1}, ConfigError, "apply_GS=1 must be True or False"),
    ({"bias": "lora_only"}, ConfigError, "bias='lora_only' must be one of"),
    ({"r": 8}, UnknownFieldError, "'r' is HF PEFT's name: use rank"),
    ({"alpha": 8}, UnknownFieldError, "'alpha' is not a field"),
])
def test_bad_fields_are_refused(fields: dict[str, Any], error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        pk.HRA(target_modules=["q_proj"], **fields)


#: layer kind → (model builder, target, HF PEFT's error) for layers HF PEFT 0.21.2's HRA does not adapt
UNSUPPORTED: dict[str, tuple[Callable[[], nn.Module], str, str]] = {
    "Conv1D": (lambda: build("gpt2"), "c_attn", "only modules of type .*: Conv2d, Linear"),
    "Embedding": (lambda: build("gpt2"), "wte", "only modules of type .*: Conv2d, Linear"),
    "Conv1d": (lambda: nn.Sequential(nn.Conv1d(2, 4, 3)), "0", "only modules of type .*: Conv2d, Linear"),
    "grouped": (lambda: nn.Sequential(nn.Conv2d(2, 4, 3, groups=2)), "0", "Conv2d with groups=2"),
    "non-square": (lambda: nn.Sequential(nn.Conv2d(2, 4, (3, 1))), "0", r"non-square kernel \(3, 1\)"),
}


@pytest.mark.parametrize("kind", list(UNSUPPORTED))
def test_layers_hf_peft_does_not_adapt_are_refused(kind: str) -> None:
    builder, target, message = UNSUPPORTED[kind]
    model = builder()
    names = [n for n, _ in model.named_modules()]
    with pytest.raises(UnsupportedLayerError, match=message):
        pk.apply(model, pk.HRA(target_modules=[target], rank=2))
    assert [n for n, _ in model.named_modules()] == names  # refused before the model changed
    if kind != "non-square":  # HF PEFT sizes hra_u as for a 3×3 kernel and fails in the forward
        with pytest.raises((TypeError, NotImplementedError, ValueError)):
            peft.get_peft_model(builder(), hf_config(target_modules=[target], rank=2))


def test_more_targets_checks_and_the_command_line_name() -> None:
    from peftkit.train.config import config_from_dict
    from peftkit.train.tasks import peft_config

    with pytest.raises(UnsupportedLayerError, match="matches only modules of type Linear4bit"):
        pk.apply(pk.quantize(build("llama"), compute_dtype=torch.float32), pk.HRA(target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match="rank=8 with apply_GS: 0 has only 6 dimensions"):
        pk.apply(nn.Sequential(nn.Linear(6, 4)), pk.HRA(target_modules=["0"], apply_GS=True, init_weights=False))
    model = pk.apply(build("llama"), pk.HRA())  # LoRA's default targets, as in HF PEFT
    assert sorted(n.rsplit(".", 1)[-1] for n, _ in adapter_layers(model)) == ["q_proj"] * 2 + ["v_proj"] * 2
    with pytest.raises(UnsupportedLayerError, match="already adapted by HRALayer"):
        pk.apply(model, pk.LoHa(target_modules=["q_proj"]), name="other")
    base = {"checkpoint": {"pretrained": {"config": {"model_type": "llama"}}}}
    config = peft_config(config_from_dict({**base, "peft": {"method": "hra", "rank": 4}}))
    assert type(config) is pk.HRA and config.rank == 4


def test_merging_into_a_weight_tied_to_the_embeddings_is_refused() -> None:
    model = build("gemma")  # lm_head shares the input embeddings' weight
    pk.apply(model, pk.HRA(target_modules=["lm_head"], rank=2, init_weights=False))
    weight = model.lm_head.base_layer.weight.clone()
    with pytest.raises(MergeError, match="tied"):
        pk.merge(model)
    assert torch.equal(model.lm_head.base_layer.weight, weight)


def test_a_bfloat16_model_keeps_fp32_factors_rounded_as_hf_peft_rounds_them() -> None:
    """Over a half-precision base HF PEFT rounds the drawn columns to its dtype, keeps them in fp32 and computes in
    fp32: the same tensors and bit for bit the same outputs."""
    fields: dict[str, Any] = {"target_modules": ["q_proj", "v_proj"], "rank": 4, "init_weights": False}
    torch.manual_seed(1)
    ours = pk.apply(build("llama").to(torch.bfloat16), pk.HRA(**fields))
    torch.manual_seed(1)
    hf = peft.get_peft_model(build("llama").to(torch.bfloat16), hf_config(**fields)).eval()
    mine, theirs = adapter_state_dict(ours, "default"), peft.get_peft_model_state_dict(hf)
    assert all(mine[k].dtype == torch.float32 and torch.equal(mine[k], v) for k, v in theirs.items())
    with torch.no_grad():
        out = run(ours, "llama")
        assert out.dtype == torch.bfloat16 and torch.equal(out, run(hf, "llama"))


def test_hf_layer_selection_and_modules_to_save_load_as_in_hf_peft(tmp_path) -> None:
    fields = {"target_modules": ["q_proj", "v_proj"], "rank": 2, "init_weights": False, "layers_to_transform": [1],
              "layers_pattern": "layers", "exclude_modules": ["v_proj"], "modules_to_save": ["lm_head"]}
    torch.manual_seed(0)
    hf = peft.get_peft_model(build("llama"), peft.HRAConfig(**{("r" if k == "rank" else k): v
                                                               for k, v in fields.items()})).eval()
    randomize_trainable(hf, 0.3, seed=0, shift=True)
    hf.save_pretrained(str(tmp_path))
    model = pk.load_adapter(build("llama"), tmp_path)
    adapted = [n for n, layer in adapter_layers(model) if isinstance(layer, HRALayer)]
    assert adapted == ["model.layers.1.self_attn.q_proj"]
    with torch.no_grad():
        torch.testing.assert_close(run(model, "llama"), run(hf, "llama"), rtol=1e-5, atol=1e-5)
