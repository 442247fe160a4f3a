"""EVA: LoRA's A from the principal directions of each layer's inputs, ranks redistributed by explained variance.

Paischer et al., 2024, "One Initialization to Rule them All: Fine-tuning via Explained Variance Adaptation"
(https://arxiv.org/abs/2410.07170). For a target layer with input activations X (tokens × in), EVA sets ``A`` to the
top right-singular vectors of the centred X (its principal components, found by an incremental PCA over batches) and
keeps ``B = 0``, so the model's output is unchanged. Each layer computes ``round(r·ρ)`` components; the budget of
``Σ r`` ranks then goes to the components that explain the largest share of their layer's variance, so a layer ends
with between 0 (its adapter is dropped) and ``r·ρ`` ranks. With ``adjust_scaling`` α scales with the rank
(``α·r'/r``), so that every layer keeps HF PEFT's scale ``α/r``.

Usage: ``pk.apply(model, pk.LoRA(init="eva", ...))`` adds the adapter as plain LoRA (A Kaiming, B zero); then
``pk.init_eva(model, batches)`` runs the model over the batches (base output, adapters off) until the leading
components of every layer have converged (cosine similarity ≥ ``tau`` between consecutive batches) and writes the
factors. This follows HF PEFT's ``initialize_lora_eva_weights`` step for step (the incremental PCA's randomized SVD
included), so the same model, data and seed give its factors, ranks and ``rank_pattern``.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sized
from itertools import cycle
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from peftkit.core.state import disable_adapters, get_state
from peftkit.core.walk import set_module
from peftkit.errors import ConfigError
from peftkit.methods.lora_init import data_init_layers
from peftkit.methods.lora_layers import LoRALinear

if TYPE_CHECKING:
    from peftkit.methods.lora import LoRA

#: Above this ρ the per-layer ceiling is capped by the largest weight dimension (as HF PEFT does).
_RHO_CAP = 1000


class IncrementalPCA:
    """Principal components of rows fed batch by batch (scikit-learn's ``IncrementalPCA.partial_fit``), each step a
    randomized SVD (``torch.svd_lowrank``, q = 2k, 4 iterations, seed 42) as in HF PEFT's ``IncrementalPCA``."""

    def __init__(self, n_components: int) -> None:
        self.k = n_components
        self.seen = torch.tensor([0])
        self.mean: torch.Tensor | None = None
        self.var: torch.Tensor | None = None
        self.components: torch.Tensor | None = None  # k × features
        self.singular_values = torch.empty(0)
        self.explained_variance_ratio = torch.empty(0)

    def partial_fit(self, X: torch.Tensor) -> None:
        X = X.clone()
        n = X.shape[0]
        mean, var, total = self._mean_and_var(X)
        if self.components is None:
            X -= mean
        else:  # the previous components stand in for the rows seen so far, plus a row for the shift of the mean
            assert self.mean is not None
            batch_mean = X.mean(dim=0)
            X -= batch_mean
            correction = torch.sqrt((self.seen.double() / total) * n) * (self.mean - batch_mean)
            X = torch.vstack((self.singular_values.view(-1, 1) * self.components, X, correction))
        with torch.random.fork_rng():
            torch.manual_seed(42)
            _, S, V = torch.svd_lowrank(X, q=2 * self.k, niter=4)
        Vt = V.mH
        signs = torch.sign(Vt[range(Vt.shape[0]), torch.argmax(torch.abs(Vt), dim=1)])  # deterministic signs
        Vt *= signs.view(-1, 1)
        self.seen, self.mean, self.var = total, mean, var
        self.components, self.singular_values = Vt[: self.k], S[: self.k]
        self.explained_variance_ratio = (S**2 / torch.sum(var * total))[: self.k]

    def _mean_and_var(self, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The running column mean and variance (fp64 sums) and row count, with ``X`` added."""
        new = torch.tensor([X.shape[0]], device=X.device)
        total = self.seen.to(X.device) + new
        last_sum = (torch.zeros(X.shape[1], dtype=torch.float64, device=X.device) if self.mean is None
                    else self.mean * self.seen)
        new_sum = X.sum(dim=0, dtype=torch.float64)
        centred = X - new_sum / new
        correction = centred.sum(dim=0, dtype=torch.float64).square()
        new_var = centred.square().sum(dim=0, dtype=torch.float64) - correction / new
        if self.var is None:
            return (last_sum + new_sum) / total, new_var / total, total
        ratio = self.seen.double() / new
        var = self.var * self.seen + new_var + ratio / total * (last_sum / ratio - new_sum).square()
        return (last_sum + new_sum) / total, var / total, total


class _LayerSVD:
    """A forward hook feeding one layer's selected input rows to its incremental PCA."""

    def __init__(self, k: int, tau: float) -> None:
        self.pca = IncrementalPCA(k)
        self.tau = tau
        self.converged = torch.zeros(k, dtype=torch.bool)
        self.rows: Callable[[torch.Tensor], torch.Tensor] = _all_rows
        self.handle: Any = None

    @torch.no_grad()
    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        states = self.rows(args[0])
        if states.shape[0] < self.pca.k:  # too few tokens in this batch for k components: wait for the next
            return
        previous = None if self.pca.components is None else self.pca.components.clone()
        self.pca.partial_fit(states.to(torch.float32))
        if previous is not None:
            assert self.pca.components is not None
            sim = torch.nn.functional.cosine_similarity(self.pca.components, previous)
            self.converged = sim >= self.tau


def _all_rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]) if x.ndim > 2 else x


