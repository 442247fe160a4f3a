"""RoAd against HF PEFT: initialisation, forward, gradients, files both ways, merging (bias included), several
adapters, mixed batches, quantized bases and errors, on a tiny Llama and BERT (biased linears)."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file
from test_prompt import batch

import peftkit as pk
from peftkit.errors import AdapterStateError, ConfigError, MergeError, TargetNotFoundError, UnsupportedLayerError
from peftkit.methods.road import RoAdLayer, rotate
from peftkit.train.config import PEFT_METHODS

from models import (
    assert_files_cross_load,
    assert_gradients_match_hf,
    assert_same_tensors_as_hf,
    build,
    randomize_adapters,
    run,
    trainable_tensors,
)

peft = pytest.importorskip("peft")

VARIANTS = ["road_1", "road_2", "road_4"]
#: HF PEFT's group size 64 exceeds the tiny models' widths (v_proj: 16 outputs).
FIELDS = {"group_size": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]}
BERT = {"group_size": 8, "target_modules": ["query", "value", "intermediate.dense"]}


def hf_model(arch: str, seed: int = 3, **fields: object) -> torch.nn.Module:
    task = "SEQ_CLS" if arch == "bert" else "CAUSAL_LM"
    torch.manual_seed(seed)
    return peft.get_peft_model(build(arch), peft.RoadConfig(task_type=task, **fields)).eval()


def ours_model(arch: str, seed: int = 3, **fields: object) -> torch.nn.Module:
    torch.manual_seed(seed)
    return pk.apply(build(arch), pk.RoAd(**fields))  # type: ignore[arg-type]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("init_weights", [False, True])
def test_initialisation_and_forward_equal_hf(variant: str, init_weights: bool) -> None:
    fields = {**FIELDS, "variant": variant, "init_weights": init_weights}
    hf, ours = hf_model("llama", **fields), ours_model("llama", **fields)
    want, got = trainable_tensors(hf), trainable_tensors(ours)
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():  # the same draws from the global generator, in the same order
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name
    q_proj = ours.model.layers[0].self_attn.q_proj
    assert q_proj.road_theta["default"].shape == (int(32 * {"road_1": 0.5, "road_2": 1, "road_4": 2}[variant]),)
    inputs = batch("llama")
    with torch.no_grad():
        base = build("llama")(**inputs).logits
        expected, result = hf(**inputs), ours(**inputs)
    assert torch.equal(result.logits, expected.logits)
    assert torch.equal(result.loss, expected.loss)
    assert torch.equal(result.logits, base) is init_weights  # θ = 0, α = 1: the identity
    assert pk.count_parameters(ours) == tuple(hf.get_nb_trainable_parameters())


def test_each_pair_is_turned_by_its_scaled_rotation() -> None:
    """The paper's 2 × 2 blocks written out: feature i of a group pairs with i + g/2, y = α[[cos θ, −sin θ],
    [sin θ, cos θ]] h per pair (road_1), with separate (c, s) per feature (road_2, road_4)."""
    torch.manual_seed(0)
    base, h_in = torch.nn.Linear(6, 12), torch.randn(3, 6)
    for variant in VARIANTS:
        layer = RoAdLayer(base)
        layer.add("default", variant, group_size=4, init_weights=False)
        layer.set_active(["default"])
        theta, alpha = layer.road_theta["default"].detach(), layer.road_alpha["default"].detach()
        if variant == "road_1":
            th, al = theta.view(3, 1, 2).expand(3, 2, 2).flatten(), alpha.view(3, 1, 2).expand(3, 2, 2).flatten()
            c, s = al * th.cos(), al * th.sin()
        elif variant == "road_2":
            c, s = alpha * theta.cos(), alpha * theta.sin()
        else:
            th, al = theta.view(3, 2, 4), alpha.view(3, 2, 4)
            c, s = (al[:, 0] * th[:, 0].cos()).flatten(), (al[:, 1] * th[:, 1].sin()).flatten()
        rotation = torch.zeros(12, 12)
        for group in range(3):
            for i in range(2):
                a, b = 4 * group + i, 4 * group + i + 2
                rotation[a, a], rotation[a, b] = c[a], -s[a]
                rotation[b, b], rotation[b, a] = c[b], s[b]
        with torch.no_grad():
            assert torch.allclose(layer(h_in), base(h_in) @ rotation.T, atol=1e-6), variant


@pytest.mark.parametrize("variant", VARIANTS)
def test_gradients_equal_hf(variant: str) -> None:
    fields = {**FIELDS, "variant": variant, "init_weights": False}
    hf, ours = hf_model("llama", **fields), ours_model("llama", **fields)
    assert_gradients_match_hf(hf, ours, batch("llama"), "road_")


def test_half_precision_base_as_in_hf() -> None:
    """Over a bf16 base θ and α are drawn, rounded to bf16 and kept in fp32, and the output is turned in fp32."""
    fields = {**FIELDS, "init_weights": False, "variant": "road_2"}
    torch.manual_seed(3)
    theirs = peft.get_peft_model(build("llama").to(torch.bfloat16), peft.RoadConfig(**fields)).eval()
    torch.manual_seed(3)
    mine = pk.apply(build("llama").to(torch.bfloat16), pk.RoAd(**fields))  # type: ignore[arg-type]
    assert_same_tensors_as_hf(mine, theirs)
    for model in (mine, theirs):
        assert all(t.dtype == torch.float32 for t in trainable_tensors(model).values())
    with torch.no_grad():
        assert torch.equal(run(mine, "llama"), run(theirs, "llama"))


@pytest.mark.parametrize(("arch", "fields"), [("llama", {**FIELDS, "variant": "road_4"}),
                                              ("bert", {**BERT, "variant": "road_1"})])
def test_files_load_both_ways_with_equal_logits(arch: str, fields: dict[str, object], tmp_path) -> None:
    hf, ours = hf_model(arch, **fields, init_weights=False), ours_model(arch, **fields, init_weights=False)
    inputs = batch(arch)
    with torch.no_grad():  # a trained classifier head (bert's modules_to_save) must travel with the file too
        for p in [*trainable_tensors(hf).values(), *trainable_tensors(ours).values()]:
            p.add_(0.1)
        want = hf(**inputs).logits
        assert torch.allclose(ours(**inputs).logits, want, atol=1e-6)
    hf_config, our_config = assert_files_cross_load(hf, ours, arch, inputs, want, tmp_path, atol=0)
    assert any(k.endswith(".road_theta") for k in load_file(str(tmp_path / "pk" / "adapter_model.safetensors")))
    for config in (hf_config, our_config):
        # As given in HF PEFT (a set, written as a list); peftkit writes leaf names, or a regex of the exact names
        # where a leaf name would select more ('dense'): the tensor keys show that both select the same modules.
        config.pop("target_modules")
        # HF PEFT lists 'score' beside 'classifier' for every SEQ_CLS model and skips the one that is absent.
        config["modules_to_save"] = [m for m in config["modules_to_save"] or [] if m != "score"] or None
    assert our_config == hf_config


@pytest.mark.parametrize("variant", VARIANTS)
def test_merge_unmerge_and_unload_rotate_weights_and_biases_as_hf(variant: str) -> None:
    fields = {**BERT, "variant": variant, "init_weights": False}
    hf, ours = hf_model("bert", **fields), ours_model("bert", **fields)
    inputs = batch("bert")
    weights = {n: p.clone() for n, p in ours.named_parameters()}
    with torch.no_grad():
        want = ours(**inputs).logits
        pk.merge(ours, safe=True)
        assert torch.allclose(ours(**inputs).logits, want, atol=1e-5)
        pk.unmerge(ours)
        for n, p in ours.named_parameters():
            assert torch.allclose(p, weights[n], atol=1e-5), n
        plain = pk.unload(ours, merge=True)
        theirs = dict(hf.merge_and_unload().named_parameters())
        for n, p in plain.named_parameters():  # the query/value/intermediate biases are turned too
            assert torch.allclose(p, theirs[n], atol=1e-5), n
        assert not any(isinstance(m, RoAdLayer) for m in plain.modules())
        assert torch.allclose(plain(**inputs).logits, want, atol=1e-5)


def test_several_adapters_disable_merge_order_and_delete_as_in_hf() -> None:
    fields = {**FIELDS, "init_weights": False}
    other = {"variant": "road_2", "group_size": 4, "target_modules": ["v_proj", "o_proj"], "init_weights": False}
    hf, ours = hf_model("llama", **fields), ours_model("llama", **fields)
    torch.manual_seed(4)
    hf.add_adapter("other", peft.RoadConfig(task_type="CAUSAL_LM", **other))
    torch.manual_seed(4)
    pk.apply(ours, pk.RoAd(**other), name="other")  # type: ignore[arg-type]
    inputs = batch("llama")
    with torch.no_grad():
        for names in (["other"], ["default", "other"], ["other", "default"]):  # the order matters: no commuting
            hf.base_model.set_adapter(names)
            pk.set_adapter(ours, names)
            assert torch.allclose(ours(**inputs).logits, hf(**inputs).logits, atol=1e-6)
        with pk.disable_adapters(ours):
            assert torch.equal(ours(**inputs).logits, build("llama")(**inputs).logits)
        want = ours(**inputs).logits
        with pytest.raises(MergeError, match=r"order \['default', 'other'\] instead of \['other', 'default'\]"):
            pk.merge(ours, ["default"])  # it would act before 'other' where v_proj holds both
        pk.merge(ours, ["other"])  # the first active one: 'default' still turns the output after it
        assert torch.allclose(ours(**inputs).logits, want, atol=1e-5)
        hf.base_model.merge_adapter(["other"])  # HF PEFT's merged layers skip their unmerged adapters
        assert not torch.allclose(hf(**inputs).logits, want, atol=1e-2)
        hf.base_model.unmerge_adapter()
        pk.unmerge(ours)
        pk.merge(ours)  # both active adapters folded in, in their order: the same output
        assert torch.allclose(ours(**inputs).logits, want, atol=1e-5)
        assert torch.allclose(ours(**inputs).logits, hf(**inputs).logits, atol=1e-5)
        pk.unmerge(ours)
        assert torch.allclose(ours(**inputs).logits, want, atol=1e-5)
    pk.delete_adapter(ours, "other")
    assert not isinstance(ours.model.layers[0].self_attn.o_proj, RoAdLayer)
    assert isinstance(ours.model.layers[0].self_attn.v_proj, RoAdLayer)
    assert pk.list_adapters(ours) == ["default"]


def test_mixed_batches_equal_hf_adapter_names_and_each_row_alone() -> None:
    """Row i through adapter names[i] (HF PEFT's ``adapter_names=``), RoAd beside LoRA rows in the same batch."""
    other = {"variant": "road_4", "group_size": 4, "target_modules": ["q_proj", "o_proj"], "init_weights": False}
    hf, ours = hf_model("llama", **FIELDS, init_weights=False), ours_model("llama", **FIELDS, init_weights=False)
    torch.manual_seed(4)
    hf.add_adapter("other", peft.RoadConfig(task_type="CAUSAL_LM", **other))
    torch.manual_seed(4)
    pk.apply(ours, pk.RoAd(**other), name="other")  # type: ignore[arg-type]
    names = ["other", "__base__", "default", "other"]
    ids = torch.randint(1, 96, (4, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = hf(input_ids=ids, adapter_names=names).logits
        with pk.mixed_batch(ours, names):
            assert torch.equal(ours(input_ids=ids).logits, want)
        pk.apply(ours, pk.LoRA(target_modules=["up_proj", "k_proj"], rank=2), name="lora")
        randomize_adapters(ours, seed=2)  # every adapter's tensors, RoAd's too
        names = ["lora", "other", "__base__", "default"]
        with pk.mixed_batch(ours, names):
            got = ours(input_ids=ids).logits
        for i, name in enumerate(names):
            if name == "__base__":
                with pk.disable_adapters(ours):
                    alone = ours(input_ids=ids[i:i + 1]).logits
            else:
                pk.set_adapter(ours, name)
                alone = ours(input_ids=ids[i:i + 1]).logits
            torch.testing.assert_close(got[i:i + 1], alone, rtol=1e-5, atol=1e-6)
        pk.merge(ours, ["default"])
        with pytest.raises(AdapterStateError, match="merged adapters"), pk.mixed_batch(ours, names):
            pass


def test_quantized_linears_are_turned_and_merged_by_requantizing() -> None:
    """As HF PEFT does on bitsandbytes' linears: the quantized layer's output is turned; merging re-quantizes RW."""
    fields = {**FIELDS, "variant": "road_2"}
    quantized = pk.quantize(build("llama"), compute_dtype=torch.float32)
    plain = pk.unload(copy.deepcopy(quantized), merge=False, dequantize=True)  # the same weights, in float
    for model in (quantized, plain):
        torch.manual_seed(5)
        pk.apply(model, pk.RoAd(**fields, init_weights=False))  # type: ignore[arg-type]
    with torch.no_grad():
        expected = run(plain, "llama")
        torch.testing.assert_close(run(quantized, "llama"), expected, rtol=1e-5, atol=1e-5)
        with pk.disable_adapters(quantized):
            base = run(quantized, "llama")
        pk.merge(quantized)
        assert (run(quantized, "llama") - expected).abs().max() < 0.2 * (expected - base).abs().max()


def test_half_precision_merge_is_computed_in_fp32_and_rounded_once() -> None:
    """HF PEFT rounds R to a bf16 weight's dtype before multiplying; peftkit turns the fp32 weight and rounds once."""
    model = ours_model("bert", **BERT, init_weights=False).to(torch.bfloat16)
    layer = model.bert.encoder.layer[0].attention.self.query
    weight, bias = layer.base_layer.weight.float(), layer.base_layer.bias.float()
    with torch.no_grad():
        c, s = layer.coefficients("default")
        pk.merge(model)
    assert torch.equal(layer.base_layer.weight, rotate(weight.T, c, s, 8).T.to(torch.bfloat16))
    assert torch.equal(layer.base_layer.bias, rotate(bias, c, s, 8).to(torch.bfloat16))


def test_a_rotation_of_tied_embeddings_is_not_merged() -> None:
    """Gemma's output head shares the input embeddings: merging RoAd into it would turn the embeddings too (HF PEFT
    merges anyway and changes the model's output)."""
    model = pk.apply(build("gemma"), pk.RoAd(group_size=8, target_modules=["lm_head"], init_weights=False))
    want = run(model, "gemma")
    with pytest.raises(MergeError, match=r"at lm_head would be folded into a weight that \['model.embed_tokens"):
        pk.merge(model)
    assert torch.equal(run(model, "gemma"), want)


def test_a_singular_rotation_is_not_merged() -> None:
    model = ours_model("llama", **FIELDS)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.road_alpha["default"][3] = 0.0
    weights = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(MergeError, match=r"'default' at model.layers.1.mlp.down_proj maps some pair of outputs"):
        pk.merge(model)
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())  # nothing was merged
    hf = hf_model("llama", **FIELDS)
    with torch.no_grad():
        hf.base_model.model.model.layers[1].mlp.down_proj.road_alpha["default"][3] = 0.0
        hf.merge_adapter()  # HF PEFT merges it, and then cannot take it out again
        with pytest.raises(RuntimeError, match="linalg.inv"):
            hf.unmerge_adapter()


def test_errors() -> None:
    with pytest.raises(ConfigError, match="variant='road_3' must be one of"):
        pk.RoAd(variant="road_3")
    for bad in (0, 7, -2, True, 8.0):
        with pytest.raises(ConfigError, match=rf"group_size={bad!r} must be a positive even integer"):
            pk.RoAd(group_size=bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="init_weights=1 must be True or False"):
        pk.RoAd(init_weights=1)  # type: ignore[arg-type]
    model = build("llama")
    with pytest.raises(ConfigError, match=r"group_size=32 does not divide the 16 outputs of "
                                          r"model.layers.0.self_attn.v_proj.*\[2, 4, 8, 16\]"):
        pk.apply(model, pk.RoAd(group_size=32, target_modules=["q_proj", "v_proj"]))
    assert not any(isinstance(m, RoAdLayer) for m in model.modules())  # refused before anything changed
    with pytest.raises(ValueError, match="divisible by group_size"):  # HF PEFT refuses it too, in the middle
        peft.get_peft_model(build("llama"), peft.RoadConfig(group_size=32, target_modules=["q_proj", "v_proj"]))
    # GPT-2's Conv1D and embeddings: HF PEFT's RoAd adapts nn.Linear (and bitsandbytes' linears) only.
    with pytest.raises((UnsupportedLayerError, TargetNotFoundError), match="Conv1D"):
        pk.apply(build("gpt2"), pk.RoAd(group_size=8, target_modules=["c_attn"]))
    with pytest.raises(ValueError, match="not supported"):
        peft.get_peft_model(build("gpt2"), peft.RoadConfig(group_size=8, target_modules=["c_attn"]))
    with pytest.raises((UnsupportedLayerError, TargetNotFoundError), match="embed_tokens"):
        pk.apply(build("llama"), pk.RoAd(group_size=8, target_modules=["embed_tokens"]))
    with pytest.raises(UnsupportedLayerError, match="RoAd cannot adapt a Embedding; supported layer types: Linear"):
        RoAdLayer(torch.nn.Embedding(4, 8))
    with pytest.raises(ConfigError, match="sets use_dora=True, an option of HF PEFT's RoAd"):
        pk.RoAd.from_hf_dict({"peft_type": "ROAD", "target_modules": ["q_proj"], "use_dora": True}, ["q_proj"])
    assert getattr(pk, str(PEFT_METHODS["road"])) is pk.RoAd


def test_default_targets_are_lora_s_as_in_hf() -> None:
    ours = pk.apply(build("llama"), pk.RoAd(group_size=8))
    hf = peft.get_peft_model(build("llama"), peft.RoadConfig(group_size=8))
    assert sorted(trainable_tensors(ours)) == sorted(trainable_tensors(hf))
