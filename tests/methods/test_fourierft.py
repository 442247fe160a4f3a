"""FourierFT against HF PEFT: spectral positions, initialisation, forward, gradients, files both ways, merging, several
adapters and errors, on a tiny Llama (nn.Linear) and GPT-2 (Conv1D)."""

from __future__ import annotations

import pytest
import torch
from test_prompt import batch

import peftkit as pk
from peftkit.errors import ConfigError, TargetNotFoundError, UnsupportedLayerError
from peftkit.methods.fourierft import FourierFTLayer, spectral_indices
from peftkit.train.config import PEFT_METHODS

from models import assert_files_match_hf, build

peft = pytest.importorskip("peft")

# HF PEFT's defaults (n_frequency 1000, scaling 150) would swamp a 32-wide model: small values keep logits sane.
FIELDS = {"n_frequency": 6, "scaling": 0.5}


def hf_model(arch: str, seed: int = 3, **fields: object) -> torch.nn.Module:
    config = peft.FourierFTConfig(task_type="CAUSAL_LM", **{**FIELDS, **fields})
    base = build(arch)
    torch.manual_seed(seed)
    return peft.get_peft_model(base, config).eval()


def ours_model(arch: str, seed: int = 3, **fields: object) -> torch.nn.Module:
    base = build(arch)
    torch.manual_seed(seed)
    return pk.apply(base, pk.FourierFT(**{**FIELDS, **fields}))  # type: ignore[arg-type]


def hf_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """HF PEFT's trainable tensors under peftkit's names."""
    return {n.removeprefix("base_model.model."): p for n, p in model.named_parameters() if p.requires_grad}


def ours_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if hasattr(m, "indices")}


@pytest.mark.parametrize(("shape", "n", "seed"), [((32, 32), 6, 777), ((32, 128), 50, 0), ((96, 32), 3072, 5)])
def test_spectral_positions_are_hf_peft_s(shape: tuple[int, int], n: int, seed: int) -> None:
    from peft.tuners.fourierft.layer import FourierFTLinear

    config = peft.FourierFTConfig(n_frequency=n, random_loc_seed=seed)
    theirs = FourierFTLinear(torch.nn.Linear(shape[1], shape[0]), "default", config, n_frequency=n)
    ours = spectral_indices(shape[0], shape[1], n, seed)
    assert torch.equal(ours, theirs.indices["default"])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("init_weights", [False, True])
def test_initialisation_and_forward_equal_hf(arch: str, init_weights: bool) -> None:
    hf, ours = hf_model(arch, init_weights=init_weights), ours_model(arch, init_weights=init_weights)
    want, got = hf_tensors(hf), ours_tensors(ours)
    assert sorted(k.removesuffix(".default") for k in got) == sorted(k.removesuffix(".default") for k in want)
    for name, tensor in want.items():  # the same draws from the global generator, in the same order
        assert torch.equal(got[name], tensor), name
    hf_layers = layers(hf)
    for name, layer in layers(ours).items():
        assert torch.equal(layer.indices["default"], hf_layers[name].indices["default"])
    inputs = batch(arch)
    with torch.no_grad():
        base = build(arch)(**inputs).logits
        expected = hf(**inputs)
        result = ours(**inputs)
    assert torch.allclose(result.logits, expected.logits, atol=1e-6)
    assert torch.allclose(result.loss, expected.loss, atol=1e-6)
    assert torch.equal(result.logits, base) is init_weights  # zero coefficients leave the model as it was
    assert pk.count_parameters(ours) == tuple(hf.get_nb_trainable_parameters())


def test_half_precision_base_as_in_hf() -> None:
    """Over a bf16 base the coefficients are drawn, rounded to bf16 and kept in fp32, as HF PEFT does."""
    base_hf, base_ours = build("llama").to(torch.bfloat16), build("llama").to(torch.bfloat16)
    torch.manual_seed(3)
    theirs = peft.get_peft_model(base_hf, peft.FourierFTConfig(**FIELDS)).eval()
    torch.manual_seed(3)
    mine = pk.apply(base_ours, pk.FourierFT(**FIELDS))  # type: ignore[arg-type]
    got = ours_tensors(mine)
    for name, tensor in hf_tensors(theirs).items():
        assert got[name].dtype == tensor.dtype == torch.float32 and torch.equal(got[name], tensor), name
    with torch.no_grad():
        ids = batch("llama")["input_ids"]
        assert torch.equal(mine(input_ids=ids).logits, theirs(input_ids=ids).logits)


def test_delta_is_the_scaled_inverse_dft_of_the_sparse_spectrum() -> None:
    layer = FourierFTLayer(torch.nn.Linear(8, 5))
    layer.add("default", n_frequency=7, scaling=2.0, seed=1, init_weights=False, where="layer")
    spectrum = torch.zeros(5, 8, dtype=torch.complex64)
    rows, cols = layer.indices["default"]
    spectrum[rows, cols] = layer.fourierft_spectrum["default"].detach().to(torch.complex64)
    j, k = torch.arange(5).view(5, 1), torch.arange(8).view(1, 8)
    expected = torch.zeros(5, 8)
    for r, c in zip(rows.tolist(), cols.tolist(), strict=True):  # Re(IDFT2) written out, one frequency at a time
        angle = 2 * torch.pi * (r * j / 5 + c * k / 8)
        expected += spectrum[r, c].real * torch.cos(angle) / 40
    assert torch.allclose(layer.delta_weight("default"), 2.0 * expected, atol=1e-6)


