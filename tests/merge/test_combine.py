"""pk.combine: exact methods against Σ wᵢ·ΔWᵢ, the others against HF PEFT and direct formulas, bad input."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import peftkit as pk
from peftkit.core.state import adapter_layers, get_state, list_adapters
from peftkit.errors import AdapterExistsError, AdapterNotFoundError, ConfigError
from peftkit.merge import merge_utils as mu
from peftkit.merge.combine import COMBINATION_METHODS, as_matrices, combine, factors

TARGETS = ["emb", "q", "v", "conv"]
WEIGHTS = {"a": 0.7, "b": -0.4}


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.q = nn.Linear(6, 8)
        self.v = nn.Linear(8, 6)
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, ids: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        h = self.v(torch.relu(self.q(self.emb(ids))))
        return torch.cat([h.flatten(1), self.conv(image).flatten(1)], dim=1)


def _randomize(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for _, layer in adapter_layers(model):
        for name in layer.adapter_names:
            for p in layer.adapter_parameters(name):
                p.data.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)


def _model(rslora_b: bool = True, same_rank: bool = False) -> nn.Module:
    torch.manual_seed(0)
    model = Tiny().double()
    a = pk.LoRA(
        target_modules=TARGETS,
        rank=4,
        alpha=8,
        rank_pattern={} if same_rank else {"v": 2},
        alpha_pattern={"q": 3},
    )
    b = pk.LoRA(target_modules=TARGETS, rank=4 if same_rank else 3, alpha=5, use_rslora=rslora_b)
    pk.apply(model, a, name="a")
    pk.apply(model, b, name="b")
    _randomize(model)
    return model


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 11, (2, 5), generator=g), torch.randn(
        2, 3, 6, 6, generator=g, dtype=torch.float64
    )


def _max_err(model: nn.Module, name: str, weights: dict[str, float]) -> float:
    err = 0.0
    for _, layer in adapter_layers(model):
        expected = sum(w * layer.delta_weight(a) for a, w in weights.items())
        err = max(err, float((layer.delta_weight(name) - expected).detach().abs().max()))
    return err


def test_cat_is_exact_weighted_sum_with_rslora_and_patterns() -> None:
    model = _model()
    combine(model, WEIGHTS, method="cat", name="mix")
    assert _max_err(model, "mix", WEIGHTS) < 1e-6
    layers = dict(adapter_layers(model))
    assert layers["v"].rank["mix"] == 2 + 3 and layers["q"].rank["mix"] == 4 + 3
    assert all(layer.scaling["mix"] == 1.0 for layer in layers.values())
    # the model output with the mix equals the base model with W₀ + Σ wᵢ ΔWᵢ written into each weight
    ids, image = _inputs()
    pk.set_adapter(model, "mix")
    got = model(ids, image)
    for layer in layers.values():
        base = layer._base_weight().detach().clone()
        layer._set_base_weight(base + sum(w * layer.delta_weight(a) for a, w in WEIGHTS.items()))
    with pk.disable_adapters(model):
        expected = model(ids, image)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-9)


@pytest.mark.parametrize("rank", [None, 64])
def test_svd_full_rank_is_exact(rank: int | None) -> None:
    model = _model()
    combine(model, WEIGHTS, method="svd", name="mix", rank=64)
    assert _max_err(model, "mix", WEIGHTS) < 1e-6
    layers = dict(adapter_layers(model))
    assert layers["conv"].rank["mix"] == 4  # capped at min(out, in·k·k)
    if rank is None:
        combine(model, WEIGHTS, method="svd", name="small")
        assert layers["q"].rank["small"] == 4  # the largest source rank of the module


def test_svd_truncation_is_best_low_rank() -> None:
    model = _model()
    combine(model, WEIGHTS, method="svd", name="r2", rank=2)
    for _, layer in adapter_layers(model):
        total = sum(w * layer.delta_weight(a) for a, w in WEIGHTS.items())
        flat = total.reshape(total.shape[0], -1) if not isinstance(layer.base_layer, nn.Embedding) else total
        S = torch.linalg.svdvals(flat)
        got = layer.delta_weight("r2").reshape(flat.shape)
        torch.testing.assert_close(torch.linalg.svdvals(got)[:2], S[:2])
        assert abs(float((flat - got).detach().norm()) - float(S[2:].detach().norm())) < 1e-9


def test_rslora_plus_plain_is_right_where_hf_peft_is_not() -> None:
    """HF PEFT's add_weighted_adapter copies use_rslora from the first adapter and mis-scales by √r."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 8))
    hf = peft.get_peft_model(
        base, peft.LoraConfig(target_modules=["0"], r=4, lora_alpha=8, use_rslora=True), adapter_name="first"
    )
    hf.add_adapter("second", peft.LoraConfig(target_modules=["0"], r=4, lora_alpha=8))
    for n, p in hf.named_parameters():
        if "lora_" in n:
            nn.init.normal_(p)
    layer = hf.base_model.model[0]
    expected = layer.get_delta_weight("first") * 0.5 + layer.get_delta_weight("second") * 0.5
    hf.add_weighted_adapter(["first", "second"], [0.5, 0.5], "mix", combination_type="svd", svd_rank=8)
    hf_error = float((layer.get_delta_weight("mix") - expected).detach().abs().max())
    assert hf_error > 1e-2  # HF PEFT is off (its new adapter keeps rsLoRA: scale 8/√8 instead of 1)

    ours = nn.Sequential(nn.Linear(8, 8))
    ours.load_state_dict(
        {k.replace("base_layer.", ""): v for k, v in base.state_dict().items() if "lora" not in k}
    )
    pk.apply(ours, pk.LoRA(target_modules=["0"], rank=4, alpha=8, use_rslora=True), name="a")
    pk.apply(ours, pk.LoRA(target_modules=["0"], rank=4, alpha=8), name="b")
    mine = ours[0]
    for n, theirs in (("a", "first"), ("b", "second")):
        mine.lora_A[n].weight.data.copy_(layer.lora_A[theirs].weight.data)
        mine.lora_B[n].weight.data.copy_(layer.lora_B[theirs].weight.data)
    combine(ours, {"a": 0.5, "b": 0.5}, method="svd", name="mix", rank=8)
    torch.testing.assert_close(mine.delta_weight("mix"), expected.detach(), rtol=0, atol=1e-5)


