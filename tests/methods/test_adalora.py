"""AdaLoRA: formula, budget schedule, pruning to the budget, rank_pattern, HF PEFT parity and cross-loading."""

from __future__ import annotations

import json

import pytest
import torch

import peftkit as pk
from peftkit.core.state import adapter_layers, get_state
from peftkit.methods.adalora import SVDLinear, orthogonality_loss

from models import ARCHS, build, run

peft = pytest.importorskip("peft")
TARGETS = ["q_proj", "v_proj"]


def config(**kw) -> pk.AdaLoRA:
    base = dict(target_modules=TARGETS, init_rank=6, target_rank=2, tinit=2, tfinal=2, deltaT=1, total_step=10,
                alpha=8)
    return pk.AdaLoRA(**{**base, **kw})


def train(model: torch.nn.Module, steps: int, allocate: bool = True) -> list[float]:
    model.train()
    ids = ARCHS["llama"].inputs()["input_ids"]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.02)
    losses = []
    for step in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        if allocate:
            pk.adalora_step(model, step)
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


def test_formula_and_merge() -> None:
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 5)
    layer = SVDLinear(base)
    layer.add("a", 3, 3, alpha=4.0, dropout=0.0)
    layer.set_active(["a"])
    with torch.no_grad():
        layer.lora_E["a"].normal_()
    P, Q, lam = layer.lora_B["a"], layer.lora_A["a"], layer.lora_E["a"].flatten()
    x = torch.randn(2, 6)
    expected = base(x) + 4.0 / (3 + 1e-5) * (x @ Q.T @ torch.diag(lam) @ P.T)
    assert torch.allclose(layer(x), expected, atol=1e-6)
    with torch.no_grad():
        layer.merge(["a"])
        assert torch.allclose(base(x), expected, atol=1e-5)
        layer.unmerge()


def test_budget_schedule_is_cubic() -> None:
    from peftkit.methods.adalora import RankAllocator

    model = pk.apply(build("llama"), config(total_step=20, tinit=3, tfinal=5, deltaT=2))
    alloc = RankAllocator(model, "default", get_state(model).configs["default"])
    assert alloc.initial_budget == 4 * 6 and alloc.target_budget == 4 * 2
    assert alloc.budget(3) == (24, False)
    for t in range(4, 15):
        expected = int((24 - 8) * (1 - (t - 3) / (20 - 5 - 3)) ** 3 + 8)
        assert alloc.budget(t) == (expected, t % 2 == 0)
    assert alloc.budget(16) == (8, True)


def test_training_prunes_to_the_budget_and_saves_rank_pattern(tmp_path) -> None:
    torch.manual_seed(0)
    model = pk.apply(build("llama"), config())
    losses = train(model, 10)
    assert losses[-1] < losses[0]
    layers = [layer for _, layer in adapter_layers(model)]
    kept = sum(int((layer.lora_E["default"] != 0).sum()) for layer in layers)
    assert kept == 2 * len(layers)  # total rank == target budget after the schedule
    for layer in layers:  # pruned triplets are exactly zero
        mask = layer.rank_mask["default"]
        assert torch.all(layer.lora_E["default"][~mask] == 0)
    with torch.no_grad():
        expected = run(model, "llama")
    pk.save_adapter(model, tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["peft_type"] == "ADALORA" and sum(sum(v) for v in data["rank_pattern"].values()) == kept
    # ours → HF PEFT (it resizes by rank_pattern) and back into peftkit
    hf = peft.PeftModel.from_pretrained(build("llama"), str(tmp_path)).eval()
    again = pk.load_adapter(build("llama"), tmp_path)
    with torch.no_grad():
        assert torch.allclose(hf(**ARCHS["llama"].inputs()).logits, expected, atol=1e-5)
        assert torch.allclose(run(again, "llama"), expected, atol=1e-5)
        merged = pk.merge(again)
        assert torch.allclose(run(merged, "llama"), expected, atol=1e-5)


def test_hf_to_peftkit_and_parameter_count(tmp_path) -> None:
    hf_config = peft.AdaLoraConfig(target_modules=TARGETS, init_r=6, target_r=2, tinit=2, tfinal=2, deltaT=1,
                                   total_step=10, lora_alpha=8)
    hf = peft.get_peft_model(build("llama"), hf_config)
    ours = pk.apply(build("llama"), config())
    assert pk.count_parameters(ours) == tuple(hf.get_nb_trainable_parameters())
    with torch.no_grad():
        for p in hf.parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p) * 0.3)
    hf.eval()
    hf.save_pretrained(str(tmp_path))
    loaded = pk.load_adapter(build("llama"), tmp_path)
    with torch.no_grad():
        assert torch.allclose(run(loaded, "llama"), run(hf, "llama"), atol=1e-5)


