"""Tiny models with random weights for the test suite (nothing is downloaded)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class Arch:
    """A tiny model, an input builder, and the module names tests target on it."""

    build: Callable[[], nn.Module]
    inputs: Callable[[], dict[str, torch.Tensor]]
    targets: list[str]
    modules_to_save: list[str] = field(default_factory=list)
    output: str = "logits"


#: A tiny Llama as a training config's ``model.config`` (random init; the byte-level test tokenizer has 260 ids).
LLAMA_CONFIG = {
    "model_type": "llama",
    "vocab_size": 260,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}


def _ids(vocab: int = 96, batch: int = 2, seq: int = 7) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(1))


def llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=96, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


def gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=96, n_positions=64,
                     bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg)


def bert_cls() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     vocab_size=96, max_position_embeddings=64, num_labels=3)
    return BertForSequenceClassification(cfg)


def t5() -> nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(d_model=32, d_ff=64, d_kv=8, num_layers=2, num_decoder_layers=2, num_heads=4,
                   vocab_size=96, decoder_start_token_id=0, feed_forward_proj="gated-gelu",
                   tie_word_embeddings=False)
    return T5ForConditionalGeneration(cfg)


#: Shared sizes of the tiny decoder-only models below (hidden 32, 2 layers, 4 heads).
_SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
          "vocab_size": 96, "max_position_embeddings": 64}


def qwen2() -> nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(**_SMALL, num_key_value_heads=2))


def mistral() -> nn.Module:
    from transformers import MistralConfig, MistralForCausalLM

    return MistralForCausalLM(MistralConfig(**_SMALL, num_key_value_heads=2))


def gpt_neox() -> nn.Module:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    return GPTNeoXForCausalLM(GPTNeoXConfig(**_SMALL))


def phi3() -> nn.Module:
    """Fused ``qkv_proj`` and ``gate_up_proj``, grouped-query attention."""
    from transformers import Phi3Config, Phi3ForCausalLM

    return Phi3ForCausalLM(Phi3Config(**_SMALL, num_key_value_heads=2, pad_token_id=0))


def opt() -> nn.Module:
    from transformers import OPTConfig, OPTForCausalLM

    return OPTForCausalLM(OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                                    vocab_size=96, max_position_embeddings=64, word_embed_proj_dim=32))


def gemma() -> nn.Module:
    """Tied embeddings, scaled by √hidden in the forward."""
    from transformers import GemmaConfig, GemmaForCausalLM

    return GemmaForCausalLM(GemmaConfig(**_SMALL, num_key_value_heads=2, head_dim=8))


class ConvNet(nn.Module):
    """Embedding, Conv1d, Conv2d and Linear layers in one small model."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(96, 8)
        self.conv1 = nn.Conv1d(8, 12, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(1, 6, kernel_size=3, padding=1, stride=2)
        self.proj = nn.Linear(12 * 7 + 6 * 4 * 4, 10)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids)                      # (b, 7, 8)
        a = self.conv1(h.transpose(1, 2)).flatten(1)   # (b, 12*7)
        b = self.conv2(h.unsqueeze(1)).flatten(1)      # (b, 6*4*4)
        return self.proj(torch.cat([a, b], dim=1))


ARCHS: dict[str, Arch] = {
    "llama": Arch(llama, lambda: {"input_ids": _ids()}, ["q_proj", "k_proj", "v_proj", "down_proj", "embed_tokens"]),
    "gpt2": Arch(gpt2, lambda: {"input_ids": _ids()}, ["c_attn", "c_fc", "c_proj"]),
    "bert": Arch(bert_cls, lambda: {"input_ids": _ids()}, ["query", "value", "intermediate.dense"],
                 modules_to_save=["classifier"]),
    "t5": Arch(t5, lambda: {"input_ids": _ids(), "decoder_input_ids": _ids(seq=5)}, ["q", "v", "wi_0", "wo"]),
    "convnet": Arch(ConvNet, lambda: {"input_ids": _ids()}, ["embed", "conv1", "conv2", "proj"], output=""),
}
#: More decoder-only architectures, kept apart from ARCHS so the tables over ARCHS stay small.
MORE_ARCHS: dict[str, Arch] = {
    name: Arch(builder, lambda: {"input_ids": _ids()}, targets)
    for name, builder, targets in [
        ("qwen2", qwen2, ["q_proj", "v_proj"]), ("mistral", mistral, ["q_proj", "v_proj"]),
        ("gpt_neox", gpt_neox, ["query_key_value"]), ("phi3", phi3, ["qkv_proj", "gate_up_proj"]),
        ("opt", opt, ["q_proj", "v_proj"]), ("gemma", gemma, ["q_proj", "v_proj"]),
    ]
}


