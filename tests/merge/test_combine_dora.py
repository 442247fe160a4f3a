"""pk.combine and pk.prune on DoRA adapters: the low-rank direction updates and the magnitudes, as documented.

Every DoRA layer holds ΔVᵢ = sᵢ·BᵢAᵢ and mᵢ; combine gives ΔV = the LoRA rule on the ΔVᵢ and
m = ‖W₀‖ + f(mᵢ − ‖W₀‖); prune shrinks ΔV and keeps m.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from torch import nn

import peftkit as pk
from peftkit.core.state import adapter_layers, get_state
from peftkit.errors import ConfigError
from peftkit.merge import merge_utils as mu
from peftkit.merge.combine import as_matrices, combine, factors
from peftkit.merge.prune import prune
from peftkit.methods.dora import DoRA

TARGETS = ["emb", "q", "v"]
WEIGHTS = {"a": 0.7, "b": 0.3}


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.q = nn.Linear(6, 8)
        self.v = nn.Linear(8, 6)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.v(torch.relu(self.q(self.emb(ids))))


def _model(kind_b: type = DoRA) -> nn.Module:
    """Two trained-looking DoRA adapters: different ranks per module, alpha patterns, rsLoRA on one."""
    torch.manual_seed(0)
    model = Tiny().double()
    pk.apply(model, DoRA(target_modules=TARGETS, rank=4, alpha=8, rank_pattern={"v": 2}, alpha_pattern={"q": 3}),
             name="a")
    pk.apply(model, kind_b(target_modules=TARGETS, rank=3, alpha=5, use_rslora=True), name="b")
    g = torch.Generator().manual_seed(0)
    for _, layer in adapter_layers(model):
        for name in layer.adapter_names:
            A, B = factors(layer, name)
            A.data.copy_(torch.randn(A.shape, generator=g, dtype=A.dtype) * 0.5)
            B.data.copy_(torch.randn(B.shape, generator=g, dtype=B.dtype) * 0.5)
            if name in getattr(layer, "lora_magnitude_vector", {}):
                m = layer.lora_magnitude_vector[name]
                m.data.mul_(1 + 0.3 * torch.randn(m.shape, generator=g, dtype=m.dtype))
    return model


def _ids() -> torch.Tensor:
    return torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(1))


def _dV(layer: nn.Module, name: str) -> torch.Tensor:
    A, B = as_matrices(*factors(layer, name))
    return (B @ A).detach() * layer.scaling[name]


def _m(layer: nn.Module, name: str) -> torch.Tensor:
    return layer.lora_magnitude_vector[name].detach()


def _dora_delta(W0: torch.Tensor, dV: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """The paper's formula on (rows the magnitude scales, ·) orientation: m·(W₀+ΔV)/‖W₀+ΔV‖ − W₀."""
    V = W0 + dV
    return (m / V.norm(dim=1))[:, None] * V - W0


def _output(model: nn.Module, name: str) -> torch.Tensor:
    pk.set_adapter(model, name)
    with torch.no_grad():
        return model(_ids())


def test_cat_sums_direction_updates_exactly_and_averages_magnitudes() -> None:
    model = _model()
    combine(model, WEIGHTS, method="cat", name="mix")
    assert isinstance(get_state(model).configs["mix"], DoRA)
    for qualname, layer in adapter_layers(model):
        expected = sum(w * _dV(layer, a) for a, w in WEIGHTS.items())
        torch.testing.assert_close(_dV(layer, "mix"), expected, atol=1e-12, rtol=0)
        identity = layer.base_norms().double()
        offsets = sum(w * (_m(layer, a) - identity) for a, w in WEIGHTS.items())
        torch.testing.assert_close(_m(layer, "mix"), identity + offsets, atol=1e-12, rtol=0)
        # weights summing to 1: the weighted mean of the magnitudes
        torch.testing.assert_close(_m(layer, "mix"), sum(w * _m(layer, a) for a, w in WEIGHTS.items()))
        # and the layer computes DoRA's formula with them (W₀ oriented: rows are what m scales)
        W0 = layer._oriented().detach()
        delta = layer.delta_weight("mix").detach()
        got = delta.T if qualname == "emb" else delta
        torch.testing.assert_close(got, _dora_delta(W0, expected, _m(layer, "mix")), atol=1e-10, rtol=1e-10)


def test_one_adapter_with_weight_one_is_reproduced() -> None:
    model = _model()
    for method in ("cat", "svd"):
        combine(model, {"a": 1.0}, method=method, name=f"copy_{method}")
        torch.testing.assert_close(_output(model, f"copy_{method}"), _output(model, "a"), atol=1e-10, rtol=1e-10)


