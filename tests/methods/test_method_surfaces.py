"""The newer methods through every public surface: the Python API, two methods on one model, the command line and
resumed checkpoints. One table (METHODS) drives every test, on the tiny Llama of tests/models.py."""

from __future__ import annotations

import copy
import io
import json
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
from peftkit.errors import ConfigError, MergeError, UnsupportedLayerError
from peftkit.train.compare import compare, method_config
from peftkit.train.config import PEFT_METHODS, config_from_dict
from peftkit.train.dist_failure import FAULT_RAISE_ENV
from peftkit.train.sweep import run_sweep

from models import LLAMA_CONFIG, build, randomize_adapters, run

QV = ["q_proj", "v_proj"]
#: peft.method → (its fields on the tiny Llama, its config class). The same fields drive the Python and CLI tests.
METHODS: dict[str, tuple[dict[str, Any], Callable[..., pk.AdapterConfig]]] = {
    "vera": ({"target_modules": QV, "rank": 4}, pk.VeRA),
    "ln_tuning": ({}, pk.LNTuning),
    "loha": ({"target_modules": QV, "rank": 2, "alpha": 4}, pk.LoHa),
    "lokr": ({"target_modules": QV, "rank": 2, "alpha": 4}, pk.LoKr),
    "fourierft": ({"target_modules": QV, "n_frequency": 20}, pk.FourierFT),
    "beft": ({"target_modules": QV, "init_weights": False}, pk.BEFT),  # bias-free Llama layers: not mergeable
    "randlora": ({"target_modules": QV, "rank": 4, "alpha": 8}, pk.RandLoRA),
    "road": ({"target_modules": QV, "group_size": 8}, pk.RoAd),
    "shira": ({"target_modules": QV, "rank": 2}, pk.SHiRA),
    "c3a": ({"target_modules": QV, "block_size": 16}, pk.C3A),
    "gralora": ({"target_modules": QV, "rank": 4, "alpha": 8, "hybrid_rank": 2}, pk.GraLoRA),
    "delora": ({"target_modules": QV, "rank": 2, "delora_lambda": 3}, pk.DeLoRA),
    "vblora": ({"target_modules": QV, "rank": 2, "num_vectors": 10, "vector_length": 8}, pk.VBLoRA),
    "unilora": ({"target_modules": QV, "rank": 2, "theta_d_length": 24}, pk.UniLoRA),
    "hira": ({"target_modules": QV, "rank": 2}, pk.HiRA),
    "glora": ({"target_modules": QV, "rank": 2}, pk.GLoRA),
    "lily": ({"target_modules": QV, "rank": 4, "num_B": 3}, pk.Lily),
    "poly": ({"target_modules": QV, "rank": 2, "n_skills": 3}, pk.Poly),  # one task: calls need no task_ids
    "osf": ({"target_modules": QV, "effective_rank": 4}, pk.OSF),
    "adaption_prompt": ({"adapter_len": 3, "adapter_layers": 1}, pk.AdaptionPrompt),
    "cpt": ({"cpt_token_ids": [5, 6, 7, 8], "cpt_tokens_type_mask": [1, 2, 3, 4]}, pk.CPT),
}
#: The same adapters in HF PEFT: (config class name, its fields).
HF = {
    "vera": ("VeraConfig", {"target_modules": QV, "r": 4}),
    "ln_tuning": ("LNTuningConfig", {"task_type": "CAUSAL_LM"}),
    "loha": ("LoHaConfig", {"target_modules": QV, "r": 2, "alpha": 4}),
    "lokr": ("LoKrConfig", {"target_modules": QV, "r": 2, "alpha": 4}),
    "fourierft": ("FourierFTConfig", {"target_modules": QV, "n_frequency": 20}),
    "beft": ("BeftConfig", {"target_modules": QV}),
    "randlora": ("RandLoraConfig", {"target_modules": QV, "r": 4, "randlora_alpha": 8}),
    "road": ("RoadConfig", {"target_modules": QV, "group_size": 8}),
    "shira": ("ShiraConfig", {"target_modules": QV, "r": 2}),
    "c3a": ("C3AConfig", {"target_modules": QV, "block_size": 16}),
    "gralora": ("GraloraConfig", {"target_modules": QV, "r": 4, "alpha": 8, "hybrid_r": 2}),
    "delora": ("DeloraConfig", {"target_modules": QV, "r": 2, "delora_lambda": 3}),
    "vblora": ("VBLoRAConfig", {"target_modules": QV, "r": 2, "num_vectors": 10, "vector_length": 8}),
    "unilora": ("UniLoraConfig", {"target_modules": QV, "r": 2, "theta_d_length": 24}),
    "hira": ("HiraConfig", {"target_modules": QV, "r": 2}),
    "glora": ("GloraConfig", {"target_modules": QV, "r": 2}),
    "lily": ("LilyConfig", {"target_modules": QV, "r": 4, "num_B": 3}),
    "poly": ("PolyConfig", {"target_modules": QV, "r": 2, "n_skills": 3}),
    "osf": ("OSFConfig", {"target_modules": QV, "effective_rank": 4}),
    "adaption_prompt": ("AdaptionPromptConfig", {"adapter_len": 3, "adapter_layers": 1, "task_type": "CAUSAL_LM"}),
    "cpt": ("CPTConfig", {"cpt_token_ids": [5, 6, 7, 8], "cpt_tokens_type_mask": [1, 2, 3, 4],
                          "task_type": "CAUSAL_LM"}),
}
MERGEABLE = [m for m in METHODS if m not in ("adaption_prompt", "poly", "lily", "cpt", "beft")]
#: What merging a method that cannot be merged says.
UNMERGEABLE = {"adaption_prompt": "adaption prompts.*cannot be merged.*merge=False",
               "poly": "Poly adapters.*cannot be merged.*merge=False",
               "lily": "Lily adapters.*cannot be merged.*merge=False",
               "cpt": "prompt-learning adapters.*cannot be merged",
               "beft": "BEFT adapters.*cannot be merged: the layer has no bias.*merge=False"}