def _arch(arch: str) -> Arch:
    return ARCHS[arch] if arch in ARCHS else MORE_ARCHS[arch]


def build(arch: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return _arch(arch).build().eval()


def run(model: nn.Module, arch: str, **extra: torch.Tensor) -> torch.Tensor:
    """The architecture's test inputs (and ``extra`` call arguments) through ``model``, on the device of its
    parameters."""
    device = next(model.parameters()).device
    out = model(**{k: v.to(device) for k, v in {**_arch(arch).inputs(), **extra}.items()})
    key = _arch(arch).output
    return getattr(out, key) if key else out


def check_two_adapters_as_hf(hf: Any, model: nn.Module, arch: str = "llama") -> None:
    """Adapters ``default`` and ``other`` on ``model`` give HF PEFT's ``hf`` logits with ``other`` active and with
    both (merged too); disabled, the base model's logits exactly."""
    import peftkit as pk

    with torch.no_grad():
        for names in (["other"], ["default", "other"]):
            hf.base_model.set_adapter(names)
            pk.set_adapter(model, names)
            assert torch.allclose(run(model, arch), run(hf, arch), atol=1e-6)
        with pk.disable_adapters(model):
            assert torch.equal(run(model, arch), run(build(arch), arch))
        pk.merge(model)  # both active adapters folded in: the same output
        assert torch.allclose(run(model, arch), run(hf, arch), atol=1e-5)
        pk.unmerge(model)


def randomize_adapters(model: nn.Module, seed: int = 0) -> None:
    """Give every trainable or adapter tensor random values, so a zero-initialised B cannot hide a bug."""
    import peftkit as pk
    from peftkit.core.state import adapter_layers

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            for name in pk.list_adapters(model):
                for tensor in layer.adapter_tensors(name).values():
                    if tensor.is_floating_point():
                        tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.1)


def perturb_dora(model: nn.Module, seed: int = 0) -> None:
    """Random B and magnitudes off their initial norms, so every DoRA term is exercised."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                noise = torch.randn(p.shape, generator=gen)
                p.mul_(1 + 0.2 * noise) if "magnitude" in name else p.add_(0.1 * noise)


def randomize_trainable(model: nn.Module, scale: float = 0.5, seed: int | None = None, shift: bool = False
                        ) -> nn.Module:
    """Every trainable tensor drawn from N(0, scale²) (from a generator seeded with ``seed``, else the global RNG),
    or with ``shift`` moved from its value by such a draw, so no initial value can hide a bug; returns ``model``."""
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                noise = torch.randn_like(p) if gen is None else torch.randn(p.shape, generator=gen).to(p.device)
                p.copy_(noise * scale + (p if shift else 0))
    return model


def hf_pair(builder: Callable[[], nn.Module], ours: Any, theirs: Any, seed: int = 1) -> tuple[nn.Module, Any]:
    """``builder()``'s model adapted by peftkit with config ``ours`` and another by HF PEFT with config ``theirs``,
    each from global seed ``seed`` (the HF PEFT model in evaluation mode)."""
    import peft

    import peftkit as pk

    base_ours, base_theirs = builder(), builder()  # built first: a builder may seed the global RNG itself
    torch.manual_seed(seed)
    model = pk.apply(base_ours, ours)
    torch.manual_seed(seed)
    return model, peft.get_peft_model(base_theirs, theirs).eval()


class ConvStack(nn.Module):
    """A 1×1 Conv2d, a padded, strided 3×3 one and a linear head, all with biases: (N, 4, 5, 5) → (N, 4)."""

    def __init__(self) -> None:
        super().__init__()
        self.point = nn.Conv2d(4, 8, kernel_size=1)
        self.conv = nn.Conv2d(8, 8, kernel_size=3, padding=1, stride=2)
        self.head = nn.Linear(8 * 9, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(torch.relu(self.point(x)))).flatten(1))


def conv_stack() -> nn.Module:
    torch.manual_seed(0)
    return ConvStack().eval()


def conv_input() -> torch.Tensor:
    return torch.randn(3, 4, 5, 5, generator=torch.Generator().manual_seed(3))


def train_losses(model: nn.Module, loss: Callable[[], torch.Tensor], lr: float, steps: int = 8) -> list[float]:
    """Losses of ``steps`` AdamW steps on the model's trainable parameters; ``loss()`` runs one forward."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        value = loss()
        opt.zero_grad()
        value.backward()
        opt.step()
        losses.append(value.item())
    return losses


