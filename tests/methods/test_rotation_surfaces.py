"""OFT, BOFT, HRA and MiSS through every public surface (method × operation): counts and reports, adapter
management, merging, files with several adapters, trainable loading, mixed batches (refused), beside LoRA, copies,
dtype changes, gradient checkpointing, fused AdamW, and the command line (train, eval, merge, inspect, resume, compare,
sweep)."""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch import nn

import peftkit as pk
from peftkit.cli.main import main
from peftkit.errors import ConfigError, UnsupportedLayerError
from peftkit.train.compare import compare, method_config
from peftkit.train.config import config_from_dict

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

ATTN = ["q_proj", "v_proj"]
#: method → its config on the given targets, with random starting tensors so that every update is visible.
METHODS: dict[str, Callable[[list[str]], pk.AdapterConfig]] = {
    "oft": lambda t: pk.OFT(target_modules=t, oft_block_size=8, init_weights=False),
    "boft": lambda t: pk.BOFT(target_modules=t, boft_block_size=4, boft_n_butterfly_factor=2, init_weights=False),
    "hra": lambda t: pk.HRA(target_modules=t, rank=4, init_weights=False),
    "miss": lambda t: pk.MiSS(target_modules=t, rank=4, init_weights=False),
}
NAMES = list(METHODS)
IDS = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(1))


def llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=96,
                                        max_position_embeddings=64))


def adapted(method: str, *names: str) -> nn.Module:
    model = llama()
    for name in names or ("default",):
        pk.apply(model, METHODS[method](ATTN), name=name)
    return model


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits  # type: ignore[no-any-return]


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# -- the Python API ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", NAMES)
def test_counts_reports_and_dry_run_count_the_adapter_tensors(method: str, capsys: pytest.CaptureFixture[str]) -> None:
    _, base_total = pk.count_parameters(llama())
    model = adapted(method)
    own = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad)
    trainable, total = pk.count_parameters(model)
    assert own > 0 and trainable == own and total == base_total + own
    assert pk.memory_report(model).trainable_params == own
    assert pk.inspect(llama(), METHODS[method](ATTN)).added_params == own
    pk.print_trainable_parameters(model)
    assert f"trainable params: {own:,d}" in capsys.readouterr().out


@pytest.mark.parametrize("method", NAMES)
def test_estimate_training_memory_points_to_memory_report(method: str) -> None:
    with torch.device("meta"):
        model = llama()
    with pytest.raises(ConfigError, match=rf"method='{method}' is not supported.*pk.memory_report"):
        pk.estimate_training_memory(model, method=method)
    pk.apply(model, METHODS[method](ATTN))  # what the message proposes works on the meta model
    assert pk.memory_report(model).trainable_params == pk.count_parameters(model)[0] > 0


@pytest.mark.parametrize("method", NAMES)
def test_adapter_management(method: str) -> None:
    model = adapted(method, "default", "b").eval()
    base = logits(llama())
    assert pk.list_adapters(model) == ["default", "b"] and pk.active_adapters(model) == ["default"]
    only_default = logits(model)
    pk.set_adapter(model, "b")
    assert pk.active_adapters(model) == ["b"] and not torch.allclose(logits(model), only_default)
    with pk.disable_adapters(model):
        close(logits(model), base)
    pk.delete_adapter(model, "b")
    assert pk.list_adapters(model) == ["default"]
    pk.set_adapter(model, "default")
    close(logits(model), only_default)


@pytest.mark.parametrize("method", NAMES)
def test_merged_output_equals_the_unmerged_one(method: str) -> None:
    model = adapted(method).eval()
    expected = logits(model)
    pk.merge(model)
    close(logits(model), expected)
    pk.unmerge(model)
    close(logits(model), expected)
    close(logits(pk.unload(copy.deepcopy(model), merge=True)), expected)
    close(logits(pk.unload(model, merge=False)), logits(llama()))


@pytest.mark.parametrize("method", NAMES)
def test_several_adapters_saved_together_load_back(method: str, tmp_path: Path) -> None:
    model = adapted(method, "default", "b").eval()
    expected = {}
    for name in ("default", "b"):
        pk.set_adapter(model, name)
        expected[name] = logits(model)
    pk.save_adapter(model, tmp_path, ["default", "b"])
    fresh = llama().eval()
    pk.load_adapter(fresh, tmp_path)
    pk.load_adapter(fresh, tmp_path / "b", name="b")
    for name in ("default", "b"):
        pk.set_adapter(fresh, name)
        close(logits(fresh), expected[name])


