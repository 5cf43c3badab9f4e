"""Bad input through the real entry point: one line naming file/record/field (or key), exit 2, run folder untouched."""
import json
import os

import pytest

import train
from conftest import ROOT

CORPUS = os.path.join(ROOT, "tests", "bad_inputs")

# file in tests/bad_inputs -> (loss, words the one-line error must contain besides the file name)
BAD_DATA = {
    "syntax_error.json": ("dpo", ["invalid JSON", "line 3 column 28"]),
    "trailing_comma.json": ("sft", ["invalid JSON", "line 1"]),
    "lines_with_bad_line.jsonl": ("dpo", ["invalid JSON", "line 3"]),
    "missing_chosen.json": ("dpo", ["record 1", "'chosen'", "missing"]),
    "missing_rejected_value.json": ("dpo", ["record 1", "'rejected.value'", "missing"]),
    "unknown_role.json": ("sft", ["record 1", "messages[1].role", "robot", "system, user, assistant"]),
    "unknown_from.json": ("dpo", ["record 1", "conversations[0].from", "alien", "system, human, gpt"]),
    "non_string_content.json": ("sft", ["record 0", "messages[1].content", "string"]),
    "conversations_not_a_list.json": ("dpo", ["record 0", "'conversations'", "list"]),
    "empty_response.json": ("dpo", ["record 2", "'chosen.value'", "empty"]),
    "no_assistant_turn.json": ("sft", ["record 1", "no assistant message"]),
    "prompt_ends_with_assistant.json": ("dpo", ["record 0", "'conversations'", "must end with a user message"]),
    "mixed_formats.json": ("dpo", ["record 1", "one format per file"]),
    "top_level_object.json": ("dpo", ["JSON list"]),
    "empty.json": ("dpo", ["empty"]),
    "unknown_format.json": ("sft", ["record 0", "unrecognized format", "instruction"]),
    "wrong_encoding.json": ("sft", ["utf-8", "position 85"]),
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


@pytest.mark.parametrize("name", sorted(BAD_DATA))
def test_bad_dataset(name, run_dir, capsys):
    loss, needles = BAD_DATA[name]
    path = os.path.join(CORPUS, name)
    config = "example/tiny-sft.yml" if loss == "sft" else "example/tiny-dpo.yml"
    run_and_check(capsys, run_dir, [f"datasets=[{{type: custom_dataset, path: {path}}}]", "n_eval_examples=0"],
                  [path, *needles], config=config)


def test_corpus_is_complete():
    assert sorted(BAD_DATA) == sorted(os.listdir(CORPUS))


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


def test_preference_data_for_sft_is_refused(run_dir, capsys):
    run_and_check(capsys, run_dir, ["datasets=[{type: custom_dataset, path: example/data/dpo_demo.json}]"],
                  ["dpo_demo.json", "loss.name=sft", "data.py convert"], config="example/tiny-sft.yml")


def test_tokenizer_without_eos_or_pad(tmp_path, run_dir, capsys):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(ROOT, "example", "tokenizer"))
    tokenizer.eos_token = tokenizer.pad_token = None
    tokenizer.chat_template = None
    tokenizer.save_pretrained(tmp_path / "tok")
    run_and_check(capsys, run_dir, [f"model.tokenizer_name_or_path={tmp_path / 'tok'}"], ["tokenizer", "eos_token"])


def test_archive_with_wrong_shapes(tmp_path, run_dir, capsys):
    import torch
    bad = tmp_path / "wrong.pt"
    torch.save({"model.embed_tokens.weight": torch.zeros(7, 3)}, bad)
    run_and_check(capsys, run_dir, [f"model.archive={bad}"], [str(bad), "does not match the model"])


def test_huge_record_and_long_prompt_are_truncated_not_fatal(tmp_path):
    """Not errors: a prompt longer than max_length keeps its end, a huge response its start; both are counted."""
    import data
    from transformers import AutoTokenizer
    tokenizer = data.prepare_tokenizer(AutoTokenizer.from_pretrained(os.path.join(ROOT, "example", "tokenizer")))
    pairs = [{"conversations": [{"from": "human", "value": "why? " * 3000}], "chosen": {"from": "gpt", "value": "Yes."},
              "rejected": {"from": "gpt", "value": "no."}},
             {"conversations": [{"from": "human", "value": "Tell me."}], "chosen": {"from": "gpt", "value": "a b " * 200000},
              "rejected": {"from": "gpt", "value": "no."}}]
    path = tmp_path / "long.json"
    path.write_text(json.dumps(pairs))
    train_data, _, stats = data.build_datasets([{"type": "custom_dataset", "path": str(path)}], [], tokenizer,
                                               "preference", 128, 64, 0, 0)
    assert stats["truncated"] == 2 and len(train_data) == 2
    assert all(len(ex["chosen_input_ids"]) <= 128 and len(ex["rejected_input_ids"]) <= 128 for ex in train_data)
