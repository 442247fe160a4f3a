"""peftkit.merge.merge_utils against HF PEFT's merge_utils and against the papers' formulas."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from peftkit.errors import ConfigError
from peftkit.merge import merge_utils as mu

WEIGHTS = [0.7, -0.2, 0.5]


def _tasks(shape: tuple[int, ...] = (12, 10), n: int = 3, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(n)]


# ------------------------------------------------------------------ direct implementations of the papers


def _trim(t: torch.Tensor, density: float) -> torch.Tensor:
    """TIES step 1: keep the top-k entries by |value| (k = ⌊density·numel⌋), via a threshold."""
    k = int(density * t.numel())
    if k == 0:
        return torch.zeros_like(t)
    threshold = t.abs().flatten().sort(descending=True).values[k - 1]
    return torch.where(t.abs() >= threshold, t, torch.zeros_like(t))


def _ties_reference(tasks: list[torch.Tensor], weights: list[float], method: str) -> torch.Tensor:
    """TIES steps 2-3 on trimmed tasks, entry by entry: elect sign, mean over agreeing weighted tasks."""
    out = torch.zeros_like(tasks[0])
    for idx in range(tasks[0].numel()):
        vals = [float(t.flatten()[idx]) for t in tasks]
        score = sum(vals) if method == "total" else sum((v > 0) - (v < 0) for v in vals)
        gamma = 1.0 if score >= 0 else -1.0
        agree = [(w * v) for v, w in zip(vals, weights, strict=False) if v != 0 and (v > 0) == (gamma > 0)]
        out.view(-1)[idx] = sum(agree) / max(1, len(agree))
    return out


def _dare_drop(tasks: list[torch.Tensor], density: float, seed: int) -> list[torch.Tensor]:
    """DARE: m ~ Bernoulli(1 - p) with p = 1 - density, τ̂ = m ⊙ τ / (1 - p)."""
    torch.manual_seed(seed)
    return [t * torch.bernoulli(torch.full_like(t, density)) / density for t in tasks]


@pytest.mark.parametrize("density", [0.2, 0.5, 0.9])
@pytest.mark.parametrize("method", ["total", "frequency"])
def test_ties_matches_paper(density: float, method: str) -> None:
    tasks = _tasks((6, 5))
    expected = _ties_reference([_trim(t, density) for t in tasks], WEIGHTS, method)
    torch.testing.assert_close(mu.ties(tasks, WEIGHTS, density, method), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("density", [0.3, 0.8])
def test_magnitude_prune_matches_paper(density: float) -> None:
    tasks = _tasks()
    expected = sum(w * _trim(t, density) for t, w in zip(tasks, WEIGHTS, strict=False))
    torch.testing.assert_close(mu.magnitude_prune(tasks, WEIGHTS, density), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("density", [0.25, 0.6])
def test_dare_matches_paper(density: float) -> None:
    tasks = _tasks((6, 5))
    dropped = _dare_drop(tasks, density, seed=3)
    torch.manual_seed(3)
    linear = mu.dare_linear(tasks, WEIGHTS, density)
    torch.testing.assert_close(
        linear, sum(w * t for t, w in zip(dropped, WEIGHTS, strict=True)), atol=1e-6, rtol=0
    )
    torch.manual_seed(3)
    ties = mu.dare_ties(tasks, WEIGHTS, density, "frequency")
    torch.testing.assert_close(ties, _ties_reference(dropped, WEIGHTS, "frequency"), rtol=0, atol=1e-6)


def test_dare_keeps_expected_fraction_and_rescales() -> None:
    tensor = torch.ones(200, 200)
    dropped = mu.prune(tensor, 0.3, "random", rescale=True, generator=torch.Generator().manual_seed(0))
    kept = dropped != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.01
    torch.testing.assert_close(dropped[kept], torch.full_like(dropped[kept], 1 / 0.3))


# ------------------------------------------------------------------ parity with HF PEFT


@pytest.fixture(scope="module")
def hf() -> Any:
    return pytest.importorskip("peft.utils.merge_utils")


_CASES: list[tuple[str, dict[str, Any]]] = [
    ("task_arithmetic", {}),
    ("magnitude_prune", {"density": 0.4}),
    ("ties", {"density": 0.4, "majority_sign_method": "total"}),
    ("ties", {"density": 0.7, "majority_sign_method": "frequency"}),
    ("dare_linear", {"density": 0.5}),
    ("dare_ties", {"density": 0.3, "majority_sign_method": "total"}),
    ("dare_ties", {"density": 0.6, "majority_sign_method": "frequency"}),
    ("ties", {"density": 1.0}),
    ("dare_linear", {"density": 1.0}),
]


@pytest.mark.parametrize(("name", "kwargs"), _CASES)
@pytest.mark.parametrize("shape", [(16, 8), (3, 4, 5)])
def test_matches_hf_peft(hf: Any, name: str, kwargs: dict[str, Any], shape: tuple[int, ...]) -> None:
    tasks = _tasks(shape)
    ours: Callable[..., torch.Tensor] = getattr(mu, name)
    theirs: Callable[..., torch.Tensor] = getattr(hf, name)
    torch.manual_seed(11)
    expected = theirs(tasks, torch.tensor(WEIGHTS), **kwargs)
    torch.manual_seed(11)
    got = ours(tasks, WEIGHTS, **kwargs)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", ["total", "frequency"])
def test_helpers_match_hf_peft(hf: Any, method: str) -> None:
    stacked = torch.stack(_tasks((5, 7)))
    stacked[:, 0, 0] = torch.tensor([1.0, -1.0, 0.0])  # an exact tie: both elect +
    mask = mu.calculate_majority_sign_mask(stacked, method)  # type: ignore[arg-type]
    assert torch.equal(mask, hf.calculate_majority_sign_mask(stacked, method))
    assert torch.equal(mu.disjoint_merge(stacked, mask), hf.disjoint_merge(stacked, mask))
    t = stacked[0]
    assert torch.equal(mu.magnitude_based_pruning(t, 0.35), hf.magnitude_based_pruning(t, 0.35))
    torch.manual_seed(5)
    expected = hf.random_pruning(t, 0.35, rescale=True)
    torch.manual_seed(5)
    assert torch.equal(mu.random_pruning(t, 0.35, rescale=True), expected)


# ------------------------------------------------------------------ state dicts, generators, dtypes


@pytest.mark.parametrize("name", ["task_arithmetic", "magnitude_prune", "ties", "dare_linear", "dare_ties"])
def test_state_dicts_merge_key_by_key(name: str) -> None:
    fn: Callable[..., Any] = getattr(mu, name)
    kwargs = {} if name == "task_arithmetic" else {"density": 0.5}
    a, b = _tasks((4, 6), n=2, seed=1), _tasks((6,), n=2, seed=2)
    states = [{"layer.weight": a[i], "layer.bias": b[i]} for i in range(2)]
    torch.manual_seed(0)
    merged = fn(states, [0.6, 0.4], **kwargs)
    torch.manual_seed(0)  # per key, in the first dict's key order
    assert torch.equal(merged["layer.weight"], fn(a, [0.6, 0.4], **kwargs))
    assert torch.equal(merged["layer.bias"], fn(b, [0.6, 0.4], **kwargs))
    assert list(merged) == ["layer.weight", "layer.bias"]


def test_generator_reproduces_global_seed() -> None:
    tasks = _tasks()
    torch.manual_seed(9)
    expected = mu.dare_ties(tasks, WEIGHTS, 0.5)
    got = mu.dare_ties(tasks, WEIGHTS, 0.5, generator=torch.Generator().manual_seed(9))
    assert torch.equal(got, expected)


def test_density_one_is_plain_arithmetic_and_draws_nothing() -> None:
    tasks = _tasks()
    torch.manual_seed(0)
    before = torch.random.get_rng_state()
    got = mu.dare_linear(tasks, WEIGHTS, 1.0)
    assert torch.equal(torch.random.get_rng_state(), before)
    torch.testing.assert_close(got, mu.task_arithmetic(tasks, WEIGHTS), rtol=0, atol=0)


def test_low_precision_inputs_keep_their_dtype() -> None:
    tasks = [t.to(torch.bfloat16) for t in _tasks()]
    for fn in (mu.task_arithmetic, lambda t, w: mu.ties(t, w, 0.5)):
        out = fn(tasks, WEIGHTS)
        assert out.dtype == torch.bfloat16
    exact = mu.task_arithmetic([t.float() for t in tasks], WEIGHTS)
    torch.testing.assert_close(mu.task_arithmetic(tasks, WEIGHTS).float(), exact, rtol=1e-2, atol=1e-2)


def test_inputs_are_not_modified() -> None:
    tasks = _tasks()
    copies = [t.clone() for t in tasks]
    mu.ties(tasks, WEIGHTS, 0.5)
    mu.dare_linear(tasks, WEIGHTS, 0.5)
    mu.task_arithmetic(tasks, WEIGHTS)
    assert all(torch.equal(t, c) for t, c in zip(tasks, copies, strict=False))


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5, float("nan")])
@pytest.mark.parametrize("name", ["magnitude_prune", "ties", "dare_linear", "dare_ties"])
def test_density_outside_unit_interval(name: str, density: float) -> None:
    with pytest.raises(ConfigError, match=r"density=.*outside \(0, 1\]") as info:
        getattr(mu, name)(_tasks(), WEIGHTS, density)
    assert repr(density) in str(info.value)


def test_weight_count_mismatch() -> None:
    with pytest.raises(ConfigError, match="got 2 weights for 3 task tensors"):
        mu.task_arithmetic(_tasks(), [0.5, 0.5])
    with pytest.raises(ConfigError, match="got 4 weights for 3"):
        mu.ties(_tasks(), torch.tensor([1.0, 1.0, 1.0, 1.0]), 0.5)


def test_unknown_sign_method() -> None:
    with pytest.raises(ConfigError, match="majority_sign_method='median'"):
        mu.ties(_tasks(), WEIGHTS, 0.5, "median")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="'median'"):
        mu.calculate_majority_sign_mask(torch.stack(_tasks()), "median")  # type: ignore[arg-type]


def test_mismatched_inputs() -> None:
    with pytest.raises(ConfigError, match="empty"):
        mu.task_arithmetic([], [])
    with pytest.raises(ConfigError, match="different shapes"):
        mu.task_arithmetic([torch.zeros(2, 3), torch.zeros(3, 2)], [1.0, 1.0])
    with pytest.raises(ConfigError, match=r"missing \['b'\]"):
        mu.task_arithmetic([{"a": torch.zeros(2), "b": torch.zeros(2)}, {"a": torch.zeros(2)}], [1.0, 1.0])
    with pytest.raises(ConfigError, match="unknown"):
        mu.prune(torch.zeros(3), 0.5, "l1")  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weight_refused(bad: float) -> None:
    with pytest.raises(ConfigError, match=rf"weight 1 is {bad!r}; weights must be finite"):
        mu.task_arithmetic(_tasks(), [0.5, bad, 0.5])
    with pytest.raises(ConfigError, match=rf"weight 0 is {bad!r}"):
        mu.ties(_tasks(), torch.tensor([bad, 1.0, 1.0]), 0.5)
