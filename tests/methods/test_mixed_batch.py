"""Mixed adapter batches (``pk.mixed_batch``): row i of a batch through adapter ``adapter_names[i]``.

Outputs equal HF PEFT's ``adapter_names=`` forward for the same saved adapters; each row equals that row run alone
with its adapter active (or adapters disabled for ``"__base__"``); greedy and beam ``generate`` equal per-row
generation; what cannot be mixed is refused before anything runs.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

import peftkit as pk
from peftkit.errors import AdapterNotFoundError, AdapterStateError, ConfigError, UnsupportedLayerError
from peftkit.methods import lora_groups

from models import build, randomize_adapters

peft = pytest.importorskip("peft")

#: Architecture → the two adapters' targets (the second leaves some layers of the first out): Llama with an
#: embedding LoRA and grouped q/k/v, GPT-2's Conv1D, and a model with Embedding, Conv1d, Conv2d and Linear layers.
TARGETS = {
    "llama": (["q_proj", "k_proj", "v_proj", "down_proj", "embed_tokens"], ["q_proj", "v_proj", "o_proj"]),
    "gpt2": (["c_attn", "c_fc", "c_proj"], ["c_attn", "c_proj"]),
    "convnet": (["embed", "conv1", "conv2", "proj"], ["conv1", "proj"]),
    "t5": (["q", "v", "wi_0", "wo"], ["q", "o"]),
}
ROWS = ["task1", "__base__", "task2", "task1"]


def ids(batch: int = 4, seq: int = 7, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, 96, (batch, seq), generator=torch.Generator().manual_seed(seed))


def output(model: nn.Module, input_ids: torch.Tensor, **kwargs: object) -> torch.Tensor:
    out = model(input_ids=input_ids, **kwargs)
    return out if isinstance(out, torch.Tensor) else out.logits


def saved_adapters(arch: str, tmp_path: Path) -> Path:
    """Two random LoRA adapters (different ranks, scales and targets) saved by HF PEFT under ``tmp_path/<name>``."""
    first, second = TARGETS[arch]
    hf = peft.get_peft_model(build(arch), peft.LoraConfig(r=4, lora_alpha=8, target_modules=first),
                             adapter_name="task1")
    hf.add_adapter("task2", peft.LoraConfig(r=2, lora_alpha=6, target_modules=second))
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    hf.save_pretrained(str(tmp_path))
    return tmp_path


def peftkit_model(arch: str, directory: Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    model = build(arch).to(dtype)  # adapters load in fp32 over a half-precision base
    pk.load_adapter(model, directory / "task1", name="task1")
    pk.load_adapter(model, directory / "task2", name="task2")
    return model.eval()


@pytest.fixture(params=["llama", "gpt2", "convnet"])
def arch(request: pytest.FixtureRequest) -> str:
    return str(request.param)


# ------------------------------------------------------------------------------------ parity


def test_equals_hf_peft_adapter_names(arch: str, tmp_path: Path) -> None:
    directory = saved_adapters(arch, tmp_path)
    hf = peft.PeftModel.from_pretrained(build(arch), str(directory / "task1"), adapter_name="task1")
    hf.load_adapter(str(directory / "task2"), adapter_name="task2")
    hf.eval()
    model = peftkit_model(arch, directory)
    x = ids()
    with torch.no_grad():
        want = output(hf, x, adapter_names=ROWS)
        with pk.mixed_batch(model, ROWS):
            got = output(model, x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_each_row_equals_that_row_alone(arch: str, tmp_path: Path) -> None:
    model = peftkit_model(arch, saved_adapters(arch, tmp_path))
    x = ids()
    with torch.no_grad(), pk.mixed_batch(model, ROWS):
        got = output(model, x)
    with torch.no_grad():
        for i, want in enumerate(rows_alone(model, x, ROWS)):
            torch.testing.assert_close(got[i:i + 1], want, rtol=1e-5, atol=1e-6)


def test_rows_differ_from_any_single_adapter(tmp_path: Path) -> None:
    """The test can fail: a mixed batch is neither all-task1 nor all-task2 nor the base model."""
    model = peftkit_model("llama", saved_adapters("llama", tmp_path))
    x = ids()
    with torch.no_grad(), pk.mixed_batch(model, ROWS):
        mixed = output(model, x)
    with torch.no_grad():
        for name in ("task1", "task2"):
            pk.set_adapter(model, name)
            assert not torch.allclose(mixed, output(model, x), atol=1e-4)
        with pk.disable_adapters(model):
            assert not torch.allclose(mixed, output(model, x), atol=1e-4)


def test_state_is_restored_and_fast_paths_run_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fused kernels do not run in the block, and run again after it, with the same output as before."""
    model = peftkit_model("llama", saved_adapters("llama", tmp_path))
    pk.set_adapter(model, "task1")
    fused: list[str] = []
    kernel = lora_groups.linear_lora
    monkeypatch.setattr(lora_groups, "linear_lora", lambda *a, **k: fused.append("x") or kernel(*a, **k))
    x = ids()
    with torch.no_grad():
        before = output(model, x)
        assert fused
        fused.clear()
        with pk.mixed_batch(model, ROWS):
            output(model, x)
        assert not fused
        after = output(model, x)
        assert fused
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    assert all("_mixed" not in m.__dict__ for m in model.modules())