ALL = list(METHODS)


def config(method: str) -> pk.AdapterConfig:
    fields, cls = METHODS[method]
    return cls(**fields)


def adapted(method: str, names: tuple[str, ...] = ("default",)) -> nn.Module:
    """The tiny Llama with adapters ``names`` of ``method``, every adapter tensor random (gates open)."""
    model = build("llama")
    for name in names:
        pk.apply(model, config(method), name=name)
    randomize_adapters(model)
    return model


def ids() -> torch.Tensor:
    return torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(3))


def close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-5) -> None:
    torch.testing.assert_close(a, b, rtol=0, atol=atol)


# -- the Python API -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ALL)
def test_counts_and_reports_include_the_adapter_s_tensors(method: str) -> None:
    peft = pytest.importorskip("peft")
    model = adapted(method)
    cls_name, fields = HF[method]
    hf = peft.get_peft_model(build("llama"), getattr(peft, cls_name)(**fields))
    trainable, total = pk.count_parameters(model)
    assert (trainable, total) == hf.get_nb_trainable_parameters()  # frozen buffers (VeRA's A, B) count in neither
    assert pk.inspect(build("llama"), config(method)).added_params == trainable
    report = pk.memory_report(model)
    frozen = {id(t): t for t in [*model.parameters(), *model.buffers()] if not t.requires_grad}
    assert report.trainable_params == trainable
    assert sum(report.weights_by_dtype.values()) == sum(t.numel() * t.element_size() for t in frozen.values())
    for asked in (method, config(method)):  # the estimate models LoRA and QLoRA: another method is refused
        with pytest.raises(ConfigError, match="not supported.*pk.memory_report"):
            pk.estimate_training_memory(build("llama"), method=asked)  # type: ignore[arg-type]