def _row_selector(batch: Any, use_label_mask: bool, label_mask_value: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """The rows of a layer input that EVA uses: for a mapping with ``input_ids``, the tokens that ``attention_mask``
    keeps (and, with ``use_label_mask``, whose label is not ``label_mask_value``); otherwise every row."""
    if not (isinstance(batch, Mapping) and "input_ids" in batch):
        return _all_rows
    mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).bool()
    if use_label_mask and "labels" in batch:
        mask = mask & (batch["labels"] != label_mask_value)
    index = mask.nonzero().T.unbind()
    return lambda x: x[index]


def _to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return type(batch)({k: _to(v, device) for k, v in batch.items()})  # type: ignore[call-arg]
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to(v, device) for v in batch)
    return batch


def _default_forward(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, torch.Tensor):
        return model(batch)
    raise ConfigError(f"pk.init_eva cannot run the model on a batch of type {type(batch).__name__}: pass mappings "
                      "of model inputs (input_ids, attention_mask, labels), tensors of input ids, or "
                      "forward=lambda model, batch: ... to run it")


def _checked(model: nn.Module, batches: Iterable[Any], name: str, rho: float, tau: float) -> list[str]:
    """Refuse bad arguments before anything runs; the qualified names of adapter ``name``'s layers."""
    names = data_init_layers(model, name, "eva", "EVA")
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not math.isfinite(rho) or rho < 1:
        raise ConfigError(f"rho={rho!r} must be a number >= 1 (1: no rank redistribution, 2: up to twice the rank)")
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0 <= tau <= 1:
        raise ConfigError(f"tau={tau!r} must be in [0, 1] (the cosine similarity at which a component has "
                          "converged, e.g. 0.99)")
    if iter(batches) is batches:
        raise ConfigError("pk.init_eva reads the batches more than once: pass a list or a DataLoader, not an "
                          f"iterator ({type(batches).__name__})")
    if next(iter(batches), None) is None:
        raise ConfigError("pk.init_eva got no batches: pass at least one batch of model inputs")
    return names


def _distribute(svds: dict[str, _LayerSVD], owner: dict[str, str], twins: dict[str, str], budget: int,
                ceiling: dict[str, int]) -> dict[str, int]:
    """Give the ``budget`` ranks to the components explaining the largest share of their layer's variance; a layer
    whose inputs equal another's takes the higher of the two ranks onto the layer that computed them."""
    ratios = {q: svd.pca.explained_variance_ratio[: ceiling[q]] for q, svd in svds.items()}
    keys, values = zip(*[(q, v) for q, computed in owner.items() for v in ratios[computed]], strict=True)
    order = torch.stack(list(values)).argsort(descending=True)
    counts = Counter(keys[i] for i in order[:budget].tolist())
    ranks = {q: counts.get(q, 0) for q in owner}
    for q, computed in twins.items():
        if ranks[computed] < ranks[q]:
            ranks[computed], ranks[q] = ranks[q], ranks[computed]
    return ranks


