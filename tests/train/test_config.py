"""Config loading, overrides and every validation error."""

from __future__ import annotations

import pytest

from peftkit.errors import ConfigError
from peftkit.train.config import TrainConfig, apply_overrides, config_from_dict, dump_config, load_config
from peftkit.train.tasks import peft_config

BASE = {"checkpoint": {"pretrained": {"config": {"model_type": "llama"}}}}


def test_yaml_with_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("checkpoint:\n  pretrained: some/dir\npeft:\n  method: lora\n  rank: 8\ntrain:\n  max_steps: 3\n")
    cfg = load_config(path, ["train.max_steps=7", "peft.target_modules=[q, v]", "optimizer.lr=0.01", "data.eval=null"])
    assert cfg.train.max_steps == 7
    assert cfg.peft.method == "lora" and cfg.peft.options == {"rank": 8, "target_modules": ["q", "v"]}
    assert cfg.optimizer.lr == 0.01 and cfg.data.eval is None
    dump_config(cfg, tmp_path / "out.yaml")
    again = load_config(tmp_path / "out.yaml")
    assert again == cfg


def test_int_accepted_for_float_and_types_kept():
    cfg = config_from_dict({**BASE, "optimizer": {"lr": 1}, "train": {"epochs": 2}})
    assert isinstance(cfg.optimizer.lr, float) and cfg.optimizer.lr == 1.0


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({}, "checkpoint.pretrained is required"),
        ({"checkpoint": {}}, "checkpoint.pretrained=None"),
        ({"checkpoint": {"pretrained": {"config": {}}}}, "model_type"),
        ({**BASE, "bogus": {}}, "unknown config section 'bogus'; allowed: checkpoint, model"),
        ({**BASE, "train": {"batchsize": 2}}, "unknown field train.batchsize (did you mean train.batch_size?); "
         "allowed: max_steps"),
        ({**BASE, "train": {"max_steps": None}}, "train.max_steps=None is invalid; allowed: an integer (the field is "
         "not optional); to use its default, 0, remove the field or override it with ~train.max_steps"),
        ({**BASE, "train": {"batch_size": 0}}, "train.batch_size=0 is invalid; allowed: an integer > 0"),
        ({**BASE, "train": {"batch_size": "8"}}, "train.batch_size='8' is invalid; allowed: an integer"),
        ({**BASE, "train": {"batch_size": True}}, "train.batch_size=True"),
        ({**BASE, "train": {"precision": "fp8"}}, "train.precision='fp8' is invalid; allowed: fp32, bf16"),
        ({**BASE, "train": {"grad_accum": 0}}, "train.grad_accum=0"),
        ({**BASE, "train": {"max_steps": 0, "epochs": 0}}, "train.epochs=0.0"),
        ({**BASE, "train": {"max_grad_norm": -1}}, "train.max_grad_norm=-1"),
        ({**BASE, "model": {"task": "vision"}}, "model.task='vision' is invalid; allowed: causal_lm, seq2seq, "),
        ({**BASE, "model": {"dtype": "int4"}}, "model.dtype='int4'"),
        ({**BASE, "model": {"num_labels": -1}}, "model.num_labels=-1"),
        ({**BASE, "peft": {"method": "lorax"}}, "peft.method='lorax' is invalid; allowed: none, lora"),
        ({**BASE, "peft": {"method": "lorra"}}, "p_tuning, cpt, trainable_tokens (did you mean 'lora'?)"),
        ({**BASE, "data": {"format": "xml"}}, "data.format='xml' is invalid; allowed: auto, text"),
        ({**BASE, "data": {"max_length": 0}}, "data.max_length=0"),
        ({**BASE, "data": {"eval_fraction": 1.5}}, "data.eval_fraction=1.5"),
        ({**BASE, "data": {"limit": -3}}, "data.limit=-3"),
        ({**BASE, "data": {"labels": "a,b"}}, "data.labels='a,b'"),
        ({**BASE, "optimizer": {"name": "sgd"}}, "optimizer.name='sgd' is invalid; allowed: adamw, galore"),
        ({**BASE, "optimizer": {"lr": 0}}, "optimizer.lr=0.0"),
        ({**BASE, "optimizer": {"weight_decay": -1}}, "optimizer.weight_decay=-1.0"),
        ({**BASE, "optimizer": {"betas": [0.9]}}, "optimizer.betas=[0.9]"),
        ({**BASE, "optimizer": {"loraplus_ratio": -2}}, "optimizer.loraplus_ratio=-2.0"),
        ({**BASE, "optimizer": {"galore_rank": 0}}, "optimizer.galore_rank=0"),
        ({**BASE, "optimizer": {"galore_update_interval": 0}}, "optimizer.galore_update_interval=0"),
        ({**BASE, "optimizer": {"lisa_layers": -1}}, "optimizer.lisa_layers=-1"),
        ({**BASE, "optimizer": {"lisa_interval": 0}}, "optimizer.lisa_interval=0"),
        (
            {**BASE, "scheduler": {"name": "step"}},
            "scheduler.name='step' is invalid; allowed: cosine, linear, constant",
        ),
        ({**BASE, "scheduler": {"warmup_steps": -1}}, "scheduler.warmup_steps=-1"),
        ({**BASE, "scheduler": {"warmup_ratio": 1.0}}, "scheduler.warmup_ratio=1.0"),
        ({**BASE, "scheduler": {"min_lr_ratio": 2}}, "scheduler.min_lr_ratio=2.0"),
        ({"checkpoint": {"pretrained": "x", "save_interval": -1}}, "checkpoint.save_interval=-1"),
        ({"checkpoint": {"pretrained": "x", "keep_last": -1}}, "checkpoint.keep_last=-1"),
        ({**BASE, "logging": {"log_interval": 0}}, "logging.log_interval=0"),
        (
            {**BASE, "logging": {"tensorboard": "maybe"}},
            "logging.tensorboard='maybe' is invalid; allowed: auto, true, false",
        ),
        ({**BASE, "eval": {"interval": -1}}, "eval.interval=-1"),
        ({**BASE, "eval": {"batch_size": 0}}, "eval.batch_size=0"),
        ({**BASE, "eval": {"max_batches": -1}}, "eval.max_batches=-1"),
        ({**BASE, "train": [1, 2]}, "train=[1, 2] is invalid; allowed: a mapping of fields"),
    ],
)
def test_validation_errors_name_field_value_and_allowed(data, needle):
    with pytest.raises(ConfigError) as info:
        config_from_dict(data)
    assert needle in str(info.value)
    assert isinstance(info.value, ValueError)