@pytest.mark.parametrize("method", NAMES)
def test_an_adapter_loaded_trainable_keeps_training(method: str, tmp_path: Path) -> None:
    pk.save_adapter(adapted(method), tmp_path)
    model = pk.load_adapter(llama(), tmp_path, trainable=True).train()
    params = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in params) == pk.count_parameters(adapted(method))[0]
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(3):
        loss = model(IDS, labels=IDS).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] and all(not torch.equal(a, p) for a, p in zip(before, params, strict=True))


@pytest.mark.parametrize("method", NAMES)
def test_mixed_batch_is_refused_naming_the_method_and_what_to_do(method: str) -> None:
    model = adapted(method).eval()
    cls = type(METHODS[method](ATTN)).__name__
    with pytest.raises(UnsupportedLayerError, match=rf"method {cls}; .*LoRA adapters only.*pk.set_adapter"), \
            pk.mixed_batch(model, ["default", "__base__"]):
        pass


@pytest.mark.parametrize("method", NAMES)
def test_beside_lora_on_one_model(method: str, tmp_path: Path) -> None:
    # LoRA on the attention, the method on the MLP's up projection: active together, merged, saved, loaded.
    model = llama()
    pk.apply(model, pk.LoRA(target_modules=ATTN, rank=2, init_B="gaussian"))
    pk.apply(model, METHODS[method](["up_proj"]), name="mlp")
    pk.set_adapter(model, ["default", "mlp"])
    model.eval()
    expected = logits(model)
    assert not torch.allclose(expected, logits(llama()))
    pk.save_adapter(model, tmp_path)
    fresh = llama().eval()
    pk.load_adapter(fresh, tmp_path)
    pk.load_adapter(fresh, tmp_path / "mlp", name="mlp")
    pk.set_adapter(fresh, ["default", "mlp"])
    close(logits(fresh), expected)
    pk.merge(model)
    close(logits(model), expected)
    close(logits(pk.unload(model)), expected)


@pytest.mark.parametrize("method", NAMES)
def test_another_method_on_the_same_layer_and_lora_only_tools_are_refused(method: str) -> None:
    # As in HF PEFT, whose PeftModel holds adapters of one type: one method per layer, LoRA's tools take LoRA.
    other = pk.LoRA(target_modules=ATTN, rank=2)
    for first, second in ((other, METHODS[method](ATTN)), (METHODS[method](ATTN), other)):
        model = llama()
        pk.apply(model, first)
        with pytest.raises(UnsupportedLayerError, match="a second adapter on the same layer must use the same method"):
            pk.apply(model, second, name="second")
    model = adapted(method, "default", "b")
    cls = type(METHODS[method](ATTN)).__name__
    with pytest.raises(ConfigError, match=f"adapter 'default' is {cls}; combine supports LoRA and DoRA"):
        pk.combine(model, {"default": 0.5, "b": 0.5}, method="cat", name="mix")
    with pytest.raises(ConfigError, match=f"adapter 'default' is {cls}; prune supports LoRA and DoRA"):
        pk.prune(model, "default", method="rank", energy=0.9)
    with pytest.raises(ConfigError, match=f"adapter 'default' is {cls}; only LoRA and CanonicalLoRA"):
        pk.convert(model, to="canonical")


@pytest.mark.parametrize("method", NAMES)
def test_copies_state_dicts_and_bfloat16(method: str) -> None:
    model = adapted(method).eval()
    expected = logits(model)
    assert torch.equal(logits(copy.deepcopy(model)), expected)
    other = adapted(method).eval()
    with torch.no_grad():
        for p in other.parameters():
            if p.requires_grad:
                p.zero_()
    other.load_state_dict(model.state_dict())
    assert torch.equal(logits(other), expected)
    model.to(torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    torch.testing.assert_close(logits(model).float(), expected, rtol=0.02, atol=0.02)
    pk.merge(model)
    torch.testing.assert_close(logits(model).float(), expected, rtol=0.02, atol=0.02)


@pytest.mark.parametrize("variant", [*NAMES, "miss-bat"])
def test_a_merged_model_cast_to_bfloat16_unmerges(variant: str) -> None:
    # The adapters become bf16 too; a bat block is then solved in fp32 (CPU solvers take no half precision).
    method, _, bat = variant.partition("-")
    make = (lambda t: pk.MiSS(target_modules=t, rank=4, init_weights="bat")) if bat else METHODS[method]
    model = llama()
    for name in ("default", "b"):
        pk.apply(model, make(ATTN), name=name)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "miss_block" in n and bat:
                p.normal_(0, 0.05)
    pk.set_adapter(model, ["default", "b"])
    model.eval()
    expected = logits(model)
    pk.merge(model)
    model.to(torch.bfloat16)
    pk.unmerge(model)
    torch.testing.assert_close(logits(model).float(), expected, rtol=0.02, atol=0.02)


@pytest.mark.parametrize("method", NAMES)
def test_gradient_checkpointing_gives_the_same_gradients(method: str) -> None:
    grads = []
    for checkpointing in (False, True):
        model = adapted(method).train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        model(IDS, labels=IDS).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert grads[0].abs().sum() > 0
    close(grads[1], grads[0])


@pytest.mark.parametrize("method", NAMES)
def test_fused_adamw_trains_as_foreach_and_evaluates_fresh(method: str) -> None:
    # Fused AdamW (transformers.Trainer's default) writes parameters without moving their version counters.
    results = []
    for fused in (True, False):
        model = adapted(method).train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-2, fused=fused, foreach=not fused)
        for _ in range(3):
            model.eval()
            logits(model)  # an evaluation between steps, as Trainer's, must not leave anything stale
            model.train()
            model(IDS, labels=IDS).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        model.eval()
        out = logits(model)
        close(out, logits(copy.deepcopy(model)))  # a fresh recomputation from the same tensors
        results.append(out)
    close(results[0], results[1])