def test_half_precision_rows_equal_the_ordinary_forward(tmp_path: Path) -> None:
    """fp32 adapters on a bf16 base: each row's update added in fp32 and rounded once, as in the ordinary forward."""
    model = peftkit_model("gpt2", saved_adapters("gpt2", tmp_path), torch.bfloat16)
    x = ids()
    with torch.no_grad(), pk.mixed_batch(model, ROWS):
        got = output(model, x)
    assert got.dtype == torch.bfloat16
    with torch.no_grad():
        for name, row in (("task1", 0), ("task2", 2)):
            pk.set_adapter(model, name)
            torch.testing.assert_close(got[row], output(model, x)[row], rtol=0, atol=0)


def rows_alone(model: nn.Module, x: torch.Tensor, names: list[str]) -> list[torch.Tensor]:
    """Each row of ``x`` run on its own with its adapter active (adapters disabled for ``"__base__"``)."""
    out = []
    for i, name in enumerate(names):
        if name == "__base__":
            with pk.disable_adapters(model):
                out.append(output(model, x[i:i + 1]))
        else:
            pk.set_adapter(model, name)
            out.append(output(model, x[i:i + 1]))
    return out


@pytest.mark.parametrize("base", ["dora", "nf4", "shared_A"])
def test_plain_adapters_on_dora_layers_quantized_bases_and_shared_A(base: str, tmp_path: Path) -> None:
    """Plain LoRA adapters held by DoRA layers (next to a DoRA adapter, which is not named), on an NF4 base, and
    one whose q, k and v share one A (performant ``linear_qkv``)."""
    model = peftkit_model("llama", saved_adapters("llama", tmp_path))
    if base == "shared_A":
        model = pk.apply(build("llama"), pk.LoRA(target_modules=["linear_qkv"], rank=4), name="task1")
        pk.apply(model, pk.LoRA(target_modules=["o_proj", "q_proj"], rank=2), name="task2")
        randomize_adapters(model)
        assert type(model.model.layers[0].self_attn.k_proj.lora_A["task1"]).__name__ == "SharedDown"
    elif base == "dora":
        pk.apply(model, pk.DoRA(target_modules=["q_proj", "embed_tokens"], rank=2), name="dora")
        assert type(model.model.layers[0].self_attn.q_proj).__name__ == "DoRALinear"
    else:
        model = pk.quantize(build("llama"), bits=4, compute_dtype=torch.float32)
        assert type(model.model.layers[0].self_attn.q_proj).__name__ != "Linear"
        pk.load_adapter(model, tmp_path / "task1", name="task1")
        pk.load_adapter(model, tmp_path / "task2", name="task2")
    model.eval()
    x = ids()
    with torch.no_grad():
        with pk.mixed_batch(model, ROWS):
            got = output(model, x)
        for i, want in enumerate(rows_alone(model, x, ROWS)):
            torch.testing.assert_close(got[i:i + 1], want, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------ generate


def generated(model: nn.Module, x: torch.Tensor, **kwargs: object) -> torch.Tensor:
    out: torch.Tensor = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=6,
                                       do_sample=False, pad_token_id=0, **kwargs)
    return out