def test_bool_for_tensorboard_literal_is_accepted():
    assert config_from_dict({**BASE, "logging": {"tensorboard": False}}).logging.tensorboard == "false"


@pytest.mark.parametrize("bad", ["train.max_steps", "max_steps=3", ".x=1", "train.=1"])
def test_bad_override_syntax(bad):
    with pytest.raises(ConfigError, match="write section.field=value"):
        apply_overrides({}, [bad])


YAML_RUN = """\
checkpoint:
  pretrained: {config: {model_type: llama, num_hidden_layers: 2}}
peft: {method: lora, rank: 8, target_modules: [q_proj]}
train: {max_steps: 100, batch_size: 2}
data: {eval: held_out.jsonl}
"""


def test_a_removed_field_takes_its_default_and_null_sets_an_optional_one_to_none(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(YAML_RUN)
    cfg = load_config(path, ["~train.max_steps", "~peft.target_modules", "data.eval=null", "~eval",
                             "~checkpoint.pretrained.config.num_hidden_layers", "~scheduler.warmup_steps"])
    assert cfg.train.max_steps == TrainConfig().max_steps and cfg.train.batch_size == 2
    assert cfg.peft.options == {"rank": 8} and cfg.data.eval is None
    assert cfg.checkpoint.pretrained == {"config": {"model_type": "llama"}}
    # applied in order: a field set again after its removal keeps the new value, and the reverse
    assert load_config(path, ["~train.max_steps", "train.max_steps=5"]).train.max_steps == 5
    assert load_config(path, ["train.max_steps=5", "~train.max_steps"]).train.max_steps == TrainConfig().max_steps
    assert load_config(path, ["~peft"]).peft.options == {}
    # a field the new method lacks, set in the file, can be removed after changing the method
    assert load_config(path, ["peft.method=ia3", "~peft.rank"]).peft.options == {"target_modules": ["q_proj"]}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("~train.max_step", "unknown field train.max_step (did you mean train.max_steps?); allowed: max_steps, epochs"),
        ("~peft.rnak", "unknown field peft.rnak (did you mean peft.rank?); allowed: method, target_modules"),
        ("~trian.max_steps", "unknown config section 'trian' in '~trian.max_steps'; allowed: checkpoint, model"),
        ("~checkpoint.pretrained", "'~checkpoint.pretrained' would remove checkpoint.pretrained, which is required and "
         "has no default; override it instead: checkpoint.pretrained=PATH"),
        ("~checkpoint", "'~checkpoint' would remove checkpoint.pretrained, which is required"),
        ("~train.max_steps=3", "override '~train.max_steps=3' is invalid; write ~section.field, without a value"),
        ("~checkpoint.pretrained.config.hidden", "cannot remove checkpoint.pretrained.config.hidden: "
         "checkpoint.pretrained.config has no key 'hidden'; its keys: model_type, num_hidden_layers"),
        ("~peft.target_modules.0", "cannot remove peft.target_modules.0: peft.target_modules is ['q_proj'], not a "
         "mapping"),
    ],
)
def test_removing_what_cannot_be_removed_names_it(tmp_path, override, message):
    path = tmp_path / "run.yaml"
    path.write_text(YAML_RUN)
    with pytest.raises(ConfigError) as info:
        load_config(path, [override])
    assert str(info.value).startswith(message)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match=f"config file {str(tmp_path)!r} is a directory; pass the path of a YAML"):
        load_config(tmp_path)
    latin1 = b"checkpoint:\n  pretrained: caf\xe9\n"
    (tmp_path / "latin1.yaml").write_bytes(latin1)
    with pytest.raises(ConfigError, match=rf"latin1.yaml' is not UTF-8 text \(byte 0xe9 at offset "
                       rf"{latin1.index(0xe9)}\); save it as UTF-8"):
        load_config(tmp_path / "latin1.yaml")
    (tmp_path / "bom.yaml").write_bytes("\ufeffcheckpoint:\n  pretrained: café\n".encode())  # a BOM is fine
    assert load_config(tmp_path / "bom.yaml").checkpoint.pretrained == "café"
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="a YAML mapping"):
        load_config(tmp_path / "list.yaml")


def test_example_configs_parse():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "configs"
    files = sorted(root.glob("*.yaml"))
    for f in files:
        first = f.read_text().splitlines()[0]
        assert first.startswith("# ") and "peftkit" in first, f"{f.name} must open with the command that runs it"
        load_config(f)


def test_the_loading_module_imports_first_too():
    """``config`` re-exports ``config_load``, which imports ``config``: either may be imported first."""
    import subprocess
    import sys

    code = "from peftkit.train.config_load import load_config; from peftkit.train.config import RunConfig"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("init", ["eva", "corda"])
def test_data_driven_inits_are_refused_by_a_run(init):
    cfg = config_from_dict({**BASE, "peft": {"method": "lora", "target_modules": ["q_proj"], "init": init}})
    with pytest.raises(ConfigError, match=rf"peft.init='{init}' is computed from data after the adapter is applied "
                                          rf"\(pk.init_{init} in Python\), which a training run does not do"):
        peft_config(cfg)
    assert peft_config(config_from_dict({**BASE, "peft": {"method": "lora", "init": "pissa"}})).init == "pissa"