@pytest.mark.parametrize("method", NAMES)
def test_transformers_trainer_trains_the_adapter_alone(method: str, tmp_path: Path) -> None:
    from transformers import Trainer, TrainingArguments

    class Repeat(torch.utils.data.Dataset):  # type: ignore[type-arg]
        def __len__(self) -> int:
            return 12

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            ids = (torch.arange(12) * (i % 5 + 1) + i) % 96
            return {"input_ids": ids, "labels": ids}

    model = adapted(method)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
                             report_to=[], use_cpu=True, disable_tqdm=True, seed=0, save_strategy="no")
    Trainer(model=model, args=args, train_dataset=Repeat()).train()  # its default optimizer: fused AdamW
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved == {n for n, p in model.named_parameters() if p.requires_grad}
    pk.save_adapter(model, tmp_path / "adapter")
    close(logits(pk.load_adapter(llama(), tmp_path / "adapter").eval()), logits(model.eval()))


# -- the command line ------------------------------------------------------------------------------------------------
LLAMA_CONFIG = {"model_type": "llama", "vocab_size": 260, "hidden_size": 32, "intermediate_size": 32,
                "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
                "max_position_embeddings": 128}
#: method → its peft section fields for a run on LLAMA_CONFIG
RUN_FIELDS: dict[str, dict[str, Any]] = {"oft": {"oft_block_size": 8, "coft": True, "eps": 0.01},
                                         "boft": {"boft_n_butterfly_factor": 2, "boft_dropout": 0.25},
                                         "hra": {"rank": 4}, "miss": {"rank": 4, "dropout": 0.1}}


def run_config(tmp_path: Path, method: str, save_dir: Path, **peft: Any) -> Path:
    data = tmp_path / "data.jsonl"
    words = ["cat", "dog", "sun", "moon", "tree", "car", "fish", "bird"] * 3
    data.write_text("".join(json.dumps({"instruction": "Repeat", "input": w, "output": w}) + "\n" for w in words))
    cfg = {"model": {"task": "causal_lm"},
           "checkpoint": {"pretrained": {"config": LLAMA_CONFIG}, "save_dir": str(save_dir), "save_interval": 2,
                          "resume": "auto"},
           "peft": {"method": method, "target_modules": ["q_proj", "v_proj"], **RUN_FIELDS.get(method, {}), **peft},
           "data": {"train": str(data), "max_length": 48, "eval_fraction": 0.25},
           "train": {"max_steps": 4, "batch_size": 4, "seed": 0}, "optimizer": {"lr": 0.01},
           "scheduler": {"name": "constant"},
           "logging": {"progress_bar": False, "plots": False, "tensorboard": "false"},
           "eval": {"max_new_tokens": 2, "max_batches": 1}}
    path = tmp_path / f"{method}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("method", NAMES)
