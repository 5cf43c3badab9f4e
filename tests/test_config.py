"""Config loading: schema defaults, example files, overrides, aliases, interpolation and one-line errors."""
import dataclasses
import glob
import os
import re

import pytest
from omegaconf import OmegaConf

import losses
import train
import utils
import config
from config import load_config
from conftest import ROOT, assert_one_line_error, run_cli

EXAMPLES = sorted(glob.glob(os.path.join(ROOT, "example", "*.yml")))


def test_examples_exist():
    names = {os.path.basename(p) for p in EXAMPLES}
    assert {"pythia28-sft.yml", "pythia28-dpo.yml", "qwen2.5-sft.yml", "qwen2.5-dpo.yml", "tiny-sft.yml",
            "tiny-dpo.yml", "full-config.yml"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=os.path.basename)
def test_every_example_loads(path):
    overrides = ["model.name_or_path=some/model"] if path.endswith("full-config.yml") else []
    raw = OmegaConf.load(path)
    if any(entry.get("model") and not os.path.isdir(entry.model) for entry in raw.get("rewards", [])):
        # the reward model that an RLHF example's first step trains (tiny-reward-model.yml, qwen2.5-rm-hh.yml)
        overrides += ["rewards=[{function: math}]", "critic.name_or_path=null"]
    cfg = load_config(path, overrides)
    assert cfg.loss.name in losses.LOSSES
    assert "${" not in cfg.output_dirs  # interpolation resolved
    assert cfg.output_dirs.endswith(cfg.exp_name)


def _schema_defaults():
    return OmegaConf.to_container(OmegaConf.structured(config.Config))


def test_full_config_lists_every_key_with_its_default_and_a_comment():
    path = os.path.join(ROOT, "example", "full-config.yml")
    documented = OmegaConf.to_container(OmegaConf.load(path))  # OmegaConf's YAML reads 5e-07 as a float
    defaults = _schema_defaults()
    documented_datasets = documented.pop("datasets")
    defaults.pop("datasets")
    assert [set(d) for d in documented_datasets] == [{f.name for f in dataclasses.fields(config.DatasetConfig)}]
    assert documented == defaults  # same keys, same defaults, nested ones included
    for line in open(path):
        if re.match(r"^\s*(- )?\w+: \S", line):
            assert "#" in line, f"no comment on: {line!r}"


def test_overrides_alias_and_interpolation():
    cfg = load_config(os.path.join(ROOT, "example", "tiny-dpo.yml"),
                            ["lr=2e-5", "batch_size=32", "exp_name=abc", "model.policy_dtype=bfloat16",
                             "datasets=[{type: custom_dataset, path: x.json}, {type: huggingface_dataset, name: hh}]"])
    assert cfg.lr == 2e-5 and cfg.total_batch_size == 32       # batch_size is an alias; overrides beat the file
    assert cfg.output_dirs == "./outputs/abc"                   # ${exp_name} resolved after the override
    assert cfg.model.policy_dtype == "bfloat16"
    assert [d.path for d in cfg.datasets] == ["x.json", None] and cfg.datasets[1].split == "train"


def test_null_epochs_with_n_examples():
    cfg = load_config(os.path.join(ROOT, "example", "tiny-dpo.yml"), ["n_epochs=null", "n_examples=40"])
    assert cfg.n_epochs is None and cfg.n_examples == 40


