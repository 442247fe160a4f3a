"""pk.prune: rank pruning keeps the energy it promises, full rank changes nothing, the result saves and loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import peftkit as pk
from peftkit.core.state import adapter_layers, get_state
from peftkit.errors import AdapterNotFoundError, AdapterStateError, ConfigError
from peftkit.merge.prune import prune


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 12)
        self.q = nn.Linear(12, 16)
        self.v = nn.Linear(16, 12)
        self.conv = nn.Conv1d(12, 10, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.v(torch.relu(self.q(self.emb(ids))))
        return self.conv(h.transpose(1, 2)).flatten(1)


def _model(rslora: bool = False) -> nn.Module:
    torch.manual_seed(0)
    model = Tiny().double()
    config = pk.LoRA(
        target_modules=["emb", "q", "v", "conv"], rank=6, alpha=12, use_rslora=rslora, rank_pattern={"v": 4}
    )
    pk.apply(model, config, name="a")
    g = torch.Generator().manual_seed(1)
    for _, layer in adapter_layers(model):
        for p in layer.adapter_parameters("a"):
            p.data.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def _deltas(model: nn.Module) -> dict[str, torch.Tensor]:
    return {q: layer.delta_weight("a").detach().clone() for q, layer in adapter_layers(model)}


BATCH = torch.randint(0, 11, (2, 7), generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("kwargs", [{"energy": 1.0}, {"target_rank": 6}, {"target_rank": 50}])
def test_full_rank_changes_nothing(kwargs: dict[str, float]) -> None:
    model = _model()
    before = _deltas(model)
    report = prune(model, "a", batch=BATCH, **kwargs)  # type: ignore[arg-type]
    for q, delta in _deltas(model).items():
        torch.testing.assert_close(delta, before[q], rtol=0, atol=1e-9)
    assert report.params_after == report.params_before
    assert report.ranks_after == report.ranks_before == {"emb": 6, "q": 6, "v": 4, "conv": 6}
    assert report.output_drift is not None and report.output_drift < 1e-8


@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("energy", [0.5, 0.8, 0.95])
def test_energy_is_kept_with_best_low_rank(energy: float, rslora: bool) -> None:
    model = _model(rslora)
    before = _deltas(model)
    report = prune(model, "a", energy=energy)
    for q, layer in adapter_layers(model):
        old = before[q].reshape(before[q].shape[0], -1)
        new = layer.delta_weight("a").detach().reshape(old.shape)
        S = torch.linalg.svdvals(old)
        k = layer.rank["a"]
        kept = float((S[:k] ** 2).sum() / (S**2).sum())
        assert kept >= energy
        assert k == 1 or float((S[: k - 1] ** 2).sum() / (S**2).sum()) < energy  # the smallest such rank
        assert float(new.norm() ** 2 / old.norm() ** 2) == pytest.approx(kept, rel=1e-9)
        # Eckart–Young: the error is exactly the dropped singular values
        assert float((old - new).norm()) == pytest.approx(float(S[k:].norm()), rel=1e-7, abs=1e-9)
        assert report.energy_kept[q] == pytest.approx(kept, rel=1e-9)
    assert report.params_after < report.params_before


def test_target_rank_and_scale_survive_save_load(tmp_path: Path) -> None:
    model = _model(rslora=True)
    scales = {q: layer.scaling["a"] for q, layer in adapter_layers(model)}
    report = prune(model, "a", target_rank=3, batch=BATCH)
    assert set(report.ranks_after.values()) == {3}
    assert {q: layer.scaling["a"] for q, layer in adapter_layers(model)} == scales
    assert report.output_drift is not None and report.output_drift > 0
    pk.save_adapter(model, tmp_path, "a")
    fresh = Tiny().double()
    fresh.load_state_dict({k.replace("base_layer.", ""): v for k, v in model.state_dict().items() if "lora" not in k})
    pk.load_adapter(fresh, tmp_path, name="a")
    for (_, mine), (_, loaded) in zip(adapter_layers(model), adapter_layers(fresh), strict=True):
        torch.testing.assert_close(loaded.delta_weight("a"), mine.delta_weight("a"), rtol=1e-12, atol=1e-12)


def test_pruned_adapter_keeps_trainability_and_activity() -> None:
    model = _model()
    prune(model, "a", target_rank=2)
    assert pk.active_adapters(model) == ["a"]
    layer = dict(adapter_layers(model))["q"]
    assert layer.active_adapters == ["a"]
    assert all(p.requires_grad for p in layer.adapter_parameters("a"))
    loss = model(BATCH).sum()
    loss.backward()
    assert layer.lora_A["a"].weight.grad is not None


@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.9])
def test_magnitude_zeroes_smallest_entries(sparsity: float) -> None:
    model = _model()
    originals = {q: [p.detach().clone() for p in layer.adapter_parameters("a")] for q, layer in adapter_layers(model)}
    report = prune(model, "a", method="magnitude", sparsity=sparsity)
    for q, layer in adapter_layers(model):
        for old, new in zip(originals[q], layer.adapter_parameters("a"), strict=True):
            kept = new != 0
            assert int(kept.sum()) == int((1 - sparsity) * old.numel())
            assert torch.equal(new[kept], old[kept])  # survivors untouched
            assert float(old[~kept].abs().max()) <= float(old[kept].abs().min())  # the smallest went
    assert report.params_after < report.params_before
    assert report.ranks_after == report.ranks_before


def test_magnitude_by_energy() -> None:
    model = _model()
    originals = {q: [p.detach().clone() for p in layer.adapter_parameters("a")] for q, layer in adapter_layers(model)}
    prune(model, "a", method="magnitude", energy=0.9)
    for q, layer in adapter_layers(model):
        for old, new in zip(originals[q], layer.adapter_parameters("a"), strict=True):
            assert float(new.detach().norm() ** 2) >= 0.9 * float(old.norm() ** 2)
            assert int((new == 0).sum()) > 0


def test_global_rng_is_untouched() -> None:
    model = _model()
    before = torch.random.get_rng_state()
    prune(model, "a", target_rank=2)
    assert torch.equal(torch.random.get_rng_state(), before)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"name": "zzz"}, AdapterNotFoundError, "'zzz'"),
        ({"method": "l1"}, ConfigError, "method='l1' is unknown"),
        ({"energy": 0.0}, ConfigError, r"energy=0.0 is outside \(0, 1\]"),
        ({"energy": 1.2}, ConfigError, "energy=1.2"),
        ({"target_rank": 0}, ConfigError, "target_rank=0"),
        ({"method": "magnitude", "sparsity": 1.0}, ConfigError, r"sparsity=1.0 is outside \[0, 1\)"),
        ({"sparsity": 0.5}, ConfigError, "applies to method='magnitude'"),
    ],
)
def test_bad_input_changes_nothing(kwargs: dict[str, object], error: type[Exception], match: str) -> None:
    model = _model()
    before = _deltas(model)
    args = {"name": "a", **kwargs}
    with pytest.raises(error, match=match):
        prune(model, **args)  # type: ignore[arg-type]
    for q, delta in _deltas(model).items():
        assert torch.equal(delta, before[q])
    assert get_state(model).configs["a"].rank == 6


def test_merged_adapter_refused() -> None:
    model = _model()
    pk.merge(model)
    with pytest.raises(AdapterStateError, match="unmerge"):
        prune(model, "a", target_rank=2)


@pytest.mark.parametrize("method", ["rank", "magnitude"])
def test_trainable_token_rows_are_kept(method: str) -> None:
    from models import build, randomize_trainable

    model = build("llama")
    pk.apply(model, pk.LoRA(target_modules=["q_proj", "v_proj"], rank=4, trainable_token_indices=[3, 5]))
    randomize_trainable(model)
    rows = {n: p.detach().clone() for n, p in model.named_parameters() if "trainable_tokens_delta" in n}
    pk.prune(model, "default", method=method, energy=0.5)
    assert rows and all(torch.equal(p, rows[n]) for n, p in model.named_parameters() if n in rows)
    assert all(r <= 4 for r in model.model.layers[0].self_attn.q_proj.rank.values())
