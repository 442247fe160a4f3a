"""BOFT: HF PEFT parity (tensors, forward, gradients, dropout masks, files both ways) on a tiny Llama and a convolution
stack, the butterfly, merging, several adapters and errors.

HF PEFT 0.21.2 computes more than one butterfly factor only with its CUDA extension (elsewhere it takes 1): the tests
stand in for the extension's block-diagonal kernel with ``torch.block_diag``, so HF PEFT's own formula runs on CPU.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import peftkit as pk
from peftkit.core.state import adapter_layers
from peftkit.errors import ConfigError, MergeError, UnsupportedLayerError
from peftkit.io.hf_format import adapter_state_dict
from peftkit.methods.boft import BOFTLayer, block_diagonal, butterfly_permutation

from models import (
    assert_loads_in_hf,
    assert_same_grads_as_hf,
    assert_same_tensors_as_hf,
    build,
    conv_input,
    conv_stack,
    randomize_trainable,
    run,
)

peft = pytest.importorskip("peft")
from peft.tuners.boft import layer as hf_boft  # noqa: E402


class _BlockDiagonal:
    """HF PEFT's ``FastBlockDiag`` (a CUDA kernel) in plain PyTorch: (m, D, b, b) → (m, D·b, D·b)."""

    @staticmethod
    def apply(blocks: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.block_diag(*factor) for factor in blocks])


@pytest.fixture(autouse=True)
def hf_butterfly(monkeypatch: pytest.MonkeyPatch) -> None:
    """HF PEFT with its CUDA extension "available" (a stand-in kernel): it then keeps boft_n_butterfly_factor, and does
    not try to compile the extension for every layer."""
    monkeypatch.setattr(hf_boft, "get_fbd_cuda", lambda: object())
    monkeypatch.setattr(hf_boft, "FastBlockDiag", _BlockDiagonal)


MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[nn.Module], torch.Tensor]]] = {
    "llama": (lambda: build("llama"), lambda m: run(m, "llama")),
    "conv": (conv_stack, lambda m: m(conv_input())),
}
LLAMA = ["q_proj", "v_proj", "down_proj"]
CONV = ["point", "conv", "head"]
#: case → (model, fields of both configs)
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "block-size": ("llama", {"target_modules": LLAMA, "boft_block_size": 4}),
    "block-num-3-factors": ("llama", {"target_modules": LLAMA, "boft_block_size": 0, "boft_block_num": 4,
                                      "boft_n_butterfly_factor": 3}),
    "conv-2-factors-bias": ("conv", {"target_modules": CONV, "boft_block_size": 2, "boft_n_butterfly_factor": 2,
                                     "bias": "boft_only"}),
    "conv-bias-all": ("conv", {"target_modules": CONV, "boft_block_size": 4, "bias": "all"}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_hf_peft_tensors_forward_gradients_and_files(case: str, tmp_path) -> None:
    model, fields = CASES[case]
    builder, forward = MODELS[model]
    ours = pk.apply(builder(), pk.BOFT(**fields))
    hf = peft.get_peft_model(builder(), peft.BOFTConfig(**fields)).eval()
    assert_same_tensors_as_hf(ours, hf)
    with torch.no_grad():
        with pk.disable_adapters(ours):
            base = forward(ours)
        torch.testing.assert_close(forward(ours), base, rtol=0, atol=1e-6)

    randomize_trainable(hf, 0.1, seed=0, shift=True)
    hf.save_pretrained(str(tmp_path / "hf"))
    loaded = pk.load_adapter(builder(), tmp_path / "hf", trainable=True)
    with torch.no_grad():
        expected = forward(hf)
        assert not torch.allclose(expected, base, atol=1e-3)
        torch.testing.assert_close(forward(loaded), expected, rtol=1e-5, atol=1e-6)
    assert_same_grads_as_hf(loaded, hf, forward)

    _, written = assert_loads_in_hf(ours, builder, forward, tmp_path / "pk")
    assert set(written) <= set(peft.BOFTConfig().to_dict())
    assert {k: written[k] for k in fields if k != "target_modules"} == \
        {k: v for k, v in fields.items() if k != "target_modules"}


@pytest.mark.parametrize("model", ["llama", "conv"])
def test_training_mode_dropout_replaces_hf_peft_s_blocks(model: str) -> None:
    builder, forward = MODELS[model]
    fields = {"target_modules": LLAMA if model == "llama" else CONV, "boft_block_size": 2,
              "boft_n_butterfly_factor": 2, "boft_dropout": 0.5, "init_weights": False}
    torch.manual_seed(5)
    ours = pk.apply(builder(), pk.BOFT(**fields)).train()
    torch.manual_seed(5)
    hf = peft.get_peft_model(builder(), peft.BOFTConfig(**fields)).train()
    with torch.no_grad():
        outputs = []
        for step in range(3):
            torch.manual_seed(10 + step)
            mine = forward(ours)
            torch.manual_seed(10 + step)
            torch.testing.assert_close(mine, forward(hf), rtol=1e-5, atol=1e-6)
            outputs.append(mine)
        assert not all(torch.allclose(o, outputs[0]) for o in outputs[1:])  # other blocks each forward
        state = torch.random.get_rng_state()
        evaluated = forward(ours.eval())
        assert torch.equal(torch.random.get_rng_state(), state)  # nothing drawn in evaluation
        torch.testing.assert_close(evaluated, forward(hf.eval()), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(evaluated, outputs[0], atol=1e-4)


def test_butterfly_formula() -> None:
    # Factor j pairs runs of b/2 indices 2^j·b/2 apart: 16 features, blocks of 4.
    assert butterfly_permutation(16, 4, 2).tolist() == list(range(16))  # factor 0: the identity
    assert butterfly_permutation(16, 2, 2).tolist() == [0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15]
    for blocks, half in ((4, 2), (2, 2), (1, 2), (8, 1), (4, 1)):
        perm = torch.tensor(hf_boft.BOFTLayer.block_butterfly_perm(None, 16, blocks, half, 1))
        assert torch.equal(butterfly_permutation(16, blocks, half), perm)
    blocks = torch.randn(3, 2, 2)
    assert torch.equal(block_diagonal(blocks), torch.block_diag(*blocks))

    torch.manual_seed(0)
    linear = nn.Linear(16, 3)
    model = pk.apply(nn.Sequential(linear), pk.BOFT(target_modules=["0"], boft_block_size=4,
                                                    boft_n_butterfly_factor=2, init_weights=False))
    layer = model[0]
    assert isinstance(layer, BOFTLayer)
    raw, scale = layer.boft_R["default"].detach(), layer.boft_s["default"].detach()
    skew = (raw - raw.transpose(-2, -1)) / 2
    eye = torch.eye(4)
    orth = (eye - skew) @ torch.linalg.inv(eye + skew)  # Cayley, per block
    matrix = torch.eye(16)
    for j in range(2):
        perm = butterfly_permutation(16, 4 // 2 ** j, 2)
        p = torch.eye(16)[perm]
        matrix = p @ torch.block_diag(*orth[j]) @ p.T @ matrix
    torch.testing.assert_close(layer.matrix("default").detach(), matrix, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(matrix.T @ matrix, torch.eye(16), rtol=1e-5, atol=1e-5)  # orthogonal
    x = torch.randn(5, 16)
    expected = (x @ matrix) @ linear.weight.T * scale.squeeze(-1) + linear.bias
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def _two_adapters(builder: Callable[[], nn.Module], targets: list[str]) -> nn.Module:
    model = builder()
    pk.apply(model, pk.BOFT(target_modules=targets, boft_block_size=4, init_weights=False), name="a")
    pk.apply(model, pk.BOFT(target_modules=targets, boft_block_size=2, boft_n_butterfly_factor=2,
                            init_weights=False), name="b")
    pk.set_adapter(model, ["a", "b"])
    return model


@pytest.mark.parametrize("model", ["llama", "conv"])
def test_merge_unmerge_several_adapters_and_delete(model: str) -> None:
    builder, forward = MODELS[model]
    net = _two_adapters(builder, LLAMA if model == "llama" else CONV)
    weights = {n: p.clone() for n, p in net.named_parameters() if "base_layer" in n}
    with torch.no_grad():
        both = forward(net)
        pk.set_adapter(net, "b")
        only_b = forward(net)
        pk.set_adapter(net, ["b", "a"])
        swapped = forward(net)
        pk.set_adapter(net, ["a", "b"])
        with pk.disable_adapters(net):
            base = forward(net)
        assert not any(torch.allclose(x, y, atol=1e-4) for x, y in [(base, both), (both, only_b), (both, swapped)])

        with pytest.raises(MergeError, match=r"would change the order .* or only \['a'\]"):
            pk.merge(net, names=["b"])
        pk.merge(net, safe=True)
        torch.testing.assert_close(forward(net), both, rtol=1e-5, atol=1e-5)
        pk.unmerge(net)
        for name, p in net.named_parameters():
            if name in weights:
                torch.testing.assert_close(p, weights[name], rtol=0, atol=1e-5)
        pk.merge(net, names=["a"])  # the rotation nearest the weight can go in alone
        torch.testing.assert_close(forward(net), both, rtol=1e-5, atol=1e-5)
        pk.delete_adapter(net, "a")
        torch.testing.assert_close(forward(net), only_b, rtol=1e-5, atol=1e-5)
        plain = pk.unload(net, merge=True)
        torch.testing.assert_close(forward(plain), only_b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("fields", "message"), [
    ({"boft_block_size": 0}, "give exactly one of boft_block_size and boft_block_num"),
    ({"boft_block_num": 4}, "give exactly one of boft_block_size and boft_block_num"),
    ({"boft_n_butterfly_factor": 0}, "boft_n_butterfly_factor=0 must be an integer >= 1"),
    ({"boft_dropout": 1.0}, r"boft_dropout=1.0 must be in \[0, 1\)"),
    ({"bias": "lora_only"}, "bias='lora_only' must be one of"),
])
def test_bad_fields_are_refused(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        pk.BOFT(target_modules=["q_proj"], **fields)


def test_sizes_and_layers_that_do_not_fit_are_refused_before_the_model_changes() -> None:
    for fields, message in (
        ({"boft_block_size": 3}, "boft_block_size=3 does not divide the 32 features model.layers.0.self_attn.q_proj"),
        ({"boft_block_size": 0, "boft_block_num": 4, "boft_n_butterfly_factor": 4},
         "boft_n_butterfly_factor=4 needs boft_block_num .* a multiple of 8"),
        ({"boft_block_size": 16, "boft_n_butterfly_factor": 3}, "needs model.layers.0.self_attn.q_proj's 32 features "
                                                                 "to be a multiple of 64"),
    ):
        model = build("llama")
        with pytest.raises(ConfigError, match=message):
            pk.apply(model, pk.BOFT(target_modules=["q_proj"], **fields))
        assert not pk.list_adapters(model)
    with pytest.raises(UnsupportedLayerError, match="matches only modules of type Embedding"):
        pk.apply(build("llama"), pk.BOFT(target_modules=["embed_tokens"]))
    for conv, text in ((nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), "padding_mode='reflect'"),
                       (nn.Conv2d(4, 4, 3, groups=2), "groups=2"), (nn.Conv2d(4, 4, 3, stride=(1, 2)), "stride")):
        with pytest.raises(UnsupportedLayerError, match=f"BOFT cannot adapt 0 \\({text}"):
            pk.apply(nn.Sequential(conv), pk.BOFT(target_modules=["0"], boft_block_size=4))


def test_default_targets_and_the_command_line_method_name() -> None:
    from peftkit.train.config import config_from_dict
    from peftkit.train.tasks import peft_config

    model = pk.apply(build("llama"), pk.BOFT())
    assert sorted(n.rsplit(".", 1)[-1] for n, _ in adapter_layers(model)) == ["q_proj"] * 2 + ["v_proj"] * 2
    base = {"checkpoint": {"pretrained": {"config": {"model_type": "llama"}}}}
    config = peft_config(config_from_dict({**base, "peft": {"method": "boft", "boft_block_size": 8}}))
    assert type(config) is pk.BOFT and config.boft_block_size == 8


def test_hf_peft_file_saved_without_its_cuda_extension_is_refused_by_shape(tmp_path, monkeypatch) -> None:
    """Without its CUDA extension HF PEFT takes one butterfly factor whatever the config says: its file holds one."""
    from peftkit.errors import ShapeMismatchError

    monkeypatch.setattr(hf_boft, "get_fbd_cuda", lambda: None)
    fields = {"target_modules": ["q_proj"], "boft_block_size": 4, "boft_n_butterfly_factor": 2}
    hf = peft.get_peft_model(build("llama"), peft.BOFTConfig(**fields))
    randomize_trainable(hf, 0.1, seed=0, shift=True)
    hf.save_pretrained(str(tmp_path))
    with pytest.raises(ShapeMismatchError, match=r"q_proj.boft_R: the file holds shape \(1, 8, 4, 4\) but the model "
                                                 r"needs \(2, 8, 4, 4\)"):
        pk.load_adapter(build("llama"), tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "boft_n_butterfly_factor": 1}))
    loaded = pk.load_adapter(build("llama"), tmp_path)  # what HF PEFT computed there
    with torch.no_grad():
        torch.testing.assert_close(run(loaded, "llama"), run(hf.eval(), "llama"), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model", ["llama", "conv"])
def test_half_precision_base_keeps_fp32_tensors_like_hf_peft(model: str) -> None:
    builder, forward = MODELS[model]
    fields = {"target_modules": LLAMA if model == "llama" else CONV, "boft_block_size": 4, "init_weights": False}
    ours = pk.apply(builder().to(torch.bfloat16), pk.BOFT(**fields))
    hf = peft.get_peft_model(builder().to(torch.bfloat16), peft.BOFTConfig(**fields)).eval()
    mine = adapter_state_dict(ours, "default")
    assert {tensor.dtype for tensor in mine.values()} == {torch.float32}
    with torch.no_grad():
        for key, value in peft.get_peft_model_state_dict(hf).items():
            mine[key].copy_(value)
        inputs = (lambda m: run(m, "llama")) if model == "llama" else (lambda m: m(conv_input().bfloat16()))
        result = inputs(ours)
        assert result.dtype == torch.bfloat16
        torch.testing.assert_close(result, inputs(hf), rtol=0, atol=0)