def _first_inputs(model: nn.Module, names: list[str], batch: Any, rows: Callable[[torch.Tensor], torch.Tensor],
                  forward: Callable[[nn.Module, Any], Any]) -> dict[str, torch.Tensor]:
    """Each layer's selected input rows for one batch."""
    seen: dict[str, torch.Tensor] = {}

    def keep(qualname: str) -> Callable[[nn.Module, tuple[Any, ...], Any], None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            seen.setdefault(qualname, rows(args[0]).detach().clone())
        return hook

    handles = [model.get_submodule(q).register_forward_hook(keep(q)) for q in names]
    try:
        forward(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _twins(names: list[str], inputs: dict[str, torch.Tensor]) -> dict[str, str]:
    """Layer → the first layer (in module order) that sees the very same input, for layers that are not first
    (q/k/v projections of one block): one PCA serves them all."""
    twins: dict[str, str] = {}
    firsts: list[str] = []
    for q in names:
        x = inputs.get(q)
        first = next((f for f in firsts if x is not None and torch.equal(inputs[f], x)), None)
        if first is None:
            firsts.append(q)
        else:
            twins[q] = first
    groups = {f: [q for q in names if twins.get(q) == f] for f in firsts}  # HF PEFT's order: group by group
    return {q: f for f in firsts for q in groups[f]}


@torch.no_grad()
def init_eva(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    name: str = "default",
    rho: float = 2.0,
    tau: float = 0.99,
    use_label_mask: bool = True,
    label_mask_value: int = -100,
    whiten: bool = False,
    adjust_scaling: bool = True,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    show_progress: bool = True,
) -> dict[str, int]:
    """Initialise adapter ``name`` (applied with ``pk.LoRA(init="eva", ...)``) by EVA from ``batches``.

    Args:
        model: the model holding the adapter; it runs with adapters disabled and in eval mode (its mode is restored).
        batches: a list or a DataLoader (read in a cycle until every layer has converged), each batch a mapping of
            model inputs (``input_ids``, ``attention_mask``, ``labels``: masked tokens are left out) or a tensor of
            input ids (every token counts). Moved to the model's device.
        name: the adapter.
        rho: a layer's rank may reach ``round(r·rho)`` (≥ 1; 1 keeps every rank).
        tau: the cosine similarity between consecutive batches at which a component has converged.
        use_label_mask, label_mask_value: leave out tokens whose label is ``label_mask_value``.
        whiten: divide each component by the square root of its singular value.
        adjust_scaling: a layer whose rank changes from r to r' gets α·r'/r, keeping the scale α/r.
        forward: ``forward(model, batch)`` runs the model (default: ``model(**batch)``, or ``model(batch)``).
        show_progress: a progress bar with the number of converged layers.

    Returns:
        Each adapted layer's rank (0: its adapter was dropped). Layers whose rank changed hold new factor tensors:
        create the optimizer afterwards. The applied config records the ranks and α that
        differ as ``rank_pattern``/``alpha_pattern`` (exact names), as HF PEFT does.

    Raises:
        AdapterNotFoundError: no adapter ``name``.
        ConfigError: the adapter is not ``init="eva"`` or is merged; ``rho``/``tau`` out of range; no batches, or an
            iterator; a layer with fewer input features than its ``round(r·rho)`` components; a batch type the
            default ``forward`` cannot run. All before the model changes.
    """
    names = _checked(model, batches, name, rho, tau)
    state = get_state(model)
    config = cast("LoRA", state.configs[name])
    run = forward or _default_forward
    params = [p for p in model.parameters() if p.device.type != "meta"]
    device = params[0].device if params else torch.device("cpu")
    if rho > _RHO_CAP:
        rho = min(rho, max(max(p.shape) for p in model.parameters()) // config.rank)
    ceiling = {q: round(config.rank_for(q) * rho) for q in names}
    for q in names:
        features = cast(LoRALinear, model.get_submodule(q)).in_features
        if ceiling[q] > features:
            raise ConfigError(f"pk.init_eva: {q!r} has {features} input features, fewer than the {ceiling[q]} "
                              f"components rank × rho asks for; lower rho (={rho}) or its rank")
    budget = sum(config.rank_for(q) for q in names)
    training = model.training
    model.eval()
    try:
        with disable_adapters(model):
            ranks, pcas = _fit(model, batches, names, ceiling, budget, device, run, tau,
                               lambda b: _row_selector(b, use_label_mask, label_mask_value), show_progress)
    finally:
        model.train(training)
    components = {}
    for q in names:
        rank, pca = ranks[q], pcas[q]
        assert pca.components is not None
        u = pca.components[:rank]
        components[q] = (u / pca.singular_values[:rank].sqrt().reshape(-1, 1) if whiten else u).to(device)
    _write(model, name, components, adjust_scaling)
    settings = {"rho": rho, "tau": tau, "use_label_mask": use_label_mask, "label_mask_value": label_mask_value,
                "whiten": whiten, "adjust_scaling_factors": adjust_scaling}
    state.configs[name] = state.configs[name].replace(extra={**config.extra, "eva_config": settings})
    return {q: components[q].shape[0] for q in names}


def _fit(model: nn.Module, batches: Iterable[Any], names: list[str], ceiling: dict[str, int], budget: int,
         device: torch.device, run: Callable[[nn.Module, Any], Any], tau: float,
         selector: Callable[[Any], Callable[[torch.Tensor], torch.Tensor]],
         show_progress: bool) -> tuple[dict[str, int], dict[str, IncrementalPCA]]:
    """Run the PCAs until the components each layer's rank needs have converged: ``(ranks, PCA per layer)``."""
    first = _to(next(iter(batches)), device)
    twins = _twins(names, _first_inputs(model, names, first, selector(first), run))
    for group in {f for f in twins.values()}:  # layers sharing inputs compute as many components as the largest
        members = [group] + [q for q, f in twins.items() if f == group]
        top = max(ceiling[q] for q in members)
        ceiling.update({q: top for q in members})
    svds = {q: _LayerSVD(ceiling[q], tau) for q in names if q not in twins}
    for q, svd in svds.items():
        svd.handle = model.get_submodule(q).register_forward_hook(svd)
    owner = {**{q: q for q in svds}, **twins}
    done = dict.fromkeys(svds, False)
    ranks = dict(ceiling)
    bar = None
    if show_progress:
        from tqdm.auto import tqdm

        bar = tqdm(desc="EVA", unit="batch", leave=False, dynamic_ncols=True)
    size = len(batches) if isinstance(batches, Sized) else None
    try:
        for step, batch in enumerate(cycle(batches)):
            batch = _to(batch, device)
            rows = selector(batch)
            for q, svd in svds.items():
                converged = bool(svd.converged[: ranks[q]].all())
                if not done[q] and converged:  # stop feeding a layer whose needed components have converged
                    svd.handle.remove()
                    done[q] = True
                    continue
                if done[q] and not converged:  # its rank grew since: it needs more components again
                    svd.handle = model.get_submodule(q).register_forward_hook(svd)
                    done[q] = False
                svd.rows = rows
            if bar is not None:
                bar.set_postfix_str(f"{sum(done[owner[q]] for q in owner)}/{len(owner)} layers converged")
                bar.update()
            if all(done.values()):
                break
            run(model, batch)
            if not all(svd.pca.components is not None for svd in svds.values()):
                if size is not None and step + 1 >= size:
                    short = [q for q, s in svds.items() if s.pca.components is None]
                    raise ConfigError(f"pk.init_eva: no batch has {ceiling[short[0]]} selected tokens for "
                                      f"{short[0]!r} (rank × rho components need as many rows); pass larger "
                                      "batches, or lower rho")
                continue
            ranks = _distribute(svds, owner, twins, budget, ceiling)
    finally:
        for q, svd in svds.items():
            if not done[q]:
                svd.handle.remove()
        if bar is not None:
            bar.close()
    return ranks, {q: svds[owner[q]].pca for q in owner}


def _write(model: nn.Module, name: str, components: dict[str, torch.Tensor], adjust_scaling: bool) -> None:
    """Set each layer's A to its components (B stays zero), at the new rank (α scaled with it under
    ``adjust_scaling``); drop the adapter from layers left with rank 0; record the ranks and α that differ from the
    config's as exact-name patterns."""
    state = get_state(model)
    config = cast("LoRA", state.configs[name])
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    for q, u in components.items():
        layer = cast(LoRALinear, model.get_submodule(q))
        rank, alpha = config.rank_for(q), config.alpha_for(q)
        new = u.shape[0]
        if new == 0:
            layer.delete_adapter(name)
            if not layer.adapter_names:
                set_module(model, q, layer.base_layer)
            continue
        if new != rank:
            alpha = alpha * new / rank if adjust_scaling else alpha
            trainable = layer.factor_weights(name)[0].requires_grad
            layer.add(name, new, alpha, dropout=config.dropout, use_rslora=config.use_rslora,
                      init_A="zero", init_B="zero", dropout_position=layer.dropout_position[name])
            for p in (*layer.lora_A[name].parameters(), *layer.lora_B[name].parameters()):
                p.requires_grad_(trainable)
        A, B = layer.factor_weights(name)
        A.copy_(u)
        B.zero_()
        if new != config.rank:
            rank_pattern[q] = new
        if alpha != config.alpha:
            alpha_pattern[q] = alpha
    state.targets[name] = [q for q in state.targets[name] if components.get(q, torch.empty(1)).shape[0] != 0]
    state.configs[name] = config.replace(rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
