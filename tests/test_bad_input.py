"""Bad input through the real entry point: one line naming file/record/field (or key), exit 2, run folder untouched."""
import json
import os

import pytest

import train
from conftest import ROOT

GOOD_PAIR = {"conversations": [{"from": "human", "value": "Is 3 larger than 2?"}],
             "chosen": {"from": "gpt", "value": "Yes, 3 is larger."}, "rejected": {"from": "gpt", "value": "no."}}

BAD_DATA = {  # name: (file content, loss, words the error must contain)
    "malformed_json": ('[{"conversations": [', "dpo", ["invalid JSON", "line 1"]),
    "missing_chosen": (json.dumps([GOOD_PAIR, {k: v for k, v in GOOD_PAIR.items() if k != "chosen"}]), "dpo",
                       ["record 1", "'chosen'", "missing"]),
    "unknown_role": (json.dumps([{"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}]}]),
                     "sft", ["record 0", "messages[1].role", "robot", "system, user, assistant"]),
    "non_string_content": (json.dumps([{"messages": [{"role": "user", "content": "hi"},
                                                     {"role": "assistant", "content": 5}]}]),
                           "sft", ["record 0", "messages[1].content", "string"]),
    "empty_dataset": ("[]", "dpo", ["empty"]),
    "no_assistant_turn": (json.dumps([{"messages": [{"role": "user", "content": "hi"}]}]), "sft", ["record 0"]),
}


@pytest.fixture
def run_dir(tmp_path):
    """A run folder that already holds a previous run's files: a failing run must leave them exactly as they are."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("exp_name: previous\n")
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n')
    return run


def snapshot(folder):
    return {p: open(os.path.join(folder, p), "rb").read() for p in sorted(os.listdir(folder))}


def run_and_check(capsys, run_dir, overrides, needles, config="example/tiny-dpo.yml"):
    before = snapshot(run_dir)
    # overwrite=true: even a run told to replace the old one must leave it intact when its input is bad
    code = train.cli([os.path.join(ROOT, config), "--overrides", f"output_dirs={run_dir}", "overwrite=true", *overrides])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: "), err
    for needle in needles:
        assert needle in err[0], (needle, err[0])
    assert snapshot(run_dir) == before
    return err[0]


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_bad_dataset(case, tmp_path, run_dir, capsys):
    content, loss, needles = BAD_DATA[case]
    path = tmp_path / f"{case}.json"
    path.write_text(content)
    config = "example/tiny-sft.yml" if loss == "sft" else "example/tiny-dpo.yml"
    run_and_check(capsys, run_dir, [f"datasets=[{{type: custom_dataset, path: {path}}}]", "n_eval_examples=0"],
                  [str(path), *needles], config=config)


def test_missing_data_file(tmp_path, run_dir, capsys):
    missing = tmp_path / "nope.json"
    run_and_check(capsys, run_dir, [f"datasets=[{{type: custom_dataset, path: {missing}}}]"], [str(missing)])


def test_sft_data_for_dpo_is_refused(run_dir, capsys):
    run_and_check(capsys, run_dir, ["datasets=[{type: custom_dataset, path: example/data/sft_demo.json}]"],
                  ["sft_demo.json"])


def test_missing_model_path(tmp_path, run_dir, capsys):
    missing = tmp_path / "no-model"
    run_and_check(capsys, run_dir, [f"model.name_or_path={missing}", "model.from_config=null",
                                    "model.tokenizer_name_or_path=null"], ["model.name_or_path", str(missing)])


def test_folder_without_weights(tmp_path, run_dir, capsys):
    empty = tmp_path / "empty-model"
    empty.mkdir()
    run_and_check(capsys, run_dir, [f"model.name_or_path={empty}", "model.from_config=null",
                                    f"model.tokenizer_name_or_path={ROOT}/example/tokenizer"], ["model.name_or_path"])


def test_too_few_examples_for_eval(run_dir, capsys):
    run_and_check(capsys, run_dir, ["n_eval_examples=100000"], ["n_eval_examples"])


def test_missing_archive(tmp_path, run_dir, capsys):
    run_and_check(capsys, run_dir, [f"model.archive={tmp_path}/x.pt"], ["model.archive", "x.pt"])