def test_negative_weight_subtracts_from_the_identity_magnitude() -> None:
    """Weights not summing to 1: magnitudes combine as offsets from ‖W₀‖, not as a mean."""
    model = _model()
    weights = {"a": 1.0, "b": -0.5}
    combine(model, weights, method="cat", name="diff")
    for _, layer in adapter_layers(model):
        identity = layer.base_norms().double()
        expected = identity + (_m(layer, "a") - identity) - 0.5 * (_m(layer, "b") - identity)
        torch.testing.assert_close(_m(layer, "diff"), expected, atol=1e-12, rtol=0)
    combine(model, {"a": 0.0}, method="cat", name="zero")  # the zero task vector is the base model
    pk.set_adapter(model, "zero")
    with torch.no_grad():
        adapted = model(_ids())
        with pk.disable_adapters(model):
            base = model(_ids())
    torch.testing.assert_close(adapted, base, atol=1e-12, rtol=0)


def test_svd_at_full_rank_equals_cat_and_truncation_keeps_the_magnitude() -> None:
    model = _model()
    combine(model, WEIGHTS, method="cat", name="cat")
    combine(model, WEIGHTS, method="svd", name="full", rank=7)
    combine(model, WEIGHTS, method="svd", name="low", rank=1)
    for _, layer in adapter_layers(model):
        torch.testing.assert_close(_dV(layer, "full"), _dV(layer, "cat"), atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(_m(layer, "full"), _m(layer, "cat"), atol=0, rtol=0)
        torch.testing.assert_close(_m(layer, "low"), _m(layer, "cat"), atol=0, rtol=0)
        assert layer.rank["low"] == 1
    torch.testing.assert_close(_output(model, "full"), _output(model, "cat"), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize(
    ("method", "fn", "kwargs"),
    [
        ("ties_svd", mu.ties, {"density": 0.5, "majority_sign_method": "total"}),
        ("magnitude_prune_svd", mu.magnitude_prune, {"density": 0.5}),
        ("ties", mu.ties, {"density": 0.6, "majority_sign_method": "frequency"}),
    ],
)
def test_magnitudes_go_through_the_methods_merge_function(method: str, fn: object, kwargs: dict) -> None:
    model = _model()
    if not method.endswith("_svd"):  # factor-space methods need equal ranks
        model = Tiny().double()
        for name in ("a", "b"):
            pk.apply(model, DoRA(target_modules=TARGETS, rank=3, alpha=6), name=name)
            for _, layer in adapter_layers(model):
                layer.lora_magnitude_vector[name].data.mul_(1 + 0.2 * torch.randn_like(_m(layer, name)))
    combine(model, WEIGHTS, method=method, name="mix", **kwargs)
    for _, layer in adapter_layers(model):
        identity = layer.base_norms().double()
        offsets = [_m(layer, a) - identity for a in WEIGHTS]
        expected = identity + fn(offsets, list(WEIGHTS.values()), **kwargs)  # type: ignore[operator]
        torch.testing.assert_close(_m(layer, "mix"), expected, atol=1e-12, rtol=0)


def test_dare_with_a_seed_is_reproducible() -> None:
    model = _model()
    for name in ("d1", "d2"):
        combine(model, WEIGHTS, method="dare_linear_svd", name=name, density=0.5, seed=3)
    for _, layer in adapter_layers(model):
        assert torch.equal(_m(layer, "d1"), _m(layer, "d2"))
        assert torch.equal(_dV(layer, "d1"), _dV(layer, "d2"))


def test_mixing_dora_and_lora_is_refused_and_changes_nothing() -> None:
    # A plain LoRA adapter may sit on DoRA layers (as in HF PEFT), but combining it with a DoRA one is refused.
    model = _model(kind_b=pk.LoRA)
    before = set(get_state(model).configs)
    with pytest.raises(ConfigError, match=r"\['a'\] are DoRA and \['b'\] plain LoRA"):
        combine(model, WEIGHTS, method="svd", name="mix", rank=2)
    assert set(get_state(model).configs) == before
    assert all("mix" not in layer.adapter_names for _, layer in adapter_layers(model))


def test_combined_dora_adapter_round_trips_through_disk(tmp_path: Path) -> None:
    model = _model()
    combine(model, WEIGHTS, method="svd", name="mix", rank=2)
    expected = _output(model, "mix")
    pk.save_adapter(model, tmp_path / "mix", name="mix")
    fresh = Tiny().double()
    fresh.load_state_dict({k: v for k, v in _base_state(model).items()})
    pk.load_adapter(fresh, tmp_path / "mix")
    assert isinstance(get_state(fresh).configs["default"], DoRA)
    with torch.no_grad():
        torch.testing.assert_close(fresh(_ids()), expected, atol=1e-10, rtol=1e-10)


def _base_state(model: nn.Module) -> dict[str, torch.Tensor]:
    with pk.disable_adapters(model):
        plain = Tiny().double()
        for name in ("emb", "q", "v"):
            base = getattr(model, name).base_layer
            getattr(plain, name).load_state_dict(base.state_dict())
    return plain.state_dict()


# ------------------------------------------------------------------------------------ prune


def test_prune_rank_keeps_magnitude_and_energy() -> None:
    model = _model()
    magnitudes = {q: _m(layer, "a").clone() for q, layer in adapter_layers(model)}
    old = {q: _dV(layer, "a") for q, layer in adapter_layers(model)}
    report = prune(model, "a", method="rank", energy=0.8, batch=_ids())
    assert isinstance(get_state(model).configs["a"], DoRA)
    for qualname, layer in adapter_layers(model):
        assert torch.equal(_m(layer, "a"), magnitudes[qualname])
        assert layer.lora_magnitude_vector["a"].requires_grad
        new = _dV(layer, "a")
        kept = float(new.norm() ** 2 / old[qualname].norm() ** 2)
        assert kept >= 0.8 - 1e-9 and report.energy_kept[qualname] == pytest.approx(kept)
    assert report.params_after < report.params_before and report.output_drift is not None


def test_prune_to_full_rank_changes_nothing_and_saves_a_loadable_dora_adapter(tmp_path: Path) -> None:
    model = _model()
    expected = _output(model, "a")
    report = prune(model, "a", method="rank", target_rank=4)
    assert report.ranks_after == report.ranks_before
    torch.testing.assert_close(_output(model, "a"), expected, atol=1e-10, rtol=1e-10)
    prune(model, "a", method="rank", target_rank=1)
    pruned = _output(model, "a")
    pk.save_adapter(model, tmp_path / "a", name="a")
    fresh = Tiny().double()
    fresh.load_state_dict(_base_state(model))
    pk.load_adapter(fresh, tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(fresh(_ids()), pruned, atol=1e-10, rtol=1e-10)


def test_prune_magnitude_keeps_the_dora_magnitude() -> None:
    model = _model()
    magnitudes = {q: _m(layer, "b").clone() for q, layer in adapter_layers(model)}
    report = prune(model, "b", method="magnitude", sparsity=0.5)
    assert report.params_after <= 0.55 * report.params_before
    for qualname, layer in adapter_layers(model):
        assert torch.equal(_m(layer, "b"), magnitudes[qualname])


# ------------------------------------------------------------------------------------ CLI


def test_cli_combines_and_prunes_dora_adapters_on_disk(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from peftkit.cli.arith import _base_model, register_combine, register_prune

    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_type": "llama", "vocab_size": 64, "hidden_size": 16, "intermediate_size": 32,
                                  "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2}))
    magnitudes = []
    for i in range(2):
        model = _base_model(str(config), "causal_lm", None, 2)
        pk.apply(model, DoRA(target_modules=["q_proj", "v_proj"], rank=4 - 2 * i, alpha=4))
        g = torch.Generator().manual_seed(i)
        for _, layer in adapter_layers(model):
            for p in layer.adapter_parameters("default"):
                p.data.mul_(1 + 0.1 * torch.randn(p.shape, generator=g)).add_(0.1 * torch.randn(p.shape, generator=g))
        magnitudes.append({q: _m(layer, "default").clone() for q, layer in adapter_layers(model)})
        pk.save_adapter(model, tmp_path / f"ad{i}")
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    register_combine(sub)
    register_prune(sub)

    def run(argv: list[str]) -> int:
        args = parser.parse_args([*argv, "--model", str(config)])
        return int(args.func(args))

    ads = [str(tmp_path / "ad0"), str(tmp_path / "ad1")]
    assert run(["combine", *ads, "--weights", "0.6", "0.4", "--method", "cat", "--out", str(tmp_path / "mix")]) == 0
    assert run(["prune", str(tmp_path / "mix"), "--energy", "0.9", "--out", str(tmp_path / "pruned")]) == 0
    for directory in ("mix", "pruned"):
        assert json.loads((tmp_path / directory / "adapter_config.json").read_text())["use_dora"] is True
        model = _base_model(str(config), "causal_lm", None, 2)
        pk.load_adapter(model, tmp_path / directory)
        for qualname, layer in adapter_layers(model):  # weights sum to 1: the mean of the magnitudes
            expected = 0.6 * magnitudes[0][qualname] + 0.4 * magnitudes[1][qualname]
            torch.testing.assert_close(_m(layer, "default"), expected, atol=1e-5, rtol=1e-5)