@pytest.mark.parametrize("arch", ["llama", "gpt2", "t5"])
@pytest.mark.parametrize("num_beams", [1, 3])
def test_generate_equals_per_row_generation(arch: str, num_beams: int, tmp_path: Path) -> None:
    model = peftkit_model(arch, saved_adapters(arch, tmp_path))
    x = ids(seq=5)
    with torch.no_grad(), pk.mixed_batch(model, ROWS):
        got = generated(model, x, num_beams=num_beams)
    with torch.no_grad():
        for i, name in enumerate(ROWS):
            if name == "__base__":
                with pk.disable_adapters(model):
                    want = generated(model, x[i:i + 1], num_beams=num_beams)
            else:
                pk.set_adapter(model, name)
                want = generated(model, x[i:i + 1], num_beams=num_beams)
            # A row that ends early alone is padded (pad_token_id=0) in the batch.
            assert torch.equal(got[i, :want.shape[1]], want[0]), (i, name)
            assert not got[i, want.shape[1]:].any(), (i, name)


def test_generate_equals_hf_peft_with_beams(tmp_path: Path) -> None:
    """HF PEFT repeats each name ``num_beams`` times; a batch k times as long does the same here."""
    directory = saved_adapters("llama", tmp_path)
    hf = peft.PeftModel.from_pretrained(build("llama"), str(directory / "task1"), adapter_name="task1")
    hf.load_adapter(str(directory / "task2"), adapter_name="task2")
    hf.eval()
    model = peftkit_model("llama", directory)
    x = ids(seq=5)
    with torch.no_grad():
        want = generated(hf, x, num_beams=2, num_return_sequences=2, adapter_names=ROWS)
        with pk.mixed_batch(model, ROWS):
            got = generated(model, x, num_beams=2, num_return_sequences=2)
    assert torch.equal(got, want)


# ------------------------------------------------------------------------------------ refused


@pytest.fixture
def llama_adapters(tmp_path: Path) -> nn.Module:
    return peftkit_model("llama", saved_adapters("llama", tmp_path))


def test_unknown_name_lists_the_known_ones(llama_adapters: nn.Module) -> None:
    with pytest.raises(AdapterNotFoundError, match=r"'tsak1'.*\['task1', 'task2'\]"), \
            pk.mixed_batch(llama_adapters, ["tsak1", "task2"]):
        pass


@pytest.mark.parametrize("names", ["task1", [], ["task1", 3]])
def test_names_must_be_a_list_of_strings(llama_adapters: nn.Module, names: object) -> None:
    with pytest.raises(ConfigError, match="one per row"), pk.mixed_batch(llama_adapters, names):  # type: ignore[arg-type]
        pass


@pytest.mark.parametrize("batch", [3, 6])
def test_batch_that_does_not_fit_the_names(llama_adapters: nn.Module, batch: int) -> None:
    with pk.mixed_batch(llama_adapters, ROWS), pytest.raises(AdapterStateError, match=f"{batch} rows.*4"):
        output(llama_adapters, ids(batch=batch))


def test_a_layer_that_sees_other_rows_is_refused(llama_adapters: nn.Module) -> None:
    """Tokens flattened across rows would put the wrong adapter on them: refused, naming the layer."""
    layer = llama_adapters.model.layers[0].self_attn.q_proj
    with pk.mixed_batch(llama_adapters, ROWS), pytest.raises(AdapterStateError, match="layers.0.self_attn.q_proj"):
        layer(torch.zeros(8, 32))


def test_merged_adapters_are_refused(llama_adapters: nn.Module) -> None:
    pk.set_adapter(llama_adapters, "task1")
    pk.merge(llama_adapters)
    with pytest.raises(AdapterStateError, match="merged.*pk.unmerge"), pk.mixed_batch(llama_adapters, ROWS):
        pass