@pytest.mark.parametrize("override, needles", [
    ("lrr=1e-5", ["unknown key 'lrr'", "did you mean 'lr'"]),
    ("learning_rate=1e-5", ["unknown key 'learning_rate'", "did you mean 'lr'"]),  # was: print_log_step
    ("num_train_epochs=3", ["unknown key 'num_train_epochs'", "did you mean 'n_epochs'"]),
    ("per_device_train_batch_size=8", ["did you mean 'total_batch_size'"]),
    ("max_seq_length=512", ["did you mean 'max_length'"]),
    ("model_name_or_path=x", ["did you mean 'model.name_or_path'"]),
    ("epochs=2", ["did you mean 'n_epochs'"]),
    ("model.polcy_dtype=float16", ["'model.polcy_dtype'", "did you mean 'policy_dtype'"]),
    ("loss.name=dpoo", ["loss.name", "sft, dft, dpo, robust, ipo", "did you mean 'dpo'"]),
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


def test_max_prompt_length_defaults_to_half_of_max_length(tmp_path):
    path = tmp_path / "short.yml"  # the seed's complaint: `max_length: 256` alone was refused
    path.write_text(open(os.path.join(ROOT, "example", "tiny-dpo.yml")).read().replace("max_prompt_length: 96\n", "")
                    .replace("max_length: 128", "max_length: 256"))
    assert "max_prompt_length" not in path.read_text()
    cfg = load_config(str(path))
    assert cfg.max_prompt_length == 128 and isinstance(cfg.max_prompt_length, int)  # resolved: readers see an int
    assert load_config(str(path), ["max_length=101"]).max_prompt_length == 50
    assert load_config(str(path), ["max_prompt_length=200"]).max_prompt_length == 200
    with pytest.raises(utils.UserError, match=r"max_prompt_length \(256\) must be < max_length \(256\)"):
        load_config(str(path), ["max_prompt_length=256"])  # only an explicit contradiction is an error


def numeric_fields(schema=config.Config, prefix=""):
    """(dotted key, dataclass field) of every int/float field of the schema, nested configs included."""
    for f in dataclasses.fields(schema):
        sub = config._nested_schema(f.type)
        if sub is not None and getattr(f.type, "__origin__", None) is not list:  # nested, or Optional (model.lora)
            yield from numeric_fields(sub, f"{prefix}{f.name}.")
        elif sub is not None:  # a list of configs (datasets, rewards): checked on its first item
            yield from numeric_fields(sub, f"{prefix}{f.name}[0].")
        elif {a for a in getattr(f.type, "__args__", (f.type,)) if a is not type(None)} & {int, float}:
            yield prefix + f.name, f


def out_of_range(bounds):
    op, bound = next(iter(bounds.items()))
    return {"ge": bound - 1, "gt": bound, "le": bound + 1, "lt": bound}[op]


NUMERIC = list(numeric_fields())


def test_every_numeric_field_declares_its_range():
    assert len(NUMERIC) >= 25 and {"lr", "n_epochs", "loss.beta", "fsdp.world_size", "sample_top_p"} <= dict(NUMERIC).keys()
    missing = [key for key, f in NUMERIC if not f.metadata.get("range")]
    assert not missing, f"numeric fields without a range (declare one with config.num): {missing}"


@pytest.mark.parametrize("key", [key for key, _ in NUMERIC])
def test_every_numeric_field_is_range_checked(key, tmp_path, capsys):
    bad = out_of_range(dict(NUMERIC)[key].metadata["range"])
    setting = f"{key}={bad}"
    if "[0]." in key:  # a field of a list's item (rewards[0].weight): the list with one such item
        name, item_key = key.split("[0].")
        setting = f"{name}=[{{function: math, {item_key}: {bad}}}]"
    code = train.cli([os.path.join(ROOT, "example", "tiny-dpo.yml"), "--overrides", setting,
                      f"output_dirs={tmp_path}/run"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith(f"error: config: {key} must be "), err
    assert err[0].endswith(f", got {bad}") or err[0].endswith(f", got {float(bad)}"), err
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize("overrides, message", [
    (["n_epochs=0"], "n_epochs must be >= 1 (or null), got 0"),
    (["n_epochs=-1"], "n_epochs must be >= 1 (or null), got -1"),
    (["n_epochs=null", "n_examples=0"], "n_examples must be >= 1 (or null), got 0"),
    (["warmup_steps=-5"], "warmup_steps must be >= 0, got -5"),
    (["n_eval_examples=-3"], "n_eval_examples must be >= 0, got -3"),
    (["save_model_step=0"], "save_model_step must be >= 1 (or null), got 0"),
    (["save_model_step=-1"], "save_model_step must be >= 1 (or null), got -1"),
    (["lr=-1"], "lr must be > 0, got -1.0"),
    (["lr=.inf"], "lr must be finite and > 0, got inf"),
    (["lr=.nan"], "lr must be finite and > 0, got nan"),
    (["loss.beta=-1"], "loss.beta must be >= 0 (or null), got -1.0"),
    (["loss.beta=0"], "loss.beta must be > 0 for loss.name=dpo, got 0.0"),
    (["loss.label_smoothing=1"], "loss.label_smoothing must be >= 0 and < 1 (or null), got 1.0"),
    (["loss.label_smoothing=-0.1"], "loss.label_smoothing must be >= 0 and < 1 (or null), got -0.1"),
    # narrower for some losses: their own ranges in the loss table (losses.LOSSES)
    (["loss.label_smoothing=0.5"], "loss.label_smoothing must be >= 0 and < 0.5 for loss.name=dpo, got 0.5"),
    (["loss.name=robust", "loss.label_smoothing=0.5"],
     "loss.label_smoothing must be >= 0 and < 0.5 for loss.name=robust, got 0.5"),
    (["loss.name=exo_pair", "loss.label_smoothing=0"],
     "loss.label_smoothing must be > 0 and < 1 for loss.name=exo_pair, got 0.0"),
    (["loss.name=simpo", "loss.label_smoothing=0.7"],
     "loss.label_smoothing must be >= 0 and < 0.5 for loss.name=simpo, got 0.7"),
    (["sample_during_eval=true", "max_new_tokens=0"], "max_new_tokens must be >= 1, got 0"),
    (["max_grad_norm=-1"], "max_grad_norm must be >= 0, got -1.0"),
    (["weight_decay=-0.1"], "weight_decay must be >= 0, got -0.1"),
    (["eval_every_steps=0"], "eval_every_steps must be >= 1, got 0"),
    (["print_log_step=0"], "print_log_step must be >= 1, got 0"),
    (["fsdp.world_size=0"], "fsdp.world_size must be >= 1, got 0"),
    (["sample_temperature=-1"], "sample_temperature must be >= 0, got -1.0"),
    (["sample_top_p=1.5"], "sample_top_p must be > 0 and <= 1, got 1.5"),
    (["seed=-1"], "seed must be >= 0 and < 4294967296, got -1"),
])
def test_out_of_range_values_are_refused(overrides, message):
    with pytest.raises(utils.UserError) as e:
        load_config(os.path.join(ROOT, "example", "tiny-dpo.yml"), overrides)
    assert str(e.value) == f"config: {message}"


def test_boundary_values_are_accepted():
    cfg = load_config(os.path.join(ROOT, "example", "tiny-dpo.yml"),
                            ["warmup_steps=0", "n_eval_examples=0", "max_grad_norm=0", "sample_temperature=0",
                             "sample_top_p=1", "loss.label_smoothing=0.49", "n_epochs=null", "n_examples=1"])
    assert cfg.sample_top_p == 1 and cfg.sample_temperature == 0 and cfg.n_examples == 1
    cfg = load_config(os.path.join(ROOT, "example", "tiny-dpo.yml"), ["loss.name=exo_pair",
                                                                          "loss.label_smoothing=0.9"])
    assert cfg.loss.label_smoothing == 0.9  # EXO's eps may pass 0.5, unlike a flip probability


def test_long_choice_lists_are_capped():
    line = config.choices("lama", [f"type{i}" for i in range(500)] + ["llama"], limit=8)
    assert "did you mean 'llama'" in line and "... 493 more" in line and len(line) < 200


def test_config_loads_without_torch():
    """`python train.py bad.yml` fails in about a second: the config is loaded and checked before torch (and
    transformers) are imported. Checked on what is imported, not on time."""
    code = ("import sys, utils\nfrom config import load_config\n"
            "try:\n    load_config('example/tiny-dpo.yml', ['lrr=1'])\nexcept utils.UserError as e:\n    print(e)\n"
            "print(sorted(m for m in ('torch', 'transformers', 'datasets') if m in sys.modules))")
    proc = run_cli("-c", code, timeout=60)
    assert proc.stdout.splitlines() == ["config: unknown key 'lrr' (did you mean 'lr'?)", "[]"], proc.stderr
    proc = run_cli("-X", "importtime", "train.py", "example/tiny-dpo.yml", "--overrides", "n_epochs=0", timeout=60)
    assert proc.returncode == 2 and "error: config: n_epochs must be >= 1" in proc.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time")}
    assert "omegaconf" in imported and not imported & {"torch", "transformers"}


@pytest.mark.parametrize("argv", [
    ["CFG", "--overrides", "lrr=1"],
    ["--overrides", "lrr=1", "CFG"],
    ["--overrides", "lr=1e-5", "--traceback", "CFG", "--overrides", "lrr=1"],
])
def test_overrides_before_or_after_the_config_file(argv, capsys):
    path = os.path.join(ROOT, "example", "tiny-dpo.yml")
    argv = [path if a == "CFG" else a for a in argv]
    args = train.parse_args(argv)
    assert args.config == path and args.overrides[-1] == "lrr=1"
    with pytest.raises(utils.UserError, match="unknown key 'lrr'"):
        load_config(args.config, args.overrides)
    if "--traceback" not in argv:
        assert train.cli(argv) == 2 and "unknown key 'lrr'" in capsys.readouterr().err


def test_overrides_first_through_the_real_entry_point():
    proc = run_cli("train.py", "--overrides", "lrr=1", "example/tiny-dpo.yml", timeout=60)
    assert_one_line_error(proc, "unknown key 'lrr'", "did you mean 'lr'")


def test_loss_names_for_the_check_before_torch_are_the_tables():
    import losses
    assert config.LOSS_NAMES == tuple(losses.LOSSES)


@pytest.mark.parametrize("overrides, needle", [
    (["loss.name=dpoo"], "loss.name='dpoo' is not one of"),
    (["trainer=FSDPTrainer", "fsdp.world_size=3", "device=cpu"], "is not divisible by gradient_accumulation_steps=1 x world size 3"),
    (["output_dirs=RUN"], "already holds a run"),
])
def test_mistakes_that_need_no_model_are_found_before_torch(overrides, needle, tmp_path):
    """An unknown loss, an FSDP batch split that does not divide, a run folder that holds a run: reported by the
    first check, before torch and transformers are imported."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("seed: 0\n")
    overrides = [o.replace("RUN", str(tmp_path / "run")) for o in overrides]
    proc = run_cli("-X", "importtime", "train.py", "example/tiny-dpo.yml", "--overrides", *overrides, timeout=60)
    assert proc.returncode == 2 and needle in proc.stderr, proc.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time")}
    assert "omegaconf" in imported and not imported & {"torch", "transformers"}
