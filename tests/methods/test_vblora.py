"""VB-LoRA against HF PEFT: initialisation, forward, gradients, files both ways (top-k files too), merging, several
adapters and errors, on a tiny Llama (nn.Linear) and GPT-2 (Conv1D)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from test_prompt import batch

import peftkit as pk
from peftkit.errors import AdapterStateError, ConfigError, MergeError, TargetNotFoundError, UnsupportedLayerError
from peftkit.methods.vblora import VBLORA_TARGETS, VBLoRALayer, index_dtype
from peftkit.train.config import PEFT_METHODS

from models import (
    assert_files_cross_load,
    assert_gradients_match_hf,
    assert_merges_as_hf,
    build,
    check_two_adapters_as_hf,
    trainable_tensors,
)

peft = pytest.importorskip("peft")

# HF PEFT's defaults (256 vectors of length 256) do not fit a 32-wide model.
FIELDS = {"num_vectors": 10, "vector_length": 8}
TARGETS = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"]}


def hf_model(arch: str, seed: int = 3, rank: int = 2, **fields: object) -> torch.nn.Module:
    fields = {"target_modules": TARGETS[arch], **FIELDS, **fields}
    config = peft.VBLoRAConfig(task_type="CAUSAL_LM", r=rank, **fields)
    base = build(arch)
    torch.manual_seed(seed)
    return peft.get_peft_model(base, config).eval()


def ours_model(arch: str, seed: int = 3, rank: int = 2, **fields: object) -> torch.nn.Module:
    base = build(arch)
    torch.manual_seed(seed)
    return pk.apply(base, pk.VBLoRA(rank=rank, **{"target_modules": TARGETS[arch], **FIELDS, **fields}))  # type: ignore[arg-type]


def shift(*models: torch.nn.Module) -> None:
    """The same change to every trainable tensor of each model, so a trained state is compared."""
    with torch.no_grad():
        for model in models:
            for p in trainable_tensors(model).values():
                p.add_(torch.linspace(-0.3, 0.3, p.numel()).reshape(p.shape))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_initialisation_and_forward_equal_hf(arch: str) -> None:
    hf, ours = hf_model(arch), ours_model(arch)
    want, got = trainable_tensors(hf), trainable_tensors(ours)
    assert sorted(got) == sorted(want)  # the shared bank under the first layer's name, as in HF PEFT
    for name, tensor in want.items():  # the same draws from the global generator, in the same order
        assert torch.equal(got[name], tensor), name
    inputs = batch(arch)
    with torch.no_grad():
        expected, result = hf(**inputs), ours(**inputs)
    assert torch.equal(result.logits, expected.logits)
    assert pk.count_parameters(ours) == tuple(hf.get_nb_trainable_parameters())


def test_half_precision_base_as_in_hf() -> None:
    """Over a bf16 base the bank and logits are drawn, rounded to bf16 and kept in fp32, as HF PEFT does."""
    base_hf, base_ours = build("llama").to(torch.bfloat16), build("llama").to(torch.bfloat16)
    torch.manual_seed(3)
    theirs = peft.get_peft_model(base_hf, peft.VBLoRAConfig(r=2, target_modules=TARGETS["llama"], **FIELDS)).eval()
    torch.manual_seed(3)
    mine = pk.apply(base_ours, pk.VBLoRA(rank=2, target_modules=TARGETS["llama"], **FIELDS))  # type: ignore[arg-type]
    got = trainable_tensors(mine)
    for name, tensor in trainable_tensors(theirs).items():
        assert got[name].dtype == tensor.dtype == torch.float32 and torch.equal(got[name], tensor), name
    with torch.no_grad():
        ids = batch("llama")["input_ids"]
        assert torch.equal(mine(input_ids=ids).logits, theirs(input_ids=ids).logits)


def test_factors_are_top_k_mixtures_of_the_bank() -> None:
    bank = torch.nn.ParameterDict()
    layer = VBLoRALayer(torch.nn.Linear(6, 4), bank)
    layer.add("default", pk.VBLoRA(rank=3, num_vectors=5, vector_length=2, topk=2))
    layer.set_active(["default"])
    a, b = layer.factors("default")
    vectors, logits_a, logits_b = bank["default"], layer.vblora_logits_A["default"], layer.vblora_logits_B["default"]

    def piece(logits: torch.Tensor) -> torch.Tensor:  # the two largest logits' vectors, softmax-weighted
        first, second = logits.argsort(descending=True)[:2].tolist()
        w = torch.softmax(torch.stack([logits[first], logits[second]]), 0)
        return w[0] * vectors[first] + w[1] * vectors[second]

    for i in range(3):
        for t in range(3):  # A's row i, input columns 2t and 2t + 1
            torch.testing.assert_close(a[i, 2 * t:2 * t + 2], piece(logits_a[i, t]))
        for t in range(2):  # B's column i, output rows 2t and 2t + 1
            torch.testing.assert_close(b[2 * t:2 * t + 2, i], piece(logits_b[t, i]))
    x = torch.randn(5, 6)
    torch.testing.assert_close(layer(x), layer.base_layer(x) + x @ a.T @ b.T)
    torch.testing.assert_close(layer.delta_weight("default"), b @ a)


def test_gradients_equal_hf() -> None:
    hf, ours = hf_model("llama"), ours_model("llama")
    shift(hf, ours)
    assert_gradients_match_hf(hf, ours, batch("llama"), "vblora_")


@pytest.mark.parametrize(("arch", "fields"), [
    ("llama", {"topk": 3, "rank": 4}),
    ("llama", {"save_only_topk_weights": True}),
    ("gpt2", {"bias": "all"}),
    ("gpt2", {"bias": "vblora_only", "target_modules": ["c_attn", "mlp.c_proj"], "save_only_topk_weights": True}),
])
def test_files_load_both_ways_with_equal_logits(arch: str, fields: dict[str, object], tmp_path) -> None:
    hf, ours = hf_model(arch, **fields), ours_model(arch, **fields)
    inputs = batch(arch)
    shift(hf, ours)  # trained biases too: they must travel with the file
    with torch.no_grad():
        want = hf(**inputs).logits
        assert torch.equal(ours(**inputs).logits, want)
    hf_config, our_config = assert_files_cross_load(hf, ours, arch, inputs, want, tmp_path, atol=1e-5)
    # As given in HF PEFT; peftkit writes leaf names, or a regex of the exact names where a leaf name would select
    # more ('c_proj' is also attn.c_proj); the tensor keys show that both select the same modules.
    hf_config.pop("target_modules")
    our_config.pop("target_modules")
    assert our_config == hf_config
    saved = load_file(str(tmp_path / "pk" / "adapter_model.safetensors"))
    if fields.get("save_only_topk_weights"):
        indices = [v for k, v in saved.items() if k.endswith("_topk_indices")]
        assert indices and all(v.dtype == torch.uint8 for v in indices)
        assert not any(k.endswith(("vblora_logits_A", "vblora_logits_B")) for k in saved)


def test_top_k_file_loads_as_in_hf_for_inference_only(tmp_path) -> None:
    """Loaded from a top-k file, the logits are HF PEFT's (−∞ outside the top k): the same outputs and merge, and
    training refused, as in HF PEFT."""
    ours = ours_model("llama", save_only_topk_weights=True)
    shift(ours)
    pk.save_adapter(ours, tmp_path)
    mine = pk.load_adapter(build("llama"), tmp_path)
    theirs = peft.PeftModel.from_pretrained(build("llama"), str(tmp_path)).eval()
    want = {n.removeprefix("base_model.model."): p for n, p in theirs.named_parameters()}
    for name, tensor in mine.named_parameters():
        if "vblora_" in name:
            assert torch.equal(tensor, want[name]), name
    inputs = batch("llama")
    with torch.no_grad():
        expected = theirs(**inputs).logits
        assert torch.equal(mine(**inputs).logits, expected)
        pk.merge(mine, safe=True)  # −∞ logits outside the top k are not a broken adapter
        torch.testing.assert_close(mine(**inputs).logits, expected, rtol=0, atol=1e-5)
        pk.unmerge(mine)
    mine.train()
    with pytest.raises(AdapterStateError, match="save_only_topk_weights=True.*not trained"):
        mine(**inputs)
    pk.save_adapter(mine, tmp_path / "again")  # the same top k again
    first, again = (load_file(str(p / "adapter_model.safetensors")) for p in (tmp_path, tmp_path / "again"))
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first if "indices" in k)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merge_unmerge_and_unload_equal_hf(arch: str) -> None:
    hf, ours = hf_model(arch), ours_model(arch)
    shift(hf, ours)
    assert_merges_as_hf(hf, ours, batch(arch), VBLoRALayer, arch)


def test_several_adapters_share_one_bank_module_as_in_hf() -> None:
    hf, ours = hf_model("llama"), ours_model("llama")
    other = {"num_vectors": 6, "vector_length": 16, "topk": 3, "target_modules": ["v_proj", "o_proj"]}
    torch.manual_seed(4)
    hf.add_adapter("other", peft.VBLoRAConfig(r=3, task_type="CAUSAL_LM", **other))  # type: ignore[arg-type]
    torch.manual_seed(4)
    pk.apply(ours, pk.VBLoRA(rank=3, **other), name="other")  # type: ignore[arg-type]
    banks = {id(m.vblora_vector_bank) for m in ours.modules() if isinstance(m, VBLoRALayer)}
    assert len(banks) == 1
    layer = ours.model.layers[0].self_attn.q_proj
    assert sorted(layer.vblora_vector_bank) == ["default", "other"]
    check_two_adapters_as_hf(hf, ours)
    pk.set_adapter(ours, "other")
    assert layer.vblora_vector_bank["other"].requires_grad and not layer.vblora_vector_bank["default"].requires_grad
    pk.delete_adapter(ours, "other")
    assert not isinstance(ours.model.layers[0].self_attn.o_proj, VBLoRALayer)
    assert sorted(layer.vblora_vector_bank) == ["default"]


def test_default_targets_are_hf_peft_s() -> None:
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_VBLORA_TARGET_MODULES_MAPPING as theirs

    assert set(VBLORA_TARGETS) == set(theirs)
    for model_type, targets in theirs.items():
        if isinstance(targets, list):
            assert list(VBLORA_TARGETS[model_type]) == targets, model_type
    model = build("llama")
    pk.apply(model, pk.VBLoRA(**FIELDS))  # type: ignore[arg-type]
    assert sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, VBLoRALayer)}) == [
        "q_proj", "v_proj"]


def test_errors() -> None:
    model = build("llama")
    with pytest.raises(ConfigError, match="vector_length=12 must divide the input size 32 and output size 32 of "
                                          "model.layers.0.self_attn.q_proj; choose a divisor of 32"):
        pk.apply(model, pk.VBLoRA(vector_length=12, num_vectors=4))
    assert not any(isinstance(m, VBLoRALayer) for m in model.modules())  # checked before the model changed
    with pytest.raises(ConfigError, match="topk=5 must be at most num_vectors=4"):
        pk.VBLoRA(num_vectors=4, topk=5)
    with pytest.raises(ConfigError, match="bias='lora_only' must be one of"):
        pk.VBLoRA(bias="lora_only")
    with pytest.raises(ConfigError, match="rank=0 must be an integer >= 1"):
        pk.VBLoRA(rank=0)
    with pytest.raises(ConfigError, match=r"dropout=1.0 must be in \[0, 1\)"):
        pk.VBLoRA(dropout=1.0)
    with pytest.raises(ConfigError, match="init_logits_std=-0.1 must be a finite number >= 0"):
        pk.VBLoRA(init_logits_std=-0.1)
    with pytest.raises(ConfigError, match="save_only_topk_weights=1 must be True or False"):
        pk.VBLoRA(save_only_topk_weights=1)  # type: ignore[arg-type]
    with pytest.raises((UnsupportedLayerError, TargetNotFoundError), match="embed_tokens"):
        pk.apply(build("llama"), pk.VBLoRA(target_modules=["embed_tokens"], **FIELDS))  # type: ignore[arg-type]
    with pytest.raises(UnsupportedLayerError, match="VBLoRA cannot adapt a Conv2d"):
        VBLoRALayer(torch.nn.Conv2d(4, 4, 1), torch.nn.ParameterDict())
    broken = ours_model("llama")
    with torch.no_grad():
        broken.model.layers[1].self_attn.v_proj.vblora_logits_B["default"][0, 0, 0] = float("nan")
    with pytest.raises(MergeError, match="NaN or Inf in its parameters"):
        pk.merge(broken, safe=True)
    assert [index_dtype(n) for n in (255, 256, 2**15, 2**31)] == [torch.uint8, torch.int16, torch.int32, torch.int64]
    assert getattr(pk, str(PEFT_METHODS["vblora"])) is pk.VBLoRA