def test_training_mode_is_refused(llama_adapters: nn.Module) -> None:
    llama_adapters.train()
    with pytest.raises(AdapterStateError, match="model.eval"), pk.mixed_batch(llama_adapters, ROWS):
        pass
    llama_adapters.eval()
    with pk.mixed_batch(llama_adapters, ROWS):
        llama_adapters.train()
        with pytest.raises(AdapterStateError, match="model.eval"):
            output(llama_adapters, ids())


def test_disabled_adapters_are_refused(llama_adapters: nn.Module) -> None:
    refused = pytest.raises(AdapterStateError, match="disable_adapters")
    with pk.disable_adapters(llama_adapters), refused, pk.mixed_batch(llama_adapters, ROWS):
        pass
    with pk.mixed_batch(llama_adapters, ROWS), pk.disable_adapters(llama_adapters), refused:
        output(llama_adapters, ids())


def test_nested_blocks_are_refused(llama_adapters: nn.Module) -> None:
    refused = pytest.raises(AdapterStateError, match="already active")
    with pk.mixed_batch(llama_adapters, ROWS), refused, pk.mixed_batch(llama_adapters, ROWS):
        pass


@pytest.mark.parametrize("config,match", [
    (pk.DoRA(target_modules=["q_proj"], rank=2), "DoRA"),
    (pk.IA3(target_modules=["up_proj"]), "IA3"),
    (pk.LoRA(target_modules=["q_proj"], rank=2, alora_invocation_tokens=[5, 6]), "activated LoRA"),
    (pk.LoRA(target_modules=["q_proj"], rank=2, modules_to_save=["lm_head"]), "modules_to_save"),
])
def test_adapters_that_cannot_be_mixed(llama_adapters: nn.Module, config: pk.AdapterConfig, match: str) -> None:
    pk.apply(llama_adapters, config, name="other")
    with pytest.raises(UnsupportedLayerError, match=match), pk.mixed_batch(llama_adapters, ["task1", "other"]):
        pass


def test_canonical_adapters_are_refused_and_off_when_not_named() -> None:
    """A canonical adapter on GPT-2's fused c_attn (one A and B per part) cannot route rows: refused when named,
    and off for the block otherwise."""
    model = pk.apply(build("gpt2"), pk.LoRA(target_modules=["c_fc"], rank=2), name="task1")
    pk.apply(model, pk.CanonicalLoRA(target_modules=["linear_q", "linear_v"], rank=2), name="canonical")
    randomize_adapters(model)
    model.eval()
    with pytest.raises(UnsupportedLayerError, match="CanonicalLoRALinear"), pk.mixed_batch(model, ["canonical"] * 4):
        pass
    names = ["task1", "__base__", "__base__", "task1"]
    x = ids()
    pk.set_adapter(model, ["task1", "canonical"])  # active, but not named: off in the block
    with torch.no_grad():
        with pk.mixed_batch(model, names):
            got = output(model, x)
        for i, want in enumerate(rows_alone(model, x, names)):
            torch.testing.assert_close(got[i:i + 1], want, rtol=1e-5, atol=1e-6)


def test_other_methods_not_named_are_off_for_the_block(llama_adapters: nn.Module) -> None:
    """An IA3 adapter that is active but not named runs nowhere in the block, and again after it."""
    model = llama_adapters
    x = ids()
    with torch.no_grad(), pk.mixed_batch(model, ROWS):
        want = output(model, x)
    reference = copy.deepcopy(model)
    pk.apply(model, pk.IA3(target_modules=["up_proj"]), name="ia3")
    for layer in model.modules():
        if type(layer).__name__ == "IA3Layer":
            with torch.no_grad():
                for p in layer.adapter_parameters("ia3"):
                    p.fill_(2.0)
    pk.set_adapter(model, ["task1", "ia3"])
    with torch.no_grad(), pk.mixed_batch(model, ROWS):
        torch.testing.assert_close(output(model, x), want, rtol=0, atol=0)
    with torch.no_grad():
        assert not torch.allclose(output(model, x), output(reference, x), atol=1e-4)  # ia3 is back on