# ----------------------------------------------------------- parity with HF PEFT's add_weighted_adapter

_HF_CASES: list[tuple[str, dict[str, Any]]] = [
    ("linear", {}),
    ("cat", {}),
    ("svd", {}),
    ("ties", {"density": 0.5}),
    ("ties", {"density": 0.7, "majority_sign_method": "frequency"}),
    ("magnitude_prune", {"density": 0.4}),
    ("ties_svd", {"density": 0.5}),
    ("magnitude_prune_svd", {"density": 0.6}),
]


def _hf_pair(tmp_path: Path) -> tuple[Any, nn.Module]:
    """Two random LoRA adapters in HF PEFT ("first", "second") on a small MLP, and the same base in peftkit with them
    loaded from HF PEFT's files as "a" and "b"."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(10, 12), nn.ReLU(), nn.Linear(12, 9))
    state = {k: v.clone() for k, v in base.state_dict().items()}
    config = {"target_modules": ["0", "2"], "r": 4, "lora_alpha": 6}
    hf = peft.get_peft_model(base, peft.LoraConfig(**config), adapter_name="first")
    hf.add_adapter("second", peft.LoraConfig(**{**config, "lora_alpha": 3}))
    for n, p in hf.named_parameters():
        if "lora_" in n:
            nn.init.normal_(p)
    hf.save_pretrained(str(tmp_path))  # adapters not named "default" go to tmp_path/<name>
    ours = nn.Sequential(nn.Linear(10, 12), nn.ReLU(), nn.Linear(12, 9))
    ours.load_state_dict(state)
    pk.load_adapter(ours, tmp_path / "first", name="a")
    pk.load_adapter(ours, tmp_path / "second", name="b")
    return hf, ours


@pytest.mark.parametrize(("method", "kwargs"), _HF_CASES)
def test_matches_hf_add_weighted_adapter(tmp_path: Path, method: str, kwargs: dict[str, Any]) -> None:
    hf, ours = _hf_pair(tmp_path)
    weights = {"a": 0.6, "b": -0.3}
    hf.add_weighted_adapter(
        ["first", "second"], list(weights.values()), "mix", combination_type=method, **kwargs
    )
    combine(ours, weights, method=method, name="mix", **kwargs)
    for idx in (0, 2):
        expected = hf.base_model.model[idx].get_delta_weight("mix").detach()
        torch.testing.assert_close(ours[idx].delta_weight("mix"), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_matches_hf_add_weighted_adapter_after_its_init_draws(tmp_path: Path, method: str) -> None:
    """Under one global seed HF PEFT first initialises the new adapter's factors from the global generator, then
    draws DARE's masks; combine (seed=None) draws the masks first. Replaying HF's init draws gives its result."""
    import math

    hf, ours = _hf_pair(tmp_path)

    torch.manual_seed(5)
    hf.add_weighted_adapter(["first", "second"], [0.6, 0.4], "mix", combination_type=method, density=0.5)
    torch.manual_seed(5)
    for fan_in, fan_out in ((10, 12), (12, 9)):  # HF's new lora_A / lora_B, then its kaiming init of A
        A, _ = nn.Linear(fan_in, 4, bias=False), nn.Linear(4, fan_out, bias=False)
        nn.init.kaiming_uniform_(A.weight, a=math.sqrt(5))
    combine(ours, {"a": 0.6, "b": 0.4}, method=method, name="mix", density=0.5)
    for idx in (0, 2):
        expected = hf.base_model.model[idx].get_delta_weight("mix").detach()
        torch.testing.assert_close(ours[idx].delta_weight("mix"), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd"])
def test_dare_matches_direct_formula(method: str) -> None:
    """Recompute with merge_utils in HF PEFT's order: module by module; A then B (or the dense ΔW)."""
    model = _model(same_rank=True)
    weights = {"a": 0.6, "b": 0.4}
    rank = 64 if method.endswith("_svd") else None  # full rank: the SVD step is then exact
    combine(model, weights, method=method, name="mix", density=0.5, seed=7, rank=rank)
    fn = getattr(mu, method.removesuffix("_svd"))
    g = torch.Generator().manual_seed(7)
    for _, layer in adapter_layers(model):
        pairs = [as_matrices(*factors(layer, a)) for a in weights if a]
        got_A, got_B = as_matrices(*factors(layer, "mix"))
        if method.endswith("_svd"):
            deltas = [
                (B2 @ A2).detach() * layer.scaling[a] for (A2, B2), a in zip(pairs, weights, strict=True)
            ]
            expected = fn(deltas, list(weights.values()), 0.5, generator=g)
            torch.testing.assert_close(got_B @ got_A, expected, rtol=0, atol=1e-9)
        else:
            roots = [(w * layer.scaling[a]) ** 0.5 for a, w in weights.items()]
            A = fn([factors(layer, a)[0].detach() for a in weights], roots, 0.5, generator=g)
            B = fn([factors(layer, a)[1].detach() for a in weights], roots, 0.5, generator=g)
            torch.testing.assert_close(factors(layer, "mix")[0], A, rtol=0, atol=1e-12)
            torch.testing.assert_close(factors(layer, "mix")[1], B, rtol=0, atol=1e-12)


