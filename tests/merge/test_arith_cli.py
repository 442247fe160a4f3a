"""``peftkit combine`` / ``peftkit prune`` on HF-format adapter directories over a tiny Llama config."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

import peftkit as pk
from peftkit.cli.arith import _base_model, register_combine, register_convert, register_prune
from peftkit.core.state import adapter_layers
from peftkit.errors import ConfigError

pytest.importorskip("transformers")

LLAMA = {
    "model_type": "llama",
    "vocab_size": 64,
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
}


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    register_combine(sub)
    register_prune(sub)
    register_convert(sub)
    args = parser.parse_args(argv)
    return int(args.func(args))


@pytest.fixture()
def setup(tmp_path: Path) -> tuple[Path, list[Path]]:
    config = tmp_path / "base" / "config.json"
    config.parent.mkdir()
    config.write_text(json.dumps(LLAMA))
    dirs = []
    for i, (rank, rslora) in enumerate([(4, False), (2, True)]):
        model = _base_model(str(config), "causal_lm", None, 2)
        pk.apply(model, pk.LoRA(target_modules=["q_proj", "v_proj"], rank=rank, alpha=4, use_rslora=rslora))
        g = torch.Generator().manual_seed(i)
        for _, layer in adapter_layers(model):
            for p in layer.adapter_parameters("default"):
                p.data.copy_(torch.randn(p.shape, generator=g))
        pk.save_adapter(model, tmp_path / f"ad{i}")
        dirs.append(tmp_path / f"ad{i}")
    return config, dirs


def _deltas(config: Path, directory: Path) -> dict[str, torch.Tensor]:
    model = _base_model(str(config), "causal_lm", None, 2)
    pk.load_adapter(model, directory)
    return {q: layer.delta_weight("default").detach() for q, layer in adapter_layers(model)}


def test_combine_cat_writes_exact_sum(
    setup: tuple[Path, list[Path]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config, (a, b) = setup
    out = tmp_path / "mix"
    argv = ["combine", str(a), str(b), "--weights", "0.7", "0.3", "--method", "cat", "--model", str(config)]
    assert _run([*argv, "--out", str(out)]) == 0
    assert "rank [6]" in capsys.readouterr().out
    da, db, mix = _deltas(config, a), _deltas(config, b), _deltas(config, out)
    for q in mix:
        torch.testing.assert_close(mix[q], 0.7 * da[q] + 0.3 * db[q], rtol=0, atol=1e-6)


def test_combine_ties_svd(setup: tuple[Path, list[Path]], tmp_path: Path) -> None:
    config, (a, b) = setup
    out = tmp_path / "ties"
    argv = ["combine", str(a), str(b), "--weights", "1", "1", "--method", "ties_svd", "--density", "0.5"]
    assert _run([*argv, "--rank", "3", "--model", str(config), "--out", str(out)]) == 0
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 3


def test_combine_bad_input_writes_nothing(setup: tuple[Path, list[Path]], tmp_path: Path) -> None:
    config, (a, b) = setup
    out = tmp_path / "bad"
    with pytest.raises(ConfigError, match="got 3 weights for 2 adapters"):
        _run(["combine", str(a), str(b), "--weights", "1", "1", "1", "--model", str(config), "--out", str(out)])
    with pytest.raises(ConfigError, match=r"--density 1.5 is outside"):
        _run(
            [
                "combine",
                str(a),
                str(b),
                "--method",
                "ties",
                "--density",
                "1.5",
                "--model",
                str(config),
                "--out",
                str(out),
            ]
        )
    data = json.loads((b / "adapter_config.json").read_text())
    data["base_model_name_or_path"], other = "org/other", tmp_path / "other"
    other.mkdir()
    (other / "adapter_config.json").write_text(json.dumps({**data}))
    (other / "adapter_model.safetensors").write_bytes((b / "adapter_model.safetensors").read_bytes())
    a_data = json.loads((a / "adapter_config.json").read_text())
    (a / "adapter_config.json").write_text(json.dumps({**a_data, "base_model_name_or_path": "org/base"}))
    with pytest.raises(ConfigError, match="different base models"):
        _run(["combine", str(a), str(other), "--model", str(config), "--out", str(out)])
    assert not out.exists()


def test_prune_energy(setup: tuple[Path, list[Path]], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config, (a, _) = setup
    out = tmp_path / "pruned"
    assert _run(["prune", str(a), "--energy", "0.8", "--model", str(config), "--out", str(out)]) == 0
    assert "output drift" in capsys.readouterr().out
    before, after = _deltas(config, a), _deltas(config, out)
    for q in before:
        assert float(after[q].norm() ** 2) >= 0.8 * float(before[q].norm() ** 2) - 1e-6
        assert torch.linalg.matrix_rank(after[q]) < 4


def test_out_that_is_a_file_is_a_clear_error(setup, tmp_path, capsys):
    from peftkit.cli.main import main

    config, dirs = setup
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    for argv in (["combine", *map(str, dirs)], ["prune", str(dirs[0])]):
        assert main([*argv, "--model", str(config), "--out", str(afile)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"peftkit {argv[0]}: error: --out {str(afile)!r} is an existing file")
    assert afile.read_text() == "keep me"


@pytest.mark.parametrize("model", ["missing", "empty-dir", "notes.txt"])
def test_a_bad_model_is_named_as_the_model_argument(model, setup, tmp_path, capsys):
    from peftkit.cli.main import main

    _, dirs = setup
    (tmp_path / "empty-dir").mkdir()
    (tmp_path / "notes.txt").write_text("not a model")
    path, out = str(tmp_path / model), tmp_path / "out"
    problem = "has neither weights nor config.json" if model == "empty-dir" else \
        "is not a local model directory or config.json"
    for argv in (["combine", *map(str, dirs)], ["prune", str(dirs[0])]):
        assert main([*argv, "--model", path, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"peftkit {argv[0]}: error: --model {path!r} {problem}; pass ")
        assert "checkpoint." not in err
    assert not out.exists()


@pytest.mark.parametrize("kind", ["dora", "modules_to_save"])
def test_combine_measures_dora_and_saved_modules_from_the_real_base_weights(kind: str, tmp_path: Path) -> None:
    """Their combination depends on the base weights: a config.json (random weights) is refused before anything is
    written, a directory with the weights gives copy = base + Σ wᵢ·(copyᵢ − base) from the real base."""
    config = tmp_path / "config" / "config.json"
    config.parent.mkdir()
    config.write_text(json.dumps(LLAMA))
    weights_dir = tmp_path / "weights"
    base = _base_model(str(config), "causal_lm", None, 2)
    with torch.no_grad():  # a base unlike the one config.json builds
        for p in base.parameters():
            p.add_(torch.randn_like(p))
    base.save_pretrained(weights_dir)
    method = pk.DoRA(target_modules=["q_proj"], rank=2) if kind == "dora" else pk.LoRA(
        target_modules=["q_proj"], rank=2, modules_to_save=["model.norm"])
    dirs = []
    for i in range(2):
        model = pk.apply(_base_model(str(weights_dir), "causal_lm", None, 2), method)
        g = torch.Generator().manual_seed(i)
        for p in (p for p in model.parameters() if p.requires_grad):
            p.data.add_(torch.randn(p.shape, generator=g))
        pk.save_adapter(model, tmp_path / f"ad{i}")
        dirs.append(str(tmp_path / f"ad{i}"))
    out = tmp_path / "mix"
    argv = ["combine", *dirs, "--weights", "1", "1", "--out", str(out), "--model"]
    with pytest.raises(ConfigError, match=r"holds no weights \(a config.json builds random ones\); pass the model dir"):
        _run([*argv, str(config)])
    assert not out.exists()
    assert _run([*argv, str(weights_dir)]) == 0

    def state(directory: str | Path) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(str(Path(directory) / "adapter_model.safetensors"))

    ours, first, second = state(out), state(dirs[0]), state(dirs[1])
    key = next(k for k in ours if ("magnitude" in k if kind == "dora" else "norm" in k))
    original = dict(base.named_parameters())["model.norm.weight" if kind != "dora" else
                                             "model.layers.0.self_attn.q_proj.weight"].detach()
    reference = original if kind != "dora" else original.norm(dim=1)
    torch.testing.assert_close(ours[key], first[key] + second[key] - reference)


@pytest.mark.parametrize("where", ["itself", "inside", "parent"])
def test_out_overlapping_an_input_adapter_is_refused_before_loading(where, setup, tmp_path, capsys):
    from peftkit.cli.main import main

    config, dirs = setup
    adapter = dirs[0]
    out = {"itself": adapter, "inside": adapter / "pruned", "parent": tmp_path}[where]
    before = {p: p.read_bytes() for p in adapter.iterdir()}
    missing = str(tmp_path / "no-such-model")  # never loaded: the --out check comes first
    for argv in (["prune", str(adapter)], ["combine", str(adapter), str(dirs[1])]):
        assert main([*argv, "--model", missing, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err == (f"peftkit {argv[0]}: error: --out {str(out)!r} overlaps the input adapter directory "
                       f"{str(adapter)!r} (is it, holds it or lies inside it) and would overwrite it; choose another "
                       "--out\n")
    assert {p: p.read_bytes() for p in adapter.iterdir()} == before
    assert not (adapter / "pruned").exists()


@pytest.mark.parametrize(("argv", "message"), [
    (["prune", "--rank", "0"], "--rank 0 must be a positive integer"),
    (["prune", "--energy", "1.5"], "--energy 1.5 is outside (0, 1]: the fraction of squared norm to keep, e.g. 0.99"),
    (["prune", "--method", "magnitude", "--rank", "2"], "--rank 2 applies to --method 'rank', not 'magnitude'"),
    (["prune", "--sparsity", "0.5"], "--sparsity 0.5 applies to --method 'magnitude', not 'rank'"),
    (["prune", "--method", "magnitude", "--sparsity", "1"],
     "--sparsity 1.0 is outside [0, 1): the fraction of entries zeroed, e.g. 0.5"),
    (["combine", "--method", "ties"], "--method 'ties' needs --density (fraction of entries kept, in (0, 1])"),
    (["combine", "--method", "ties", "--density", "2"], "--density 2.0 is outside (0, 1]: it is the fraction of "
     "entries kept, e.g. --density 0.5 keeps half (1.0 keeps all)"),
    (["combine", "--density", "0.5"],
     "--density 0.5 is not used by --method 'cat'; drop it or use ties/dare/magnitude_prune"),
    (["combine", "--method", "svd", "--rank", "0"],
     "--rank 0 must be a positive integer, and is used only by the *svd methods"),
    (["combine", "--weights", "nan", "1"], "--weights nan is not a finite number; pass finite weights"),
])
def test_numeric_options_are_checked_before_the_model_loads_and_named_as_options(argv, message, setup, tmp_path,
                                                                                   capsys):
    from peftkit.cli.main import main

    _, dirs = setup
    adapters = [str(dirs[0])] if argv[0] == "prune" else [str(d) for d in dirs]
    out = tmp_path / "out"
    missing = str(tmp_path / "no-such-model")  # a model that would fail to load: the options are checked first
    assert main([argv[0], *adapters, *argv[1:], "--model", missing, "--out", str(out)]) == 2
    assert capsys.readouterr().err == f"peftkit {argv[0]}: error: {message}\n"
    assert not out.exists()


def test_convert_rewrites_a_fused_adapter_canonical_and_back_with_the_same_outputs(tmp_path: Path) -> None:
    """Phi-3's fused qkv_proj: performant LoRA (one A and B over q, k, v) → canonical (an A and B per part) → back."""
    config = tmp_path / "phi3" / "config.json"
    config.parent.mkdir()
    config.write_text(json.dumps({"model_type": "phi3", "vocab_size": 64, "hidden_size": 16, "intermediate_size": 32,
                                  "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
                                  "pad_token_id": 0}))
    model = _base_model(str(config), "causal_lm", None, 2)
    pk.apply(model, pk.LoRA(target_modules=["linear_qkv"], rank=2, alpha=4, init_B="gaussian"))
    pk.save_adapter(model, tmp_path / "performant")
    ids = torch.arange(1, 9)[None]

    def logits(directory: Path) -> torch.Tensor:
        adapted = pk.load_adapter(_base_model(str(config), "causal_lm", None, 2), directory).eval()
        with torch.no_grad():
            return adapted(input_ids=ids).logits

    def peft_type(directory: Path) -> str:
        return str(json.loads((directory / "adapter_config.json").read_text())["peft_type"])

    common = ["--model", str(config)]
    assert _run(["convert", str(tmp_path / "performant"), "--to", "canonical", *common,
                 "--out", str(tmp_path / "canonical")]) == 0
    assert peft_type(tmp_path / "canonical") == "CANONICAL_LORA"
    torch.testing.assert_close(logits(tmp_path / "canonical"), logits(tmp_path / "performant"), rtol=0, atol=1e-6)
    assert _run(["convert", str(tmp_path / "canonical"), "--to", "performant", *common,
                 "--out", str(tmp_path / "back")]) == 0
    assert peft_type(tmp_path / "back") == "LORA"
    torch.testing.assert_close(logits(tmp_path / "back"), logits(tmp_path / "performant"), rtol=0, atol=1e-6)


def test_convert_refuses_other_methods_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from peftkit.cli.main import main

    config = tmp_path / "base" / "config.json"
    config.parent.mkdir()
    config.write_text(json.dumps(LLAMA))
    model = _base_model(str(config), "causal_lm", None, 2)
    pk.apply(model, pk.IA3(target_modules=["v_proj", "down_proj"], feedforward_modules=["down_proj"]))
    pk.save_adapter(model, tmp_path / "ia3")
    argv = ["convert", str(tmp_path / "ia3"), "--to", "canonical", "--model", str(config), "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "convert reads LoRA adapters" in err and "peft_type 'IA3'" in err
    assert not (tmp_path / "o").exists()