@pytest.mark.parametrize("method", ALL)
def test_adapters_switch_disable_and_delete(method: str) -> None:
    model = adapted(method, ("default", "other"))
    pk.set_adapter(model, "default")
    first = run(model, "llama")
    assert pk.list_adapters(model) == ["default", "other"] and pk.active_adapters(model) == ["default"]
    pk.set_adapter(model, "other")
    if method != "cpt":  # CPT's two adapters share their context and start with Δ = 0: the same prompt
        assert not torch.allclose(run(model, "llama"), first)
    with pk.disable_adapters(model):
        close(run(model, "llama"), run(build("llama"), "llama"), atol=0)
    pk.delete_adapter(model, "other")
    pk.set_adapter(model, "default")
    assert pk.list_adapters(model) == ["default"]
    close(run(model, "llama"), first, atol=0)


@pytest.mark.parametrize("method", ALL)
def test_merge_and_unload_keep_the_output(method: str) -> None:
    model = adapted(method)
    want, base = run(model, "llama"), run(build("llama"), "llama")
    close(run(pk.unload(copy.deepcopy(model), merge=False), "llama"), base, atol=0)
    if method not in MERGEABLE:
        with pytest.raises(MergeError, match=UNMERGEABLE[method]):
            pk.merge(model)
        with pytest.raises(MergeError, match="cannot be merged"):
            pk.unload(model, merge=True)
        close(run(model, "llama"), want, atol=0)  # refused before anything changed
        return
    pk.merge(model)
    close(run(model, "llama"), want)
    pk.unmerge(model)
    close(run(model, "llama"), want)
    close(run(pk.unload(model, merge=True), "llama"), want)


@pytest.mark.parametrize("method", ALL)
def test_several_adapters_save_and_load_back(method: str, tmp_path: Path) -> None:
    model = adapted(method, ("default", "other"))
    pk.save_adapter(model, tmp_path, ["default", "other"])
    assert {p.name for p in tmp_path.iterdir()} == {"adapter_config.json", "adapter_model.safetensors", "other"}
    fresh = build("llama")
    pk.load_adapter(fresh, tmp_path)
    pk.load_adapter(fresh, tmp_path / "other", name="other")
    for name in ("default", "other"):
        pk.set_adapter(model, name)
        pk.set_adapter(fresh, name)
        close(run(fresh, "llama"), run(model, "llama"), atol=0)


@pytest.mark.parametrize("method", ALL)
def test_a_loaded_adapter_trains_on(method: str, tmp_path: Path) -> None:
    model = adapted(method)
    pk.save_adapter(model, tmp_path)
    fresh = build("llama").train()
    pk.load_adapter(fresh, tmp_path, trainable=True)
    assert pk.count_parameters(fresh) == pk.count_parameters(model)
    params = [p for p in fresh.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=1e-2)
    fresh(input_ids=ids(), labels=ids()).loss.backward()
    opt.step()
    assert all(not torch.equal(p, b) for p, b in zip(params, before, strict=True))


@pytest.mark.parametrize("method", [m for m in ALL if m != "road"])  # RoAd mixes rows: see test_road.py
def test_mixed_batches_refuse_the_method_by_name(method: str) -> None:
    model = adapted(method)
    refused = pytest.raises(UnsupportedLayerError, match=f"{type(config(method)).__name__} adapter.*pk.set_adapter")
    with refused, pk.mixed_batch(model, ["default", "__base__"]):
        pass