def test_orthogonality_penalty_is_added_to_the_loss_in_training() -> None:
    model = pk.apply(build("llama"), config(orth_reg_weight=0.3))
    ids = ARCHS["llama"].inputs()["input_ids"]
    model.eval()
    plain = model(input_ids=ids, labels=ids).loss
    model.train()
    with_penalty = model(input_ids=ids, labels=ids).loss
    penalty = orthogonality_loss(model, "default")
    assert torch.allclose(with_penalty, plain + 0.3 * penalty, atol=1e-5)
    A = next(layer for _, layer in adapter_layers(model)).lora_A["default"]
    assert penalty > 0 and torch.isfinite(penalty) and A.shape == (6, 32)


def test_step_without_gradients_or_without_an_active_adalora_adapter_is_refused() -> None:
    model = pk.apply(build("llama"), config())
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()  # a mask from importances that were never measured would be arbitrary
    before = {n: p.clone() for n, p in model.named_parameters()}
    for step in (0, 5):  # warm-up and a masking step: both read the gradients
        with pytest.raises(pk.errors.AdapterStateError, match="no gradient.*after loss.backward"):
            pk.adalora_step(model, step)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert get_state(model).configs["default"].rank_pattern == {}

    ids = ARCHS["llama"].inputs()["input_ids"]
    model(input_ids=ids, labels=ids).loss.backward()
    pk.adalora_step(model, 0)  # with gradients it runs
    pk.apply(model, pk.LoRA(target_modules=["k_proj"]), name="other", activate=True)
    with pytest.raises(pk.errors.AdapterStateError, match=r"no active AdaLoRA adapter.*active: \['other'\]"):
        pk.adalora_step(model, 1)
    with pytest.raises(pk.errors.AdapterStateError, match=r"no active AdaLoRA adapter.*adapters: \[\]"):
        pk.adalora_step(build("llama"), 0)


def _randomized_hf_adalora(arch: str, **kw) -> torch.nn.Module:
    hf_config = peft.AdaLoraConfig(init_r=4, target_r=2, total_step=10, **kw)
    hf = peft.get_peft_model(build(arch), hf_config)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in hf.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    return hf.eval()


@pytest.mark.parametrize("exclude", [["c_fc"], r".*\.0\..*"])
def test_hf_exclude_modules_are_left_out_on_loading(exclude: object, tmp_path) -> None:
    hf = _randomized_hf_adalora("gpt2", target_modules=["c_attn", "c_fc"], exclude_modules=exclude)
    hf.save_pretrained(str(tmp_path))
    loaded = pk.load_adapter(build("gpt2"), tmp_path)
    assert sorted(get_state(loaded).targets["default"]) == sorted(
        n.removeprefix("base_model.model.") for n, m in hf.named_modules() if hasattr(m, "lora_E"))
    with torch.no_grad():
        assert torch.allclose(run(loaded, "gpt2"), run(hf, "gpt2"), atol=1e-5)


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_trained_biases_cross_load_both_ways(bias: str, tmp_path) -> None:
    hf = _randomized_hf_adalora("bert", target_modules=["query", "value"], bias=bias, task_type="SEQ_CLS")
    hf.save_pretrained(str(tmp_path / "hf"))
    loaded = pk.load_adapter(build("bert"), tmp_path / "hf")
    with torch.no_grad():
        expected = run(hf, "bert")
        assert torch.allclose(run(loaded, "bert"), expected, atol=1e-5)
    # peftkit trains the same biases, saves them, and HF PEFT reads them back
    ours = pk.apply(build("bert"), pk.AdaLoRA(target_modules=["query", "value"], init_rank=4, target_rank=2,
                                              total_step=10, bias=bias))
    def biases(model: torch.nn.Module, prefix: str = "") -> set[str]:
        return {n.removeprefix(prefix) for n, p in model.named_parameters()
                if p.requires_grad and n.endswith(".bias") and "classifier" not in n}

    assert biases(ours) == biases(hf, "base_model.model.") and biases(ours)
    ours.load_state_dict(loaded.state_dict())
    pk.save_adapter(ours, tmp_path / "pk")
    assert json.loads((tmp_path / "pk" / "adapter_config.json").read_text())["bias"] == bias
    back = peft.PeftModel.from_pretrained(build("bert"), str(tmp_path / "pk")).eval()
    with torch.no_grad():
        assert torch.allclose(run(back, "bert"), expected, atol=1e-5)