def test_gradients_equal_hf() -> None:
    hf, ours = hf_model("llama"), ours_model("llama")
    inputs = batch("llama")
    hf(**inputs).loss.backward()
    ours(**inputs).loss.backward()
    got = ours_tensors(ours)
    for name, tensor in hf_tensors(hf).items():
        assert tensor.grad is not None and torch.allclose(got[name].grad, tensor.grad, atol=1e-6), name
    assert all(p.grad is None for n, p in ours.named_parameters() if "fourierft_" not in n)


@pytest.mark.parametrize(("arch", "fields"), [
    ("llama", {"n_frequency_pattern": {"v_proj": 9}, "random_loc_seed": 11}),
    ("gpt2", {"bias": "all"}),
    ("gpt2", {"bias": "fourier_only", "target_modules": ["c_attn", "mlp.c_proj"]}),
])
def test_files_load_both_ways_with_equal_logits(arch: str, fields: dict[str, object], tmp_path) -> None:
    hf, ours = hf_model(arch, **fields), ours_model(arch, **fields)
    inputs = batch(arch)
    with torch.no_grad():
        for p in hf_tensors(hf).values():  # trained biases too: they must travel with the file
            p.add_(0.1)
        for p in ours_tensors(ours).values():
            p.add_(0.1)
        want = hf(**inputs).logits
        assert torch.allclose(ours(**inputs).logits, want, atol=1e-6)
    # target_modules as given in HF PEFT; peftkit writes leaf names, or a regex of the exact names where a leaf name
    # would select more ('c_proj' is also attn.c_proj), and names each module n_frequency_pattern changes: the
    # tensor keys show that both select the same modules.
    assert_files_match_hf(hf, ours, arch, inputs, tmp_path, loose=("target_modules", "n_frequency_pattern"))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merge_unmerge_and_unload_equal_hf(arch: str) -> None:
    hf, ours = hf_model(arch), ours_model(arch)
    inputs = batch(arch)
    weights = {n: p.clone() for n, p in ours.named_parameters()}
    with torch.no_grad():
        want = ours(**inputs).logits
        pk.merge(ours)
        assert torch.allclose(ours(**inputs).logits, want, atol=1e-5)
        pk.unmerge(ours)
        for n, p in ours.named_parameters():
            assert torch.allclose(p, weights[n], atol=1e-6), n
        plain = pk.unload(ours, merge=True)
        reference = hf.merge_and_unload()
        theirs = dict(reference.named_parameters())
        for n, p in plain.named_parameters():
            assert torch.allclose(p, theirs[n], atol=1e-6), n
        assert not any(isinstance(m, FourierFTLayer) for m in plain.modules())


def test_several_adapters_disable_and_delete_as_in_hf() -> None:
    hf, ours = hf_model("llama"), ours_model("llama")
    torch.manual_seed(4)
    hf.add_adapter("other", peft.FourierFTConfig(n_frequency=4, scaling=0.3, random_loc_seed=1,
                                                 target_modules=["v_proj", "o_proj"], task_type="CAUSAL_LM"))
    torch.manual_seed(4)
    pk.apply(ours, pk.FourierFT(n_frequency=4, scaling=0.3, random_loc_seed=1, target_modules=["v_proj", "o_proj"]),
             name="other")
    inputs = batch("llama")
    with torch.no_grad():
        for names in (["other"], ["default", "other"]):
            hf.base_model.set_adapter(names)
            pk.set_adapter(ours, names)
            assert torch.allclose(ours(**inputs).logits, hf(**inputs).logits, atol=1e-6)
        with pk.disable_adapters(ours):
            assert torch.equal(ours(**inputs).logits, build("llama")(**inputs).logits)
        pk.merge(ours)  # both active adapters folded in: the same output
        assert torch.allclose(ours(**inputs).logits, hf(**inputs).logits, atol=1e-5)
        pk.unmerge(ours)
    pk.delete_adapter(ours, "other")
    assert not isinstance(ours.model.layers[0].self_attn.o_proj, FourierFTLayer)
    assert isinstance(ours.model.layers[0].self_attn.v_proj, FourierFTLayer)


def test_errors() -> None:
    with pytest.raises(ConfigError, match="n_frequency=2000 at model.layers.0.self_attn.q_proj exceeds its weight's "
                                          "32 × 32 = 1024 entries"):
        pk.apply(build("llama"), pk.FourierFT(n_frequency=2000))
    with pytest.raises(ConfigError, match="bias='lora_only' must be one of"):
        pk.FourierFT(bias="lora_only")
    with pytest.raises(ConfigError, match="n_frequency=0 must be a positive integer"):
        pk.FourierFT(n_frequency=0)
    with pytest.raises(ConfigError, match="random_loc_seed=None"):
        pk.FourierFT(random_loc_seed=None)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="n_frequency_pattern key 'v_prj'"):
        pk.apply(build("llama"), pk.FourierFT(n_frequency_pattern={"v_prj": 3}))
    with pytest.raises((UnsupportedLayerError, TargetNotFoundError), match="embed_tokens"):
        pk.apply(build("llama"), pk.FourierFT(target_modules=["embed_tokens"]))
    assert getattr(pk, str(PEFT_METHODS["fourierft"])) is pk.FourierFT