@pytest.mark.parametrize("method", ALL)
def test_copies_state_dicts_dtypes_checkpointing_and_compile(method: str) -> None:
    model = adapted(method)
    want = run(model, "llama")
    close(run(copy.deepcopy(model), "llama"), want, atol=0)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    other = build("llama", seed=1)
    pk.apply(other, config(method))
    other.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    close(run(other, "llama"), want, atol=0)
    half = copy.deepcopy(model).to(torch.bfloat16)
    assert run(half, "llama").dtype == torch.bfloat16
    close(run(half, "llama").float(), want, atol=0.05)
    close(run(torch.compile(copy.deepcopy(model), backend="eager"), "llama"), want, atol=0)

    def grads(checkpointing: bool) -> list[torch.Tensor]:
        m = copy.deepcopy(model).train()
        if checkpointing:
            m.gradient_checkpointing_enable()
        torch.manual_seed(0)  # the same draws for methods that sample in training (Poly's routing)
        m(input_ids=ids(), labels=ids()).loss.backward()
        return [p.grad for p in m.parameters() if p.requires_grad]

    for a, b in zip(grads(True), grads(False), strict=True):
        close(a, b, atol=1e-6)


# -- two methods on one model ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ALL)
def test_lora_beside_the_method_on_other_modules(method: str, tmp_path: Path) -> None:
    model = build("llama")
    pk.apply(model, pk.LoRA(target_modules=["down_proj"], rank=2), name="lora")
    pk.apply(model, config(method), name="other")
    randomize_adapters(model)
    pk.set_adapter(model, ["lora", "other"])
    want = run(model, "llama")
    pk.save_adapter(model, tmp_path)  # no default: each adapter in its subdirectory
    fresh = build("llama")
    for name in ("lora", "other"):
        pk.load_adapter(fresh, tmp_path / name, name=name)
    pk.set_adapter(fresh, ["lora", "other"])
    close(run(fresh, "llama"), want, atol=0)
    if method in MERGEABLE:
        close(run(pk.unload(model, merge=True), "llama"), want)
    if method not in ("ln_tuning", "adaption_prompt", "cpt"):  # one method per layer, as in HF PEFT
        with pytest.raises(UnsupportedLayerError, match="already adapted by .*same method"):
            pk.apply(fresh, pk.LoRA(target_modules=["q_proj"], rank=2), name="lora2")


def test_adaption_prompts_and_other_adapters_inside_their_attention_are_refused() -> None:
    model = build("llama")
    pk.apply(model, pk.LoRA(target_modules=QV, rank=2), name="lora")
    with pytest.raises(UnsupportedLayerError, match=r"layers\.1\.self_attn holds adapters of another method.*delete"):
        pk.apply(model, config("adaption_prompt"), name="prompt")
    assert pk.list_adapters(model) == ["lora"]

    model = build("llama")
    pk.apply(model, config("adaption_prompt"))
    with pytest.raises(UnsupportedLayerError, match=r"layers\.1\.self_attn\.q_proj.*AdaptionPromptLayer wraps"):
        pk.apply(model, pk.LoRA(target_modules=QV, rank=2), name="lora")
    with pytest.raises(UnsupportedLayerError, match=r"layers\.1\.self_attn\.q_proj.*AdaptionPromptLayer wraps"):
        pk.apply(model, pk.LoRA(target_modules="all-linear", rank=2), name="lora")
    pk.apply(model, pk.LoRA(target_modules=QV, rank=2, layers=[0]), name="lora")  # the other blocks are free
    adapted_qs = [n for n, _ in model.named_modules() if n.endswith("q_proj.lora_A")]
    assert adapted_qs == ["model.layers.0.self_attn.q_proj.lora_A"]


# -- the command line and checkpoints -------------------------------------------------------------------------------
def _run_config(tmp_path: Path, method: str, **train: Any) -> dict[str, Any]:
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"instruction": "Repeat", "input": w, "output": w}) + "\n"
                            for w in ["cat", "dog", "sun", "moon", "tree", "car", "fish", "bird"] * 2))
    return {
        "checkpoint": {"pretrained": {"config": {**LLAMA_CONFIG, "max_position_embeddings": 64}},
                       "save_dir": str(tmp_path / method), "save_interval": 2},
        "peft": {"method": method, **METHODS.get(method, ({}, None))[0]},
        "data": {"train": str(data), "max_length": 48, "eval_fraction": 0.25},
        "train": {"max_steps": 4, "batch_size": 4, "seed": 0, **train},
        "optimizer": {"lr": 0.01},
        "logging": {"progress_bar": False, "plots": False, "tensorboard": "false"},
        "eval": {"max_new_tokens": 2, "max_batches": 1},
    }


