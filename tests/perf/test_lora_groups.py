"""Sibling groups (lora_groups): which layers group, and that grouped outputs and gradients equal the plain ones."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from tests.perf.shared import IDS, dora_llama, llama
from torch import nn

import peftkit as pk
from peftkit.methods import lora_groups, lora_kernels
from peftkit.methods.lora_layers import LoRALinear


def _adapt(model: nn.Module, **kwargs: object) -> nn.Module:
    pk.apply(model, pk.LoRA(**{"target_modules": "all-linear", "rank": 4, "alpha": 8, **kwargs}))  # type: ignore[arg-type]
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, LoRALinear):
                for name in layer.lora_B:
                    B = layer.lora_B[name].weight
                    B.copy_(torch.randn(B.shape, generator=gen) * 0.3)
    return model


@pytest.fixture(autouse=True)
def _group_small_inputs(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tiny test batches are below the decoding threshold; group them anyway."""
    monkeypatch.setattr(lora_groups, "MIN_TOKENS", 1)


def _step(model: nn.Module, seed: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss and adapter gradients of one forward/backward (``seed`` fixes the dropout masks)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = model(input_ids=IDS, labels=IDS).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _straightforward(monkeypatch: pytest.MonkeyPatch) -> None:
    """Route every LoRALinear through the plain autograd formula (no fused node, no group)."""
    monkeypatch.setattr(lora_groups, "fused_forward", lambda *a, **k: None)
    monkeypatch.setattr(lora_kernels, "supports", lambda *a: False)


def _close(a: tuple[torch.Tensor, dict[str, torch.Tensor]], b: tuple[torch.Tensor, dict[str, torch.Tensor]]) -> None:
    assert torch.allclose(a[0], b[0], atol=1e-5), (a[0], b[0])
    assert a[1].keys() == b[1].keys() and a[1]
    for name in a[1]:
        assert torch.allclose(a[1][name], b[1][name], atol=1e-5, rtol=1e-4), name


def _named(model: nn.Module) -> Callable[[str], nn.Module]:
    return lambda qualname: model.get_submodule(qualname)


def test_projections_reading_one_input_group_after_a_first_pass() -> None:
    model = _adapt(llama())
    layer = _named(model)
    assert lora_groups.group_of(layer("model.layers.0.self_attn.q_proj")) is None  # nothing seen yet
    _step(model)
    attn, mlp = "model.layers.0.self_attn.", "model.layers.0.mlp."
    qkv = [layer(attn + n) for n in ("q_proj", "k_proj", "v_proj")]
    assert lora_groups.group_of(qkv[1]) == qkv
    assert lora_groups.group_of(layer(mlp + "up_proj")) == [layer(mlp + "gate_proj"), layer(mlp + "up_proj")]
    assert lora_groups.group_of(layer(attn + "o_proj")) is None
    assert lora_groups.group_of(layer(mlp + "down_proj")) is None


def test_the_last_siblings_group_from_the_second_pass() -> None:
    """HF PEFT's default Llama targets (q_proj, v_proj): the first and last adapted layers are sibling pairs. In
    the second pass the first pair runs as a group, so the last pair's run closes only when its own leader is
    called again; it groups there (it used to break for good)."""
    model = _adapt(llama(), target_modules=["q_proj", "v_proj"])
    attn = f"model.layers.{model.config.num_hidden_layers - 1}.self_attn."
    pair = [model.get_submodule(attn + "q_proj"), model.get_submodule(attn + "v_proj")]
    _step(model)
    assert lora_groups.group_of(model.get_submodule("model.layers.0.self_attn.v_proj")) is not None
    assert lora_groups.group_of(pair[1]) is None
    _step(model)
    assert lora_groups.group_of(pair[1]) == pair
    _step(model)
    assert lora_groups.group_of(pair[1]) == pair  # and it holds


@pytest.mark.parametrize("kwargs", [{}, {"use_rslora": True, "rank_pattern": {"k_proj": 2, "up_proj": 6},
                                         "alpha_pattern": {"v_proj": 3.0}}])
def test_grouped_step_equals_the_straightforward_formula(monkeypatch: pytest.MonkeyPatch,
                                                         kwargs: dict[str, object]) -> None:
    """GQA (k/v narrower than q) and per-layer ranks and scales inside one group."""
    model = _adapt(llama(), **kwargs)
    plain = copy.deepcopy(model)
    _step(model)  # groups form
    assert lora_groups.group_of(model.get_submodule("model.layers.1.self_attn.q_proj")) is not None
    grouped = _step(model)
    with monkeypatch.context() as m:
        _straightforward(m)
        _close(grouped, _step(plain))


def test_grouped_dropout_draws_the_masks_siblings_share(monkeypatch: pytest.MonkeyPatch) -> None:
    """With dropout the group draws one mask per input, as siblings do on their own: same seed, same numbers."""
    model = _adapt(llama(), dropout=0.3)
    alone = copy.deepcopy(model)
    _step(model)
    grouped = _step(model, seed=7)
    with monkeypatch.context() as m:
        m.setattr(lora_groups, "enabled", False)
        ungrouped = _step(alone, seed=7)
    _close(grouped, ungrouped)
    assert not torch.allclose(grouped[0], _step(model, seed=8)[0])  # the masks do depend on the seed


def test_inference_through_groups_matches_and_deepcopies_start_ungrouped(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _adapt(llama()).eval()
    with torch.no_grad():
        model(input_ids=IDS)
        grouped = model(input_ids=IDS).logits
    twin = copy.deepcopy(model)
    assert lora_groups.group_of(twin.get_submodule("model.layers.0.self_attn.q_proj")) is None
    with monkeypatch.context() as m, torch.no_grad():
        _straightforward(m)
        assert torch.allclose(grouped, twin(input_ids=IDS).logits, atol=1e-5)


class _Switch(nn.Module):
    """q, k, v read one tensor, or q reads its own (a changed call pattern)."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(6, 5), nn.Linear(6, 4), nn.Linear(6, 5)

    def forward(self, x: torch.Tensor, mode: str) -> torch.Tensor:
        if mode == "shared":
            return self.q(x).sum(-1) + self.k(x).sum(-1) + self.v(x).sum(-1)
        if mode == "q only":
            return self.q(x).sum(-1)
        return self.q(x * 2).sum(-1) + self.k(x).sum(-1) + self.v(x).sum(-1)


def test_siblings_called_last_group_from_the_next_call_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """A model whose siblings are its last adapted layers: their run closes only when the next step calls the
    leader again, mid-call. The group forms there and runs from the step after (it used to break at once)."""
    torch.manual_seed(0)
    model = _Switch().requires_grad_(False)
    pk.apply(model, pk.LoRA(target_modules=["q", "k", "v"], rank=2, alpha=4))
    for layer in (model.q, model.k, model.v):
        nn.init.normal_(layer.lora_B["default"].weight)
    plain = copy.deepcopy(model)
    inputs = [torch.randn(3, 6, requires_grad=True) for _ in range(4)]
    grads = []
    for x in inputs:
        model(x, "shared").sum().backward()
        grads.append(x.grad)
    assert lora_groups.group_of(model.q) == [model.q, model.k, model.v]
    with monkeypatch.context() as m:
        _straightforward(m)
        for x, got in zip(inputs, grads, strict=True):
            x.grad = None
            plain(x, "shared").sum().backward()
            assert torch.allclose(got, x.grad, atol=1e-6)
    for name in ("q", "k", "v"):
        assert torch.allclose(getattr(model, name).lora_A["default"].weight.grad,
                              getattr(plain, name).lora_A["default"].weight.grad, atol=1e-5)


@pytest.mark.parametrize("change", ["q only", "other input"])
def test_a_changed_call_pattern_breaks_the_group_for_good_and_stays_exact(monkeypatch: pytest.MonkeyPatch,
                                                                            change: str) -> None:
    torch.manual_seed(0)
    model = _Switch().requires_grad_(False)
    pk.apply(model, pk.LoRA(target_modules=["q", "k", "v"], rank=2, alpha=4))
    for layer in (model.q, model.k, model.v):
        nn.init.normal_(layer.lora_B["default"].weight)
    plain = copy.deepcopy(model)
    x = torch.randn(3, 6)
    outs = [model(x, mode) for mode in ("shared", "shared", change, "shared", "shared")]
    assert lora_groups.group_of(model.q) is None  # broken, and the leader never groups again
    with monkeypatch.context() as m:
        _straightforward(m)
        expected = [plain(x, mode) for mode in ("shared", "shared", change, "shared", "shared")]
    for got, want in zip(outs, expected, strict=True):
        assert torch.allclose(got, want, atol=1e-6)


def test_cross_attention_groups_key_and_value_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """T5's decoder: k and v of cross-attention read the encoder output, q the decoder states."""
    from tests.models import t5

    torch.manual_seed(0)
    model = _adapt(t5(), target_modules=["q", "k", "v", "o", "wi_0", "wi_1", "wo"]).eval()  # eval: T5's dropout off
    plain = copy.deepcopy(model)
    batch = {"input_ids": IDS, "labels": IDS.flip(1)}

    def step(m: nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        m.zero_grad(set_to_none=True)
        loss = m(**batch).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    step(model)
    cross = model.get_submodule("decoder.block.0.layer.1.EncDecAttention")
    assert lora_groups.group_of(cross.k) == [cross.k, cross.v]
    assert lora_groups.group_of(cross.q) is None
    grouped = step(model)
    with monkeypatch.context() as m:
        _straightforward(m)
        _close(grouped, step(plain))


def test_activation_checkpointing_runs_every_layer_on_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _adapt(llama())
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    plain = copy.deepcopy(model)
    _step(model)
    checkpointed = _step(model)  # a recomputation that differed from its forward would raise here
    assert lora_groups.group_of(model.get_submodule("model.layers.0.self_attn.q_proj")) is None
    with monkeypatch.context() as m:
        _straightforward(m)
        _close(checkpointed, _step(plain))


def test_grouped_function_gradcheck_with_a_mask() -> None:
    torch.manual_seed(0)
    d = torch.float64
    x = torch.randn(5, 6, dtype=d, requires_grad=True)
    As = [torch.randn(r, 6, dtype=d, requires_grad=True) for r in (2, 3)]
    Bs = [torch.randn(o, r, dtype=d, requires_grad=True) for o, r in ((4, 2), (3, 3))]
    Ws = [torch.randn(o, 6, dtype=d) for o in (4, 3)]
    bs = [torch.randn(4, dtype=d), None]
    keep = (torch.rand(5, 6) > 0.4).to(torch.int8).neg_()
    meta = ((2, 3), (1.5 / 0.6, 0.5 / 0.6))

    def fn(x: torch.Tensor, A1: torch.Tensor, A2: torch.Tensor, B1: torch.Tensor, B2: torch.Tensor
           ) -> tuple[torch.Tensor, ...]:
        dropped = x.detach() * (keep != 0)
        out: tuple[torch.Tensor, ...] = lora_groups.GroupedLoRA.apply(  # type: ignore[no-untyped-call]
            meta, x, keep, dropped, torch.cat([A1, A2]).detach(), A1, A2, B1, B2, *Ws, *bs)
        return out

    assert torch.autograd.gradcheck(fn, (x, *As, *Bs))
    # and the values: y_i = x W_iᵀ + b_i + s_i (keep⊙x) A_iᵀ B_iᵀ
    ys = fn(x, *As, *Bs)
    dropped = x * (keep != 0)
    for y, A, B, W, b, s in zip(ys, As, Bs, Ws, bs, meta[1], strict=True):
        ref = x @ W.T + (0 if b is None else b) + s * dropped @ A.T @ B.T
        assert torch.allclose(y, ref, atol=1e-12)


def test_inputs_of_few_tokens_never_group(monkeypatch: pytest.MonkeyPatch) -> None:
    """Decoding steps (a few tokens) run per layer; a prefill of the same model still groups."""
    monkeypatch.setattr(lora_groups, "MIN_TOKENS", 10)
    model = _adapt(llama()).eval()
    q = model.get_submodule("model.layers.0.self_attn.q_proj")
    with torch.no_grad():
        for _ in range(2):
            model(input_ids=IDS[:, :4])  # 8 tokens
        assert lora_groups.group_of(q) is None
        model(input_ids=IDS)  # 18 tokens
        assert lora_groups.group_of(q) is not None
        short = model(input_ids=IDS[:, :4]).logits  # below the threshold: the group is left alone
        assert lora_groups.group_of(q) is not None
    with monkeypatch.context() as m, torch.no_grad():
        _straightforward(m)
        assert torch.allclose(short, model(input_ids=IDS[:, :4]).logits, atol=1e-5)


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_dora_siblings_group_and_match(monkeypatch: pytest.MonkeyPatch, dropout: float) -> None:
    """Dropout 0: the straightforward DoRA formula. Dropout > 0: the ungrouped fast path from the same seed."""
    model = dora_llama(dropout)
    plain = copy.deepcopy(model)
    _step(model)
    attn = "model.layers.0.self_attn."
    assert lora_groups.group_of(model.get_submodule(attn + "k_proj")) == [
        model.get_submodule(attn + n) for n in ("q_proj", "k_proj", "v_proj")]
    grouped = _step(model, seed=3)
    assert any("magnitude" in n for n in grouped[1])
    with monkeypatch.context() as m:
        if dropout:
            m.setattr(lora_groups, "enabled", False)
        else:
            _straightforward(m)
        _close(grouped, _step(plain, seed=3))


def test_grouped_dora_gradcheck_with_a_mask() -> None:
    torch.manual_seed(0)
    d = torch.float64
    x = torch.randn(5, 6, dtype=d, requires_grad=True)
    As = [torch.randn(r, 6, dtype=d, requires_grad=True) for r in (2, 3)]
    Bs = [torch.randn(o, r, dtype=d, requires_grad=True) for o, r in ((4, 2), (3, 3))]
    Ms = [torch.rand(o, dtype=d).add(0.5).requires_grad_(True) for o in (4, 3)]
    Ws = [torch.randn(o, 6, dtype=d) for o in (4, 3)]
    bs = [torch.randn(4, dtype=d), None]
    norms = [torch.rand(o, dtype=d).add(1.0) for o in (4, 3)]
    keep = (torch.rand(5, 6) > 0.4).to(torch.int8).neg_()
    meta = ((2, 3), (1.5 / 0.6, 0.5 / 0.6))

    def fn(x: torch.Tensor, A1: torch.Tensor, A2: torch.Tensor, B1: torch.Tensor, B2: torch.Tensor,
           m1: torch.Tensor, m2: torch.Tensor) -> tuple[torch.Tensor, ...]:
        dropped = x.detach() * (keep != 0)
        out: tuple[torch.Tensor, ...] = lora_groups.GroupedDoRA.apply(  # type: ignore[no-untyped-call]
            meta, x, keep, dropped, torch.cat([A1, A2]).detach(), A1, A2, B1, B2, m1, m2, *Ws, *bs, *norms)
        return out

    assert torch.autograd.gradcheck(fn, (x, *As, *Bs, *Ms))
    ys = fn(x, *As, *Bs, *Ms)  # y_i = m_i/‖·‖ ⊙ (x W_iᵀ + s_i (keep⊙x) A_iᵀ B_iᵀ) + b_i
    dropped = x * (keep != 0)
    for y, A, B, m, W, b, norm, s in zip(ys, As, Bs, Ms, Ws, bs, norms, meta[1], strict=True):
        ref = m / norm * (x @ W.T + s * dropped @ A.T @ B.T) + (0 if b is None else b)
        assert torch.allclose(y, ref, atol=1e-12)


def test_disabling_adapters_between_steps_keeps_the_group(monkeypatch: pytest.MonkeyPatch) -> None:
    """Preference training alternates adapter and reference (adapters disabled) forwards: both exact, group kept."""
    model = _adapt(llama())
    plain = copy.deepcopy(model)
    _step(model)
    q = model.get_submodule("model.layers.0.self_attn.q_proj")
    outs = []
    for _ in range(2):
        with torch.no_grad(), pk.disable_adapters(model):
            outs.append(model(input_ids=IDS).logits)
        outs.append(_step(model)[0])
        assert lora_groups.group_of(q) is not None
    with monkeypatch.context() as m:
        _straightforward(m)
        with torch.no_grad(), pk.disable_adapters(plain):
            reference = plain(input_ids=IDS).logits
        adapted = _step(plain)[0]
    for i, got in enumerate(outs):
        assert torch.allclose(got, reference if i % 2 == 0 else adapted, atol=1e-5)


def test_torch_compile_gives_the_eager_loss_and_gradients() -> None:
    """A compiled model (traced through the per-layer path) equals eager execution."""
    model = _adapt(llama(layers=1))
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, backend="eager")
    got = compiled(input_ids=IDS, labels=IDS).loss
    got.backward()
    want = eager(input_ids=IDS, labels=IDS).loss
    want.backward()
    assert torch.allclose(got, want, atol=1e-5)
    grads = dict(eager.named_parameters())
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert torch.allclose(p.grad, grads[name].grad, atol=1e-5), name
