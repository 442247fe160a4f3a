"""Every method that changes layers, on every device present (the CPU, and a CUDA GPU where there is one): an adapter
HF PEFT trained and saved loads with HF PEFT's logits and gradients, merges to the same outputs, and saves a file
HF PEFT reads back to the same logits."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import peftkit as pk
from peftkit.io.hf_format import adapter_state_dict

from models import build, randomize_trainable, run

peft = pytest.importorskip("peft")

DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
QV = ["q_proj", "v_proj"]
#: method → (HF PEFT's config class, its fields) on the tiny Llama.
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "lora": ("LoraConfig", {"target_modules": QV, "r": 4, "lora_alpha": 8}),
    "dora": ("LoraConfig", {"target_modules": QV, "r": 4, "lora_alpha": 8, "use_dora": True}),
    "ia3": ("IA3Config", {"target_modules": ["k_proj", "down_proj"], "feedforward_modules": ["down_proj"]}),
    "adalora": ("AdaLoraConfig", {"target_modules": QV, "init_r": 4, "target_r": 2, "total_step": 10}),
    "loha": ("LoHaConfig", {"target_modules": QV, "r": 2, "alpha": 4}),
    "lokr": ("LoKrConfig", {"target_modules": QV, "r": 2, "alpha": 4}),
    "oft": ("OFTConfig", {"target_modules": QV, "oft_block_size": 8}),
    "hra": ("HRAConfig", {"target_modules": QV, "r": 4}),
    "miss": ("MissConfig", {"target_modules": QV, "r": 4}),
    "vera": ("VeraConfig", {"target_modules": QV, "r": 4}),
    "fourierft": ("FourierFTConfig", {"target_modules": QV, "n_frequency": 20}),
    "beft": ("BeftConfig", {"target_modules": QV}),
    "randlora": ("RandLoraConfig", {"target_modules": QV, "r": 4, "randlora_alpha": 8}),
    "road": ("RoadConfig", {"target_modules": QV, "group_size": 8}),
    "shira": ("ShiraConfig", {"target_modules": QV, "r": 2}),
    "c3a": ("C3AConfig", {"target_modules": ["v_proj"], "block_size": 8}),
    "gralora": ("GraloraConfig", {"target_modules": QV, "r": 4, "alpha": 8, "hybrid_r": 2}),
    "delora": ("DeloraConfig", {"target_modules": QV, "r": 4, "delora_lambda": 3}),
    "vblora": ("VBLoRAConfig", {"target_modules": QV, "r": 2, "num_vectors": 10, "vector_length": 8}),
    "unilora": ("UniLoraConfig", {"target_modules": QV, "r": 2, "theta_d_length": 24}),
    "hira": ("HiraConfig", {"target_modules": QV, "r": 2}),
    "glora": ("GloraConfig", {"target_modules": QV, "r": 2}),
    "lily": ("LilyConfig", {"target_modules": QV, "r": 4, "num_B": 3}),
    "osf": ("OSFConfig", {"target_modules": QV, "effective_rank": 4}),
    # CAUSAL_LM: HF PEFT's plain PeftModel does not pass task_ids on to Poly
    "poly": ("PolyConfig", {"target_modules": QV, "r": 2, "n_tasks": 2, "task_type": "CAUSAL_LM"}),
}
#: Call arguments besides the inputs, per method: Poly's task ids (one per example).
CALL_ARGS: dict[str, dict[str, torch.Tensor]] = {"poly": {"task_ids": torch.tensor([1, 0])}}
#: Methods that cannot be merged (Poly, Lily: the update depends on the batch; BEFT: the Llama's projections have no
#: bias) or are merged in their own tests (AdaLoRA).
UNMERGED = ("adalora", "poly", "lily", "beft")


def _key(name: str) -> str:
    """HF PEFT's parameter name as peftkit's file key (the adapter name dropped; DoRA's magnitude is a module's
    weight there; VB-LoRA's bank and Uni-LoRA's θ, parameters of every layer there, are saved once, under the model's
    key)."""
    if ".vblora_vector_bank." in name:
        return "base_model.vblora_vector_bank"
    if ".unilora_theta_d." in name:
        return "base_model.unilora_theta_d"
    return name.replace(".default", "").replace("lora_magnitude_vector.weight", "lora_magnitude_vector")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", list(METHODS))
def test_hf_peft_adapter_runs_alike_on_the_device(method: str, device: str, tmp_path) -> None:
    cls, fields = METHODS[method]
    hf = peft.get_peft_model(build("llama").to(device), getattr(peft, cls)(**fields))
    for name, parameter in hf.named_parameters():
        if "ranknum" in name:  # AdaLoRA's rank count: HF PEFT 0.21.2 leaves it trainable once moved to a GPU
            parameter.requires_grad_(False)
    randomize_trainable(hf, 0.1, seed=0, shift=True)
    hf.save_pretrained(str(tmp_path / "hf"))
    ours = pk.load_adapter(build("llama").to(device), tmp_path / "hf", trainable=True)
    assert {p.device.type for p in ours.parameters()} == {device}

    hf.train()  # dropout is 0 throughout; AdaLoRA adds its orthogonality penalty in training mode in both
    ours.train()
    extra = CALL_ARGS.get(method, {})
    torch.manual_seed(0)  # Poly samples its routing in training mode: the same draws in both
    want = run(hf, "llama", **extra)
    torch.manual_seed(0)
    got = run(ours, "llama", **extra)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    want.square().mean().backward()
    got.square().mean().backward()
    grads = {_key(k): p.grad for k, p in hf.named_parameters() if p.requires_grad}
    trained: dict[str, torch.Tensor] = {}
    for key, tensor in adapter_state_dict(ours, "default").items():  # a tensor shared by layers (Lily) once, as
        if tensor.requires_grad and all(t is not tensor for t in trained.values()):  # named_parameters lists it
            trained[key] = tensor
    assert sorted(trained) == sorted(grads)
    # HF PEFT's C3A backward returns a wrong input gradient (see the README), so only its last layer's kernel is right
    upstream_wrong = {k for k in trained if method == "c3a" and ".layers.0." in k}
    for key, tensor in trained.items():
        if key not in upstream_wrong:
            torch.testing.assert_close(tensor.grad, grads[key], rtol=1e-4, atol=1e-5, msg=key)

    ours.eval()
    with torch.no_grad():
        unmerged = run(ours, "llama", **extra)
        if method not in UNMERGED:
            pk.merge(ours)
            torch.testing.assert_close(run(ours, "llama", **extra), unmerged, rtol=1e-4, atol=1e-4)
            pk.unmerge(ours)
    pk.save_adapter(ours, tmp_path / "pk")
    back = peft.PeftModel.from_pretrained(build("llama").to(device), str(tmp_path / "pk")).eval()
    with torch.no_grad():
        torch.testing.assert_close(run(back, "llama", **extra), unmerged, rtol=1e-5, atol=1e-5)