def test_half_precision_base_rounds_once_as_hf_peft(tmp_path) -> None:
    """HF PEFT adds the fp32 update to a half-precision base output in place: one rounding, bit for bit here."""
    model = pk.apply(build("llama").to(torch.float16), config())
    torch.manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    pk.save_adapter(model, tmp_path)
    hf = peft.PeftModel.from_pretrained(build("llama").to(torch.float16), str(tmp_path)).eval()
    with torch.no_grad():
        assert torch.equal(run(model, "llama"), run(hf, "llama"))


@pytest.mark.parametrize("delta_t", [2, 3, 12])  # 12: no allocation before the final one
def test_rank_allocation_matches_hf_update_and_allocate_step_by_step(delta_t: int) -> None:
    """Same factors and gradients at every step: HF PEFT's allocator and ours keep the same triplets, through the
    warm-up, the cubic schedule (every deltaT), the final allocation and the fine-tuning after it; the training
    loss with the orthogonality penalty is HF PEFT's too."""
    kw = dict(tinit=2, tfinal=3, deltaT=delta_t, total_step=12)
    hf = peft.get_peft_model(build("llama"), peft.AdaLoraConfig(
        task_type="CAUSAL_LM", target_modules=TARGETS, init_r=6, target_r=2, lora_alpha=8, orth_reg_weight=0.3, **kw))
    ours = pk.apply(build("llama"), config(orth_reg_weight=0.3, **kw))
    pairs = [(getattr(layer, c)["default"], getattr(hf.base_model.model.get_submodule(q), c)["default"])
             for q, layer in adapter_layers(ours) for c in ("lora_A", "lora_B", "lora_E")]
    ids = ARCHS["llama"].inputs()["input_ids"]
    hf.train(), ours.train()
    with torch.no_grad():
        for mine, theirs in pairs:
            theirs.add_(torch.randn_like(theirs) * 0.1)  # B starts at zero: give every factor a gradient
            mine.copy_(theirs)
    opt = torch.optim.SGD([theirs for _, theirs in pairs], lr=0.5)
    for step in range(kw["total_step"]):
        loss = hf(input_ids=ids, labels=ids).loss
        torch.testing.assert_close(ours(input_ids=ids, labels=ids).loss, loss, rtol=1e-5, atol=1e-6)
        loss.backward()
        opt.step()
        with torch.no_grad():
            for mine, theirs in pairs:
                theirs.grad = torch.randn_like(theirs)  # importances that move between steps
                mine.copy_(theirs)
                mine.grad = theirs.grad.clone()
        hf.base_model.update_and_allocate(step)
        pk.adalora_step(ours, step)
        for mine, theirs in pairs:
            assert torch.equal(mine, theirs), f"step {step}"
        expected = {k.removesuffix(".lora_E.default"): v for k, v in hf.peft_config["default"].rank_pattern.items()} \
            if hf.peft_config["default"].rank_pattern else {}
        assert get_state(ours).configs["default"].rank_pattern == expected, f"step {step}"
        opt.zero_grad()
        for mine, _ in pairs:
            mine.grad = None
    kept = sum(sum(mask) for mask in get_state(ours).configs["default"].rank_pattern.values())
    assert kept == 2 * len(list(adapter_layers(ours)))  # the target budget, reached as in HF PEFT