def test_train_eval_merge_inspect_and_resume(method: str, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from peftkit.train.commands import checkpoint_config
    from peftkit.train.tasks import build_model

    run = tmp_path / "run"
    config = run_config(tmp_path, method, run)
    assert main(["train", str(config)]) == 0
    losses = [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses))) and losses[-1] != losses[0]
    final = run / "final"
    assert json.loads((final / "adapter_config.json").read_text())["peft_type"] == method.upper()
    assert main(["eval", "-p", str(final)]) == 0
    assert main(["merge", str(final), "--out", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    trained = pk.load_adapter(build_model(checkpoint_config(final)), final).eval()
    ids = torch.arange(3, 30).reshape(3, 9)
    with torch.no_grad():
        close(merged(ids).logits, trained(ids).logits)
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_CONFIG))
    fields = [f"{k}={v}" for k, v in RUN_FIELDS[method].items()]
    assert main(["inspect", str(tmp_path / "config.json"), "--method", method, "--target", "q_proj", *fields]) == 0
    # Resumed from step-2 as after a kill: the same adapter as the uninterrupted run, bit for bit.
    expected = load_file(str(final / "adapter_model.safetensors"))
    shutil.rmtree(run / "step-4")
    shutil.rmtree(final)
    assert main(["train", str(config)]) == 0
    resumed = load_file(str(final / "adapter_model.safetensors"))
    assert resumed.keys() == expected.keys() and all(torch.equal(resumed[k], expected[k]) for k in expected)


def test_compare_routes_each_methods_options(tmp_path: Path) -> None:
    base = config_from_dict(yaml.safe_load(run_config(tmp_path, "lora", tmp_path / "x", rank=4, alpha=8,
                                                      dropout=0.1, bias="lora_only").read_text()))
    options = {m: method_config(base, m, tmp_path).peft.options for m in NAMES}
    assert options["oft"] == {"target_modules": ATTN, "bias": "oft_only"}
    assert options["boft"] == {"target_modules": ATTN, "bias": "boft_only"}
    assert options["hra"] == {"target_modules": ATTN, "rank": 4, "bias": "hra_only"}
    assert options["miss"] == {"target_modules": ATTN, "rank": 4, "dropout": 0.1, "bias": "MiSS_only"}
    # And back: an OFT config's own options, with its "oft_only" biases, reach LoRA in LoRA's spelling.
    oft = config_from_dict(yaml.safe_load(run_config(tmp_path, "oft", tmp_path / "y", bias="oft_only").read_text()))
    assert method_config(oft, "lora", tmp_path).peft.options == {"target_modules": ATTN, "bias": "lora_only"}


def test_compare_tabulates_every_method(tmp_path: Path) -> None:
    config = run_config(tmp_path, "lora", tmp_path / "x", rank=4, alpha=8)  # rank reaches HRA and MiSS too
    out = tmp_path / "out"
    result = compare(config, ["lora", "oft", "boft", "hra", "miss"], out, isolate=False)
    rows = result["methods"]
    assert list(rows) == ["lora", "oft", "boft", "hra", "miss"]
    assert all("error" not in r and r["trainable"] > 0 for r in rows.values()), rows
    assert all(torch.isfinite(torch.tensor(r["losses"])).all() for r in rows.values())
    assert json.loads((out / "compare.json").read_text())["methods"].keys() == rows.keys()
    table = (out / "compare.md").read_text()
    assert all(f"| {m} |" in table for m in rows)


@pytest.mark.parametrize("method", ["oft", "boft"])
def test_sweep_refuses_methods_without_a_rank(method: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = run_config(tmp_path, method, tmp_path / "sweep")
    assert main(["sweep", str(config), "--ranks", "2", "4"]) == 2
    err = capsys.readouterr().err
    assert f"peft.method='{method}' has no rank to sweep; use a method with one (lora," in err
    listed = err.partition("use a method with one (")[2].partition(")")[0].split(", ")
    assert {"hra", "miss"} <= set(listed) and method not in listed and "peft.FIELD=VALUE" in err
    assert not (tmp_path / "sweep").exists()


@pytest.mark.parametrize("method", ["hra", "miss"])
def test_sweep_runs_the_rank_of_a_method_without_alpha(method: str, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    config = run_config(tmp_path, method, tmp_path / "sweep")
    data = yaml.safe_load(config.read_text())
    data["train"]["max_steps"] = 1
    data["checkpoint"]["save_interval"] = 0
    config.write_text(yaml.safe_dump(data))
    assert main(["sweep", str(config), "--ranks", "2", "4", "--alphas", "8"]) == 2
    err = capsys.readouterr().err
    assert f"peft.method='{method}' has a rank but no alpha: drop --alphas and --alpha-per-rank" in err
    assert main(["sweep", str(config), "--ranks", "2", "4"]) == 0
    rows = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert [(r["rank"], r["alpha"]) for r in rows] == [(2, None), (4, None)]
    assert rows[0]["trainable"] < rows[1]["trainable"] and all(r["last_loss"] == r["last_loss"] for r in rows)
    for rank in (2, 4):
        saved = json.loads((tmp_path / "sweep" / f"r{rank}" / "final" / "adapter_config.json").read_text())
        assert saved["r"] == rank
    assert "| 2 | - |" in (tmp_path / "sweep" / "sweep.md").read_text()