def _logits(model: nn.Module) -> torch.Tensor:
    return model(input_ids=torch.tensor([[5, 6, 7, 8]])).logits


def train_and_resume(run: dict[str, Any], tmp_path: Path, monkeypatch: Any) -> None:
    """Train ``run`` on the command line, then again into ``tmp_path/cut``, stopped after step 3 and resumed."""
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(run))
    assert main(["train", str(path)]) == 0
    monkeypatch.setenv(FAULT_RAISE_ENV, "3")  # a run stopped after step 3 resumes from step-2
    with pytest.raises(RuntimeError, match="injected fault"):
        main(["train", str(path), f"checkpoint.save_dir={tmp_path / 'cut'}"])
    monkeypatch.delenv(FAULT_RAISE_ENV)
    assert main(["train", str(path), f"checkpoint.save_dir={tmp_path / 'cut'}", "checkpoint.resume=auto"]) == 0


@pytest.mark.parametrize("method", ALL)
def test_train_resume_eval_merge_and_inspect_on_the_command_line(method: str, tmp_path: Path, capsys,
                                                                 monkeypatch) -> None:
    from transformers import AutoModelForCausalLM

    from peftkit.train.commands import attach_checkpoint, checkpoint_config
    from peftkit.train.tasks import build_model

    train_and_resume(_run_config(tmp_path, method), tmp_path, monkeypatch)
    final = tmp_path / method / "final"
    losses = [r["loss"] for r in map(json.loads, (tmp_path / method / "metrics.jsonl").read_text().splitlines())
              if "loss" in r]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    a, b = (load_file(str(d / "adapter_model.safetensors")) for d in (final, tmp_path / "cut" / "final"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    capsys.readouterr()
    assert main(["eval", "-p", str(final), "--json"]) == 0
    assert set(json.loads(capsys.readouterr().out)) == {"base", "adapted"}
    merged = tmp_path / "merged"
    code = main(["merge", str(final), "--out", str(merged)])
    if method in MERGEABLE:
        assert code == 0
        cfg = checkpoint_config(final)
        want = _logits(attach_checkpoint(build_model(cfg, 0).eval(), final, cfg))
        close(_logits(AutoModelForCausalLM.from_pretrained(merged).eval()), want)
    else:
        assert code == 2 and "cannot be merged" in capsys.readouterr().err and not merged.exists()
    model_json = tmp_path / "llama.json"
    model_json.write_text(json.dumps(LLAMA_CONFIG))
    options = [f"{k}={json.dumps(v)}" for k, v in METHODS[method][0].items()]
    capsys.readouterr()
    assert main(["inspect", str(model_json), "--method", method, *options]) == 0
    assert "modules adapted" in capsys.readouterr().out


def test_compare_routes_each_method_s_options_and_writes_the_table(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    cfg = _run_config(tmp_path, "lora", max_steps=1)
    cfg["peft"] = {"method": "lora", "rank": 2, "alpha": 4, "dropout": 0.05, "target_modules": QV,
                   "adapter_len": 3, "adapter_layers": 1, "n_frequency": 20, "group_size": 8, "block_size": 16,
                   "delora_lambda": 3, "num_vectors": 10, "vector_length": 8, "theta_d_length": 24,
                   "cpt_token_ids": [5, 6, 7, 8], "cpt_tokens_type_mask": [1, 2, 3, 4]}
    base = config_from_dict(cfg)
    names = ["lora", *METHODS]
    options = {m: method_config(base, m, tmp_path).peft.options for m in names}
    assert options == {
        "lora": {"rank": 2, "alpha": 4, "dropout": 0.05, "target_modules": QV},  # not adaption prompts' fields
        "vera": {"rank": 2, "dropout": 0.05, "target_modules": QV},
        "ln_tuning": {},  # its targets are norm layers: LoRA's would match none
        "loha": {"rank": 2, "alpha": 4, "target_modules": QV},
        "lokr": {"rank": 2, "alpha": 4, "target_modules": QV},
        "fourierft": {"target_modules": QV, "n_frequency": 20},
        "beft": {"target_modules": QV},
        "randlora": {"rank": 2, "alpha": 4, "dropout": 0.05, "target_modules": QV},
        "road": {"target_modules": QV, "group_size": 8},
        "shira": {"rank": 2, "target_modules": QV},
        "c3a": {"target_modules": QV, "block_size": 16},
        "gralora": {"rank": 2, "alpha": 4, "dropout": 0.05, "target_modules": QV},
        "delora": {"rank": 2, "delora_lambda": 3, "target_modules": QV},
        "vblora": {"rank": 2, "dropout": 0.05, "target_modules": QV, "num_vectors": 10, "vector_length": 8},
        "unilora": {"rank": 2, "dropout": 0.05, "target_modules": QV, "theta_d_length": 24},
        "hira": {"rank": 2, "dropout": 0.05, "target_modules": QV},
        "glora": {"rank": 2, "target_modules": QV},
        "lily": {"rank": 2, "target_modules": QV},
        "poly": {"rank": 2, "target_modules": QV},
        "osf": {"target_modules": QV},
        "adaption_prompt": {"adapter_len": 3, "adapter_layers": 1},
        "cpt": {"cpt_token_ids": [5, 6, 7, 8], "cpt_tokens_type_mask": [1, 2, 3, 4]},
    }
    cfg["peft"]["rnak"] = 4  # a field of no method is still refused by name
    with pytest.raises(ConfigError, match="rnak"):
        method_config(config_from_dict(cfg), "lora", tmp_path)
    del cfg["peft"]["rnak"], cfg["peft"]["adapter_len"]
    with pytest.raises(ConfigError, match="--methods adaption_prompt: adapter_len=0.*peft.adapter_len"):
        method_config(config_from_dict(cfg), "adaption_prompt", tmp_path)

    result = compare(base, names, tmp_path / "out", isolate=False)
    assert all("error" not in row for row in result["methods"].values()), result["methods"]
    table = (tmp_path / "out" / "compare.md").read_text()
    assert all(f"| {m} |" in table for m in names)


def test_sweep_sets_rank_and_alpha_where_the_method_has_them(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    for method in ("loha", "gralora"):
        path.write_text(yaml.safe_dump(_run_config(tmp_path, method, max_steps=1)))
        rows = run_sweep(str(path), [2, 4], overrides=["data.eval_fraction=0"])
        assert [(r["rank"], r["alpha"]) for r in rows] == [(2, 4.0), (4, 8.0)] and all("error" not in r for r in rows)
        assert rows[0]["trainable"] < rows[1]["trainable"]
    path.write_text(yaml.safe_dump(_run_config(tmp_path, "vera", max_steps=1)))  # a rank and no alpha: ranks alone
    rows = run_sweep(str(path), [2, 4], overrides=["data.eval_fraction=0"])
    assert [(r["rank"], r["alpha"]) for r in rows] == [(2, None), (4, None)] and all("error" not in r for r in rows)
    assert rows[0]["trainable"] < rows[1]["trainable"] and (tmp_path / "vera" / "r4" / "final").is_dir()
    assert "| 4 | - |" in (tmp_path / "vera" / "sweep.md").read_text()
    with pytest.raises(ConfigError, match="'vera' has a rank but no alpha: drop --alphas"):
        run_sweep(str(path), [2], alphas=[4.0])
    # VB-LoRA's logits, each Poly skill's factors, HiRA's, GLoRA's and Lily's A and B's grow with the rank
    for method in ("vblora", "poly", "hira", "glora", "lily"):
        path.write_text(yaml.safe_dump(_run_config(tmp_path, method, max_steps=1)))
        rows = run_sweep(str(path), [2, 4], overrides=["data.eval_fraction=0"])
        assert [(r["rank"], r["alpha"]) for r in rows] == [(2, None), (4, None)]
        assert all("error" not in r for r in rows) and rows[0]["trainable"] < rows[1]["trainable"]
    path.write_text(yaml.safe_dump(_run_config(tmp_path, "unilora", max_steps=1)))  # the rank, not θ's length
    rows = run_sweep(str(path), [2, 4], overrides=["data.eval_fraction=0"])
    assert [(r["rank"], r["alpha"]) for r in rows] == [(2, None), (4, None)] and all("error" not in r for r in rows)
    assert rows[0]["trainable"] == rows[1]["trainable"] == 24
    for method in ("fourierft", "beft", "road", "c3a", "osf", "ln_tuning", "adaption_prompt", "cpt"):
        path.write_text(yaml.safe_dump(_run_config(tmp_path, method)))
        listing = r"use a method with one \(lora, .*loha, lokr, .*vera.*\)"
        with pytest.raises(ConfigError, match=rf"'{method}' has no rank to sweep; {listing}"):
            run_sweep(str(path), [2])


def test_ln_tuning_without_defaults_names_the_model_s_norm_layers() -> None:
    # HF PEFT has no LN tuning targets for BERT either: the error lists what to pass, its norm layers.
    with pytest.raises(ConfigError, match=r"LNTuning has no default target_modules for model_type='bert'.*its norm "
                                          r"layers: LayerNorm\)$"):
        pk.apply(build("bert"), pk.LNTuning())


#: Fields that fit Gemma's lm_head (32 → 260) where the table's do not.
_LM_HEAD_FIELDS: dict[str, dict[str, Any]] = {"road": {"group_size": 4}, "c3a": {"block_size": 4},
                                              "vblora": {"vector_length": 4}}


@pytest.mark.parametrize("method", [m for m in MERGEABLE if m != "ln_tuning"])
def test_merging_into_an_output_head_tied_to_the_embeddings_is_refused(method: str) -> None:
    """Merging would change the embeddings too, where the unmerged adapter changes the head alone."""
    fields, cls = METHODS[method]
    model = build("gemma")  # lm_head shares the input embeddings' weight
    pk.apply(model, cls(**{**fields, "target_modules": ["lm_head"], **_LM_HEAD_FIELDS.get(method, {})}))
    randomize_adapters(model)
    weight = model.lm_head.base_layer.weight.clone()
    with pytest.raises(MergeError, match="tied"):
        pk.merge(model)
    assert torch.equal(model.lm_head.base_layer.weight, weight) and not model.lm_head.merged_adapters


def test_compare_passes_the_adapted_layers_biases_in_each_method_s_spelling(tmp_path: Path) -> None:
    """``bias: lora_only`` in the config reaches every compared method with a bias option as its own spelling."""
    cfg = _run_config(tmp_path, "lora", max_steps=1)
    cfg["peft"] = {"method": "lora", "bias": "lora_only", "target_modules": QV}
    base = config_from_dict(cfg)
    spelled = {method: getattr(pk, name).bias_only for method, name in PEFT_METHODS.items()
               if name and isinstance(getattr(getattr(pk, name), "bias_only", None), str)}
    assert {"lora", "dora", "adalora", "vera", "glora", "unilora", "vblora"} <= set(spelled)
    assert spelled["glora"] == "glora_only" and spelled["miss"] == "MiSS_only"
    for method, only in spelled.items():
        assert method_config(base, method, tmp_path).peft.options["bias"] == only, method