def lora_layers(model: nn.Module) -> list[tuple[str, Any]]:
    """``(qualified name, LoRALinear)`` for every linear LoRA layer of ``model``."""
    from peftkit.core.state import adapter_layers
    from peftkit.methods.lora_layers import LoRALinear

    return [(q, layer) for q, layer in adapter_layers(model) if isinstance(layer, LoRALinear)]


def assert_factors_match(layer: Any, other: nn.Module, name: str = "default") -> tuple[torch.Tensor, torch.Tensor]:
    """Assert a peftkit ``LoRALinear``'s A and B equal those of HF PEFT's layer ``other`` within fp32 rounding;
    returns them."""
    A, B = layer.factor_weights(name)
    torch.testing.assert_close(A, other.lora_A[name].weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(B, other.lora_B[name].weight, rtol=1e-5, atol=1e-6)
    return A, B


def assert_same_tensors_as_hf(ours: nn.Module, hf: Any) -> None:
    """Assert peftkit's adapter ``"default"`` holds HF PEFT's tensors (``hf``'s, a PEFT model): the same keys, equal
    values, and as many trainable and total parameters."""
    import peft

    import peftkit as pk
    from peftkit.io.hf_format import adapter_state_dict

    theirs = peft.get_peft_model_state_dict(hf)
    mine = adapter_state_dict(ours, "default")
    assert sorted(mine) == sorted(theirs)
    for key, value in theirs.items():
        assert torch.equal(mine[key].detach(), value), key
    assert pk.count_parameters(ours) == tuple(hf.get_nb_trainable_parameters())


def assert_same_grads_as_hf(ours: nn.Module, hf: Any, forward: Callable[[nn.Module], torch.Tensor],
                            atol: float = 1e-6) -> None:
    """Backpropagate both models' summed squared outputs; assert the tensors peftkit's adapter ``"default"`` trains
    are those HF PEFT trains (its parameter names without the adapter name) and get the same gradients."""
    from peftkit.io.hf_format import adapter_state_dict

    forward(ours).square().sum().backward()
    forward(hf).square().sum().backward()
    grads = {k.replace(".default", ""): p.grad for k, p in hf.named_parameters() if p.requires_grad}
    trained = {k: t for k, t in adapter_state_dict(ours, "default").items() if t.requires_grad}
    assert sorted(trained) == sorted(grads)
    for key, tensor in trained.items():
        torch.testing.assert_close(tensor.grad, grads[key], rtol=1e-4, atol=atol)


def assert_loads_in_hf(ours: nn.Module, builder: Callable[[], nn.Module], forward: Callable[[nn.Module], torch.Tensor],
                       path: Any, atol: float = 1e-6) -> tuple[Any, dict[str, Any]]:
    """Give ``ours``'s adapters random tensors, save adapter ``"default"`` to ``path`` and load it with HF PEFT on
    ``builder()``; assert the same outputs. Returns HF PEFT's model and the ``adapter_config.json`` written."""
    import json

    import peft

    import peftkit as pk

    randomize_adapters(ours, seed=2)
    with torch.no_grad():
        expected = forward(ours)
    pk.save_adapter(ours, path)
    back = peft.PeftModel.from_pretrained(builder(), str(path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(forward(back), expected, rtol=1e-5, atol=atol)
    return back, json.loads((path / "adapter_config.json").read_text())


def assert_hf_conversion_matches(hf: Any, model: nn.Module, init: Any, tmp_path: Any, atol: float) -> None:
    """Convert ``model``'s trained adapter (PiSSA, OLoRA, CorDA: saved by peftkit with ``convert_to_lora=True`` under
    ``tmp_path/"pk"``) with HF PEFT's recipe, into ``tmp_path/"hf"``, and assert both files hold the same tensors.

    HF PEFT's recipe: ``hf`` (built with ``init_lora_weights=init``) saves its initial adapter as a plain one, takes
    ``model``'s trained state (same keys, same residual) and saves with ``path_initial_model_for_weight_conversion``.
    """
    from safetensors.torch import load_file

    hf.peft_config["default"].init_lora_weights = True
    hf.save_pretrained(str(tmp_path / "init"))
    hf.peft_config["default"].init_lora_weights = init
    hf.base_model.model.load_state_dict(model.state_dict())
    hf.save_pretrained(str(tmp_path / "hf"), path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    mine, want = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("pk", "hf"))
    assert mine.keys() == want.keys()
    for key, tensor in want.items():
        torch.testing.assert_close(mine[key], tensor, rtol=0, atol=atol, msg=key)


def assert_files_cross_load(hf: Any, ours: nn.Module, arch: str, inputs: dict[str, torch.Tensor],
                            want: torch.Tensor, tmp_path: Any, atol: float = 1e-6) -> tuple[dict[str, Any], ...]:
    """Save ``hf`` (an HF PEFT model) and ``ours`` (peftkit) under ``tmp_path/"hf"`` and ``tmp_path/"pk"``; assert
    both files hold the same tensor keys and values (within ``atol``) and that each loads in the other library onto a
    fresh ``arch`` model with the logits ``want`` on ``inputs``. Returns both ``adapter_config.json`` (HF PEFT's
    first), without ``peft_version``."""
    import json

    import peft
    from safetensors.torch import load_file

    import peftkit as pk

    hf.save_pretrained(str(tmp_path / "hf"))
    pk.save_adapter(ours, tmp_path / "pk")
    theirs, mine = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("hf", "pk"))
    assert sorted(mine) == sorted(theirs)
    for key, tensor in theirs.items():
        torch.testing.assert_close(mine[key], tensor, rtol=0, atol=atol, msg=key)
    loaded = pk.load_adapter(build(arch), tmp_path / "hf")
    back = peft.PeftModel.from_pretrained(build(arch), str(tmp_path / "pk")).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, want, rtol=0, atol=atol)
        torch.testing.assert_close(back(**inputs).logits, want, rtol=0, atol=atol)
    configs = [json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("hf", "pk")]
    for config in configs:
        config.pop("peft_version", None)
    return tuple(configs)


def assert_files_match_hf(hf: Any, ours: nn.Module, arch: str, inputs: dict[str, torch.Tensor], tmp_path: Any,
                          loose: tuple[str, ...] = ()) -> None:
    """:func:`assert_files_cross_load` with ``hf``'s logits, and the same ``adapter_config.json`` in both files but
    for the fields ``loose``."""
    with torch.no_grad():
        want = hf(**inputs).logits
    hf_config, our_config = assert_files_cross_load(hf, ours, arch, inputs, want, tmp_path)
    for key in loose:
        hf_config.pop(key, None)
        our_config.pop(key, None)
    assert our_config == hf_config


def trainable_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable tensors of a peftkit model or an HF PEFT model, under the base model's names (HF PEFT's
    ``base_model.model.`` prefix removed)."""
    return {n.removeprefix("base_model.model."): p for n, p in model.named_parameters() if p.requires_grad}


def assert_gradients_match_hf(hf: nn.Module, ours: nn.Module, inputs: dict[str, torch.Tensor], own: str) -> None:
    """Back-propagate both models' loss on ``inputs``; assert equal gradients on the same trainable tensors, and none
    on a tensor whose name lacks ``own`` (the method's key prefix, e.g. ``"road_"``)."""
    hf(**inputs).loss.backward()
    ours(**inputs).loss.backward()
    got = trainable_tensors(ours)
    for name, tensor in trainable_tensors(hf).items():
        assert tensor.grad is not None and torch.allclose(got[name].grad, tensor.grad, atol=1e-6), name
    assert all(p.grad is None for n, p in ours.named_parameters() if own not in n)


def assert_merges_as_hf(hf: Any, ours: nn.Module, inputs: dict[str, torch.Tensor], layer: type[nn.Module],
                        arch: str = "llama", atol: float = 1e-5) -> None:
    """Assert that merging peftkit's active adapters (``safe=True``) keeps its logits on ``inputs`` (within ``atol``),
    that disabling the merged adapters gives the base model's, that unmerging restores every tensor, and that
    ``pk.unload(merge=True)`` gives HF PEFT's ``merge_and_unload`` weights with no ``layer`` left."""
    import peftkit as pk

    weights = {n: p.clone() for n, p in ours.named_parameters()}
    with torch.no_grad():
        want = ours(**inputs).logits
        pk.merge(ours, safe=True)
        torch.testing.assert_close(ours(**inputs).logits, want, rtol=0, atol=atol)
        with pk.disable_adapters(ours):
            torch.testing.assert_close(ours(**inputs).logits, build(arch)(**inputs).logits, rtol=0, atol=atol)
        pk.unmerge(ours)
        for n, p in ours.named_parameters():
            torch.testing.assert_close(p, weights[n], rtol=0, atol=1e-6, msg=n)
        torch.testing.assert_close(ours(**inputs).logits, want, rtol=0, atol=1e-6)
        plain = pk.unload(ours, merge=True)
        theirs = dict(hf.merge_and_unload().named_parameters())
        for n, p in plain.named_parameters():
            torch.testing.assert_close(p, theirs[n], rtol=0, atol=1e-6, msg=n)
        assert not any(isinstance(m, layer) for m in plain.modules())