def test_seed_reproduces_and_global_rng_untouched_by_exact_methods() -> None:
    model = _model(same_rank=True)
    combine(model, WEIGHTS, method="dare_ties", name="x", density=0.5, seed=3)
    combine(model, WEIGHTS, method="dare_ties", name="y", density=0.5, seed=3)
    for _, layer in adapter_layers(model):
        assert torch.equal(layer.delta_weight("x"), layer.delta_weight("y"))
    before = torch.random.get_rng_state()
    combine(model, WEIGHTS, method="cat", name="z")
    assert torch.equal(torch.random.get_rng_state(), before)


def test_one_source_still_gets_its_method() -> None:
    """Unlike HF PEFT (which switches to linear), ties on one adapter trims its factors to the density."""
    model = _model(same_rank=True)
    combine(model, {"b": 1.0}, method="ties", density=0.5, name="one")
    for _, layer in adapter_layers(model):
        A, B = factors(layer, "one")
        assert int((A == 0).sum()) == A.numel() - int(0.5 * A.numel())
        assert int((B == 0).sum()) == B.numel() - int(0.5 * B.numel())


def test_linear_caveat_exact_for_one_adapter() -> None:
    model = _model(same_rank=True)
    combine(model, {"b": 0.8}, method="linear", name="one")
    assert _max_err(model, "one", {"b": 0.8}) < 1e-9


