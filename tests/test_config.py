"""Config loading: schema defaults, example files, overrides, aliases, interpolation and one-line errors."""
import dataclasses
import glob
import os
import re

import pytest
from omegaconf import OmegaConf

import train
import utils
from conftest import ROOT, assert_one_line_error, run_cli

EXAMPLES = sorted(glob.glob(os.path.join(ROOT, "example", "*.yml")))


def test_examples_exist():
    names = {os.path.basename(p) for p in EXAMPLES}
    assert {"pythia28-sft.yml", "pythia28-dpo.yml", "qwen2.5-sft.yml", "qwen2.5-dpo.yml", "tiny-sft.yml",
            "tiny-dpo.yml", "full-config.yml"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=os.path.basename)
def test_every_example_loads(path):
    overrides = ["model.name_or_path=some/model"] if path.endswith("full-config.yml") else []
    cfg = utils.load_config(path, overrides)
    assert cfg.loss.name in utils.LOSSES
    assert "${" not in cfg.output_dirs  # interpolation resolved
    assert cfg.output_dirs.endswith(cfg.exp_name)


def _schema_defaults():
    return OmegaConf.to_container(OmegaConf.structured(utils.Config))


def test_full_config_lists_every_key_with_its_default_and_a_comment():
    path = os.path.join(ROOT, "example", "full-config.yml")
    documented = OmegaConf.to_container(OmegaConf.load(path))  # OmegaConf's YAML reads 5e-07 as a float
    defaults = _schema_defaults()
    documented_datasets = documented.pop("datasets")
    defaults.pop("datasets")
    assert [set(d) for d in documented_datasets] == [{f.name for f in dataclasses.fields(utils.DatasetConfig)}]
    assert documented == defaults  # same keys, same defaults, nested ones included
    for line in open(path):
        if re.match(r"^\s*(- )?\w+: \S", line):
            assert "#" in line, f"no comment on: {line!r}"


def test_overrides_alias_and_interpolation():
    cfg = utils.load_config(os.path.join(ROOT, "example", "tiny-dpo.yml"),
                            ["lr=2e-5", "batch_size=32", "exp_name=abc", "model.policy_dtype=bfloat16",
                             "datasets=[{type: custom_dataset, path: x.json}, {type: huggingface_dataset, name: hh}]"])
    assert cfg.lr == 2e-5 and cfg.total_batch_size == 32       # batch_size is an alias; overrides beat the file
    assert cfg.output_dirs == "./outputs/abc"                   # ${exp_name} resolved after the override
    assert cfg.model.policy_dtype == "bfloat16"
    assert [d.path for d in cfg.datasets] == ["x.json", None] and cfg.datasets[1].split == "train"


def test_null_epochs_with_n_examples():
    cfg = utils.load_config(os.path.join(ROOT, "example", "tiny-dpo.yml"), ["n_epochs=null", "n_examples=40"])
    assert cfg.n_epochs is None and cfg.n_examples == 40


@pytest.mark.parametrize("override, needles", [
    ("lrr=1e-5", ["unknown key 'lrr'", "did you mean 'lr'"]),
    ("model.polcy_dtype=float16", ["'model.polcy_dtype'", "did you mean 'policy_dtype'"]),
    ("loss.name=dpoo", ["loss.name", "sft, dpo, ipo", "did you mean 'dpo'"]),
    ("trainer=FSDP", ["trainer", "BasicTrainer, FSDPTrainer"]),
    ("optimizer=adamw", ["optimizer", "did you mean 'AdamW'"]),
    ("model.policy_dtype=fp16", ["model.policy_dtype", "float32, bfloat16, float16", "did you mean 'float16'"]),
    ("lr=fast", ["lr", "fast"]),
    ("n_epochs=[1]", ["n_epochs"]),
    ("gradient_accumulation_steps=3", ["total_batch_size=16", "gradient_accumulation_steps=3"]),
    ("lr_scheduler=cosin", ["lr_scheduler", "did you mean 'cosine'"]),
    ("datasets=[{type: huggingface_dataset, name: hhh}]", ["datasets[0].name", "hh, shp, se"]),
])
def test_bad_config_is_one_line_error(override, needles, tmp_path, capsys):
    """In-process through train.cli (test_broken_yaml_and_missing_file covers the real subprocess)."""
    code = train.cli([os.path.join(ROOT, "example", "tiny-dpo.yml"), "--overrides", override,
                      f"output_dirs={tmp_path}/run"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: config: "), err
    for needle in needles:
        assert needle in err[0], (needle, err[0])
    assert not os.path.exists(tmp_path / "run")


def test_broken_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text("lr: 1e-5\nmodel:\n  name_or_path: [unclosed\n")
    assert_one_line_error(run_cli("train.py", str(bad)), str(bad), "invalid YAML")
    assert_one_line_error(run_cli("train.py", str(tmp_path / "nope.yml")), "nope.yml", "not found")


def test_traceback_switch_shows_traceback(tmp_path):
    proc = run_cli("train.py", "example/tiny-dpo.yml", "--traceback", "--overrides", "lrr=1")
    assert proc.returncode != 0 and "Traceback" in proc.stderr
