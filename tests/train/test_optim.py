"""Schedules, LoRA+ groups, GaLore's projected update against the formula, LISA sampling."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from peftkit.train.config import OptimizerConfig, SchedulerConfig
from peftkit.train.optim import GaLoreAdamW, Lisa, build_optimizer, galore_projector, lora_b_parameters
from peftkit.train.schedule import Schedule, lr_factor


@pytest.mark.parametrize(
    ("name", "step", "expected"),
    [
        ("cosine", 0, 0.0),
        ("cosine", 5, 0.5),
        ("cosine", 10, 1.0),
        ("cosine", 15, 0.5 * (1 + math.cos(math.pi / 2))),
        ("cosine", 20, 0.0),
        ("linear", 15, 0.5),
        ("linear", 20, 0.0),
        ("constant", 15, 1.0),
        ("constant", 3, 0.3),
    ],
)
def test_schedule_formula(name, step, expected):
    assert lr_factor(step, total=20, warmup=10, name=name) == pytest.approx(expected)


def test_schedule_min_ratio_and_groups_keep_ratio():
    assert lr_factor(20, 20, 0, "cosine", 0.1) == pytest.approx(0.1)
    p, q = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([{"params": [p], "lr": 1.0}, {"params": [q], "lr": 16.0}])
    sched = Schedule(opt, SchedulerConfig(name="linear", warmup_steps=2), total_steps=10)
    assert sched.apply(1) == pytest.approx(0.5)
    assert opt.param_groups[1]["lr"] == pytest.approx(8.0)


def _lora_model():
    import peftkit as pk

    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    pk.apply(model, pk.LoRA(target_modules=["0", "2"], rank=2, alpha=4))
    return model


def test_loraplus_puts_b_in_its_own_group():
    import peftkit as pk

    if not hasattr(pk, "LoRA"):
        pytest.skip("peftkit.LoRA not available yet")
    model = _lora_model()
    b = lora_b_parameters(model)
    assert len(b) == 2 and all(p.shape[1] == 2 for p in b)
    opt = build_optimizer(model, OptimizerConfig(lr=1e-3, loraplus_ratio=16))
    groups = {g["name"]: g for g in opt.param_groups}
    assert {id(p) for p in groups["lora_B"]["params"]} == {id(p) for p in b}
    assert groups["lora_B"]["lr"] == pytest.approx(16e-3) and groups["default"]["lr"] == pytest.approx(1e-3)
    assert len(groups["default"]["params"]) == 2  # the two A matrices
    plain = build_optimizer(model, OptimizerConfig(lr=1e-3))
    assert len(plain.param_groups) == 1


@pytest.mark.parametrize("method", ["IA3", "LoHa"])
def test_loraplus_without_b_matrices_is_refused(method):
    """LoRA+ speeds up B matrices; a method without them would silently train as plain AdamW."""
    import peftkit as pk
    from peftkit.errors import ConfigError

    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    pk.apply(model, getattr(pk, method)(target_modules=["0", "2"]))
    with pytest.raises(ConfigError, match=r"optimizer.loraplus_ratio=16 .*set optimizer.loraplus_ratio=0"):
        build_optimizer(model, OptimizerConfig(lr=1e-3, loraplus_ratio=16))
    assert len(build_optimizer(model, OptimizerConfig(lr=1e-3)).param_groups) == 1


def _galore_reference(w, grads, rank, scale, lr, betas, eps, wd, interval):
    """GaLore Algorithm 1 written out with plain matrix algebra."""
    w = w.clone()
    m = v = p = None
    b1, b2 = betas
    for t, g in enumerate(grads, start=1):
        if (t - 1) % interval == 0:
            u, s, vh = torch.linalg.svd(g, full_matrices=False)
            p = u[:, :rank] if w.shape[0] < w.shape[1] else vh[:rank].T
        r = p.T @ g if w.shape[0] < w.shape[1] else g @ p
        m = (1 - b1) * r if m is None else b1 * m + (1 - b1) * r
        v = (1 - b2) * r * r if v is None else b2 * v + (1 - b2) * r * r
        n = (m / (1 - b1**t)) / (torch.sqrt(v / (1 - b2**t)) + eps)
        delta = scale * (p @ n if w.shape[0] < w.shape[1] else n @ p.T)
        w = w - lr * delta
        w = w - lr * wd * w
    return w


@pytest.mark.parametrize("shape", [(4, 6), (6, 4), (5, 5)])  # square: projected on the right, as galore-torch
def test_galore_update_equals_formula(shape):
    torch.manual_seed(0)
    w0 = torch.randn(shape, dtype=torch.float64)
    grads = [torch.randn(shape, dtype=torch.float64) for _ in range(5)]
    param = nn.Parameter(w0.clone())
    opt = GaLoreAdamW(
        [{"params": [param], "galore": True, "rank": 2, "update_interval": 2, "scale": 0.25}], lr=0.1, weight_decay=0.01
    )
    for g in grads:
        param.grad = g.clone()
        opt.step()
    expected = _galore_reference(w0, grads, 2, 0.25, 0.1, (0.9, 0.999), 1e-8, 0.01, 2)
    torch.testing.assert_close(param.data, expected, rtol=1e-5, atol=1e-6)
    state = opt.state[param]
    low = (2, shape[1]) if shape[0] < shape[1] else (shape[0], 2)
    assert state["exp_avg"].shape == low  # moments live in the low-rank space
    # The update is confined to the projector's span.
    proj = galore_projector(grads[-1], 2)
    assert proj.shape == ((shape[0], 2) if shape[0] < shape[1] else (shape[1], 2))


def _assert_steps_like_adamw(ours: torch.optim.Optimizer, a: nn.Parameter, b: nn.Parameter) -> None:
    """Three steps of ``ours`` on ``a`` and of ``torch.optim.AdamW(lr=0.01)`` on ``b`` (same start, same random
    gradients) end at the same weights."""
    ref = torch.optim.AdamW([b], lr=0.01, weight_decay=0.0)
    for _ in range(3):
        g = torch.randn(a.shape, dtype=a.dtype)
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    torch.testing.assert_close(a.data, b.data)


def test_galore_plain_group_matches_torch_adamw():
    torch.manual_seed(1)
    a, b = nn.Parameter(torch.randn(3, 5, dtype=torch.float64)), nn.Parameter(torch.randn(3, 5, dtype=torch.float64))
    b.data.copy_(a.data)
    _assert_steps_like_adamw(GaLoreAdamW([a], lr=0.01, weight_decay=0.0), a, b)


def test_galore_weight_not_wider_than_the_rank_gets_plain_adamw():
    """A GaLore-group weight whose shorter side is at most the rank is not projected (nor scaled): AdamW."""
    torch.manual_seed(2)
    a = nn.Parameter(torch.randn(3, 8, dtype=torch.float64))
    b = nn.Parameter(a.detach().clone())
    ours = GaLoreAdamW([{"params": [a], "galore": True, "rank": 3, "update_interval": 1, "scale": 0.25}], lr=0.01)
    _assert_steps_like_adamw(ours, a, b)
    assert "projector" not in ours.state[a]


def test_build_galore_selects_2d_targets():
    model = nn.ModuleDict({"attn": nn.Linear(8, 8), "norm": nn.LayerNorm(8)})
    opt = build_optimizer(model, OptimizerConfig(name="galore", galore_rank=2, galore_targets=["attn.weight"]))
    groups = {g["name"]: g for g in opt.param_groups}
    assert [p.shape for p in groups["galore"]["params"]] == [torch.Size([8, 8])]
    assert isinstance(opt, GaLoreAdamW) and len(groups["default"]["params"]) == 3


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(6))
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for layer in self.layers:
            h = layer(h)
        return self.head(h)


def test_lisa_trains_only_sampled_layers():
    torch.manual_seed(0)
    net = _Net()
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    lisa = Lisa(net, layers=2, interval=3, seed=0)
    opt = torch.optim.AdamW(net.parameters(), lr=0.1)
    assert lisa.sample(0) == lisa.sample(2) and len(lisa.sample(0)) == 2
    assert len({tuple(lisa.sample(3 * k)) for k in range(10)}) > 1  # re-sampled every interval
    active = lisa.update(0)
    net(torch.tensor([1, 2])).sum().backward()
    opt.step()
    changed = {n for n, p in net.named_parameters() if not torch.equal(p, before[n])}
    expected = {f"layers.{i}.{k}" for i in active for k in ("weight", "bias")}
    assert changed == expected | {"embed.weight", "head.weight", "head.bias"}


def test_lisa_schedule_is_seeded_uniform_and_frozen_layers_keep_weights_and_moments():
    """LISA (Pan et al., 2024, Algorithm 1): every ``interval`` steps ``k`` of the N layers are drawn uniformly
    without replacement, the same draws for the same seed; embedding and head train at every step. A layer left
    out of a window changes neither its weights nor its AdamW moments, and picks its moments up again when drawn."""
    lisa, again, other = (Lisa(_Net(), layers=2, interval=3, seed=s) for s in (7, 7, 8))
    windows = [lisa.sample(3 * w) for w in range(900)]
    assert windows == [again.sample(3 * w) for w in range(900)]
    assert windows != [other.sample(3 * w) for w in range(900)]
    assert all(len(set(w)) == 2 for w in windows)
    counts = torch.bincount(torch.tensor(windows).flatten(), minlength=6).double() / len(windows)
    torch.testing.assert_close(counts, torch.full((6,), 2 / 6, dtype=torch.float64), atol=0.05, rtol=0)

    torch.manual_seed(0)
    net = _Net()
    lisa = Lisa(net, layers=2, interval=3, seed=7)
    opt = torch.optim.AdamW(net.parameters(), lr=0.05, weight_decay=0.1)
    layer_params = [list(layer.parameters()) for layer in net.layers]
    for step in range(12):
        if step % lisa.interval == 0:
            lisa.update(step)
        assert lisa.active == lisa.sample(step)
        weights = [[p.detach().clone() for p in params] for params in layer_params]
        moments = [[opt.state[p]["exp_avg"].clone() if p in opt.state else None for p in params]
                   for params in layer_params]
        head = net.head.weight.detach().clone()
        net(torch.tensor([1, 2, 3])).sum().backward()
        opt.step()
        opt.zero_grad()
        assert not torch.equal(net.head.weight, head)
        for i, params in enumerate(layer_params):
            for p, w, m in zip(params, weights[i], moments[i], strict=True):
                if i in lisa.active:
                    assert not torch.equal(p, w) and opt.state[p]["exp_avg"] is not None
                else:
                    assert torch.equal(p, w)
                    assert (m is None and p not in opt.state) or torch.equal(opt.state[p]["exp_avg"], m)


def test_lisa_samples_an_encoder_decoder_over_both_stacks():
    from models import build

    model = build("t5")
    blocks = [*model.encoder.block, *model.decoder.block]
    lisa = Lisa(model, layers=1, interval=1, seed=0)
    assert lisa.layer_list == blocks
    trained = set()
    for step in range(12):
        active = lisa.update(step)
        training = [i for i, block in enumerate(blocks) if any(p.requires_grad for p in block.parameters())]
        assert training == active and len(active) == 1  # one block of the four, the decoder's included
        trained.update(active)
    assert trained == {0, 1, 2, 3}
    assert model.shared.weight.requires_grad and model.lm_head.weight.requires_grad


def test_lisa_without_named_stacks_takes_the_longest_list():
    net = nn.Sequential(nn.ModuleList(nn.Linear(4, 4) for _ in range(2)),
                        nn.ModuleList(nn.Linear(4, 4) for _ in range(3)))
    assert list(Lisa(net, layers=1, interval=1, seed=0).layer_list) == list(net[1])


@pytest.mark.parametrize("dora", [False, True])
def test_loraplus_groups_match_hf_peft(dora):
    """Every trainable parameter gets HF PEFT's ``create_loraplus_optimizer`` learning rate and weight decay (B,
    biases and LayerNorm parameters fast, biases and LayerNorm without decay), except the two documented
    differences: DoRA magnitudes keep ``lr``, and LoRA on an embedding follows the A/B rule."""
    import peft
    from peft.optimizers import create_loraplus_optimizer

    import peftkit as pk

    from models import build

    targets, saved = ["query", "value", "word_embeddings"], ["classifier", "LayerNorm"]
    hf_config = peft.LoraConfig(task_type="SEQ_CLS", target_modules=targets, r=2, bias="lora_only", use_dora=dora,
                                modules_to_save=list(saved))  # HF PEFT appends its head names to the list it gets
    hf = peft.get_peft_model(build("bert"), hf_config)
    ours = pk.apply(build("bert"), (pk.DoRA if dora else pk.LoRA)(target_modules=targets, rank=2, bias="lora_only",
                                                                 modules_to_save=saved))
    lr, ratio, wd = 1e-3, 16.0, 0.1
    hf_opt = create_loraplus_optimizer(hf, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=ratio, loraplus_weight_decay=wd)
    opt = build_optimizer(ours, OptimizerConfig(lr=lr, loraplus_ratio=ratio, weight_decay=wd))

    def settings(model, optimizer, prefix=""):
        by_id = {id(p): (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}
        # HF PEFT's names → ours: its ModulesToSaveWrapper copies and its DoRA magnitude modules.
        return {n.removeprefix(prefix).replace(".modules_to_save.", ".copies.")
                .replace(".lora_magnitude_vector.default.weight", ".lora_magnitude_vector.default"): by_id[id(p)]
                for n, p in model.named_parameters() if p.requires_grad}

    theirs, mine = settings(hf, hf_opt, "base_model.model."), settings(ours, opt)
    assert set(mine) == set(theirs)
    magnitudes = {n for n in mine if ".lora_magnitude_vector." in n}
    assert bool(magnitudes) == dora
    for name in magnitudes:
        assert theirs[name] == pytest.approx((lr * ratio, wd)) and mine[name] == pytest.approx((lr, wd))
    embedding = {n: mine.pop(n) for n in list(mine) if ".lora_embedding_" in n}
    for name, (got_lr, got_wd) in embedding.items():
        assert theirs[name] == pytest.approx((1e-6, wd)) and got_wd == wd
        assert got_lr == pytest.approx(lr * ratio if "lora_embedding_B" in name else lr)
    differing = {n: (mine[n], theirs[n]) for n in mine if n not in magnitudes and mine[n] != pytest.approx(theirs[n])}
    assert differing == {}
    fast_no_decay = {n for n, setting in mine.items() if setting == pytest.approx((lr * ratio, 0.0))}
    assert any(n.endswith("LayerNorm.copies.default.weight") for n in fast_no_decay)  # a norm weight: no decay
    assert any(n.endswith(".bias") for n in fast_no_decay)