def test_new_adapter_saves_and_loads_in_hf_layout(tmp_path: Path) -> None:
    model = _model()
    combine(model, WEIGHTS, method="cat", name="mix")
    pk.save_adapter(model, tmp_path, "mix")
    torch.manual_seed(0)
    fresh = Tiny().double()
    fresh.load_state_dict(
        {k.replace("base_layer.", ""): v for k, v in model.state_dict().items() if "lora" not in k}
    )
    pk.load_adapter(fresh, tmp_path, name="mix")
    for (_, mine), (_, theirs) in zip(adapter_layers(model), adapter_layers(fresh), strict=True):
        torch.testing.assert_close(theirs.delta_weight("mix"), mine.delta_weight("mix"), rtol=0, atol=0)


def test_all_methods_run_and_leave_sources_alone() -> None:
    model = _model(same_rank=True)
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    for method in COMBINATION_METHODS:
        density = 0.5 if any(k in method for k in ("ties", "dare", "magnitude")) else None
        combine(model, WEIGHTS, method=method, name=f"m_{method}", density=density, seed=0)
    now = model.state_dict()
    assert all(torch.equal(now[k], v) for k, v in snapshot.items())
    assert pk.active_adapters(model) == ["a"]


# ------------------------------------------------------------------ bad input: clear errors, nothing changed


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"weights": {"a": 0.5, "zzz": 0.5}}, AdapterNotFoundError, "'zzz'"),
        ({"weights": {}}, ConfigError, "must map adapter names"),
        ({"method": "average"}, ConfigError, "method='average' is unknown"),
        ({"method": "ties", "density": 0.0}, ConfigError, r"density=0.0 is outside \(0, 1\]"),
        ({"method": "dare_linear", "density": 1.5}, ConfigError, "density=1.5"),
        ({"method": "ties"}, ConfigError, "needs density"),
        ({"method": "cat", "density": 0.5}, ConfigError, "not used by method='cat'"),
        ({"method": "ties", "density": 0.5, "majority_sign_method": "max"}, ConfigError, "'max'"),
        ({"method": "linear"}, ConfigError, r"needs equal ranks, but emb has ranks \{'a': 4, 'b': 3\}"),
        ({"method": "cat", "rank": 4}, ConfigError, "rank=4"),
        ({"name": "a"}, AdapterExistsError, "'a' already exists"),
        ({"weights": {"a": "x", "b": 1.0}}, ConfigError, "'x'"),
        ({"weights": {"a": float("nan"), "b": 1.0}}, ConfigError, "weight for 'a' is nan; weights must be finite"),
        ({"weights": {"a": 0.5, "b": float("-inf")}}, ConfigError, "weight for 'b' is -inf"),
        ({"method": "dare_ties", "density": 0.5, "seed": "7"}, ConfigError, r"seed='7' must be an integer"),
        ({"method": "dare_linear", "density": 0.5, "seed": 1.5}, ConfigError, r"seed=1.5 must be an integer"),
    ],
)
def test_bad_input_changes_nothing(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    model = _model()
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    args = {"weights": WEIGHTS, "name": "mix", **kwargs}
    with pytest.raises(error, match=match):
        combine(model, **args)
    assert list_adapters(model) == ["a", "b"]
    assert snapshot.keys() == model.state_dict().keys()


def test_different_targets_combine_over_their_union() -> None:
    torch.manual_seed(0)
    model = Tiny().double()
    pk.apply(model, pk.LoRA(target_modules=["q", "v"], rank=3), name="a")
    pk.apply(model, pk.LoRA(target_modules=["q", "conv"], rank=2, alpha=5), name="b")
    _randomize(model)
    combine(model, {"a": 0.7, "b": -0.4}, method="cat", name="mix")
    assert sorted(get_state(model).targets["mix"]) == ["conv", "q", "v"]
    layers = dict(adapter_layers(model))
    assert layers["q"].rank["mix"] == 5 and layers["v"].rank["mix"] == 3 and layers["conv"].rank["mix"] == 2
    for name, present in (("q", {"a": 0.7, "b": -0.4}), ("v", {"a": 0.7}), ("conv", {"b": -0.4})):
        layer = layers[name]
        expected = sum(w * layer.delta_weight(a) for a, w in present.items())
        torch.testing.assert_close(layer.delta_weight("mix"), expected, rtol=0, atol=1e-12)
    combine(model, {"a": 1.0, "b": 1.0}, method="dare_ties_svd", name="dare", density=0.5, seed=1)
    assert sorted(get_state(model).targets["dare"]) == ["conv", "q", "v"]


@pytest.mark.parametrize(("method", "kwargs"), [("cat", {}), ("svd", {}), ("linear", {}), ("ties", {"density": 0.5})])
def test_different_targets_match_hf_add_weighted_adapter(tmp_path: Path, method: str, kwargs: dict[str, Any]) -> None:
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(10, 12), nn.ReLU(), nn.Linear(12, 9))
    state = {k: v.clone() for k, v in base.state_dict().items()}
    hf = peft.get_peft_model(base, peft.LoraConfig(target_modules=["0", "2"], r=4, lora_alpha=6), adapter_name="first")
    hf.add_adapter("second", peft.LoraConfig(target_modules=["0"], r=4, lora_alpha=3))
    for n, p in hf.named_parameters():
        if "lora_" in n:
            nn.init.normal_(p)
    hf.save_pretrained(str(tmp_path))
    ours = nn.Sequential(nn.Linear(10, 12), nn.ReLU(), nn.Linear(12, 9))
    ours.load_state_dict(state)
    pk.load_adapter(ours, tmp_path / "first", name="a")
    pk.load_adapter(ours, tmp_path / "second", name="b")

    hf.add_weighted_adapter(["first", "second"], [0.6, -0.3], "mix", combination_type=method, **kwargs)
    combine(ours, {"a": 0.6, "b": -0.3}, method=method, name="mix", **kwargs)
    for idx in (0, 2):
        expected = hf.base_model.model[idx].get_delta_weight("mix").detach()
        torch.testing.assert_close(ours[idx].delta_weight("mix"), expected, rtol=1e-5, atol=1e-5)


def test_different_base_models_refused() -> None:
    model = _model()
    state = get_state(model)
    state.configs["a"].extra["base_model_name_or_path"] = "org/llama"
    state.configs["b"].extra["base_model_name_or_path"] = "org/mistral"
    with pytest.raises(ConfigError, match="different base models"):
        combine(model, WEIGHTS)
