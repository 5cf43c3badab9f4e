"""Tests for the prompt data kind (the online methods): the shapes (TRL, verl, GSM8K, the seed's conversations, SFT
and preference files) detected and normalised with their columns, the one-line errors, tokenization with the
generation prompt and left truncation, build_datasets, `data.py check --loss grpo`, `convert --to prompts`, the demo
prompts and the docs' prompt section."""
import json
import os
import re
import shlex
import shutil
import sys

import pytest
from conftest import ROOT, TOKENIZER, assert_one_line_error, run_cli

import data
import formats
from formats import DataError

FIX = os.path.join(ROOT, "tests", "fixtures")
SYSTEM = {"role": "system", "content": "Answer with a number."}
GSM8K_Q0 = "Tom has 3 boxes of 12 pencils. He gives away 5 pencils. How many pencils does he have left?"
VERL_ROWS = [{"data_source": "openai/gsm8k", "prompt": [{"role": "user", "content": "What is 6 times 7?"}],
              "ability": "math", "reward_model": {"style": "rule", "ground_truth": "42"},
              "extra_info": {"split": "train", "index": 0}},
             {"data_source": "openai/gsm8k", "prompt": [SYSTEM, {"role": "user", "content": "Legs of a spider?"}],
              "ability": "math", "reward_model": {"style": "rule", "ground_truth": "8"},
              "extra_info": {"split": "train", "index": 1}}]


def user(text):
    return {"role": "user", "content": text}


def prompt(msgs, is_text=False, **columns):
    return {"prompt": msgs, "prompt_is_text": is_text, "columns": columns}


def load(path, kind="prompt"):
    return formats.load_examples({"type": "custom_dataset", "path": path}, kind)


def fmt_of(path):
    return next(iter(formats.load_records({"type": "custom_dataset", "path": path}, "prompt")[3].values()))


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) if path.suffix == ".jsonl" else json.dumps(rows))
    return str(path)


def message(fn):
    with pytest.raises(DataError) as e:
        fn()
    assert "\n" not in str(e.value)
    return str(e.value)


@pytest.fixture(scope="module")
def verl_parquet(tmp_path_factory):
    import datasets
    path = str(tmp_path_factory.mktemp("verl") / "prompts_verl.parquet")
    datasets.Dataset.from_list(VERL_ROWS).to_parquet(path)
    return path


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer
    return data.prepare_tokenizer(AutoTokenizer.from_pretrained(TOKENIZER))


# --------------------------------------------------------------------------------------------------------------
# Shapes
# --------------------------------------------------------------------------------------------------------------
def test_trl_prompts_strings_and_messages_keep_their_columns():
    path = os.path.join(FIX, "prompts_trl.jsonl")
    assert fmt_of(path) == "trl_prompt"
    assert load(path) == [prompt([user("What is 6 times 7?")], True, answer="42"),
                          prompt([SYSTEM, user("How many legs has a spider?")], solution="8", level=1),
                          prompt([user("Please write numbers.")])]


def test_gsm8k_question_is_the_prompt_and_answer_a_column():
    path = os.path.join(FIX, "prompts_gsm8k.jsonl")
    assert fmt_of(path) == "gsm8k"
    recs = load(path)
    assert recs[0]["prompt"] == [user(GSM8K_Q0)] and recs[0]["prompt_is_text"] is True
    assert list(recs[0]["columns"]) == ["answer"] and recs[0]["columns"]["answer"].endswith("#### 31")
    assert recs[1]["columns"]["answer"].endswith("#### 1,080")


def test_verl_parquet_flattens_ground_truth_and_keeps_the_rest(verl_parquet):
    assert fmt_of(verl_parquet) == "verl"
    recs = load(verl_parquet)
    assert [r["prompt"] for r in recs] == [VERL_ROWS[0]["prompt"], VERL_ROWS[1]["prompt"]]
    assert recs[1] == prompt(VERL_ROWS[1]["prompt"], ground_truth="8", data_source="openai/gsm8k", ability="math",
                             reward_model={"style": "rule", "ground_truth": "8"},
                             extra_info={"split": "train", "index": 1})


@pytest.mark.parametrize("row, expected", [
    ({"messages": [SYSTEM, user("Hi")], "id": 7}, prompt([SYSTEM, user("Hi")], id=7)),
    ({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."},
                        {"from": "human", "value": "Write words."}]},
     prompt([user("Hi"), {"role": "assistant", "content": "Hello."}, user("Write words.")])),
])
def test_seed_conversations_ending_with_a_user_turn(tmp_path, row, expected):
    assert load(write(tmp_path / "p.jsonl", [row])) == [expected]


def test_sft_files_give_the_turns_before_the_last_assistant_turn():
    msgs = load(os.path.join(FIX, "sft_messages.json"), "sft")[0]["messages"]
    assert [r["prompt"] for r in load(os.path.join(FIX, "sft_messages.json"))] == [msgs[:-1], [user("Name a colour.")]]
    assert load(os.path.join(FIX, "sft_sharegpt.jsonl"))[0] == prompt([{"role": "system", "content": "You are terse."},
                                                                        user("What is 2 + 2?")])


@pytest.mark.parametrize("name", ["dpo_seed.json", "dpo_trl.jsonl"])
def test_preference_files_give_their_prompts(name):
    path = os.path.join(FIX, name)
    pairs, prompts = load(path, "preference"), load(path)
    assert [r["prompt"] for r in prompts] == [p["prompt"] for p in pairs]
    assert all(r["columns"] == {} for r in prompts)  # the responses are not columns
    assert [r["prompt_is_text"] for r in prompts] == ([False, False] if name == "dpo_seed.json" else [True, False])


def test_hub_preference_files_give_one_prompt_per_record():
    hh = load(os.path.join(FIX, "hh_raw.jsonl"))
    apple = {"role": "assistant", "content": "An apple."}
    assert hh[1]["prompt"] == [user("Name a fruit."), apple, user("Another one?")]
    assert len(hh) == 3 and not hh[0]["prompt_is_text"]  # an empty final response does not matter to a prompt
    shp = load(os.path.join(FIX, "shp_raw.jsonl"))
    assert shp[0]["prompt"] == [user("How long should I boil an egg?")] and shp[0]["prompt_is_text"]
    assert shp[0]["columns"]["domain"] == "askculinary_train" and "human_ref_A" not in shp[0]["columns"]
    se = load(os.path.join(FIX, "se_raw.jsonl"))
    assert [r["prompt"] for r in se[:2]] == [[user("How do I reverse a list in Python?")], [user("What is a tuple?")]]
    assert "answers" not in se[0]["columns"] and se[0]["columns"]["qid"] == 1


def test_unpaired_files_give_their_prompts(tmp_path):
    rows = [{"prompt": "Is 7 larger than 5?", "completion": "Yes.", "label": True}]
    assert load(write(tmp_path / "u.jsonl", rows)) == [prompt([user("Is 7 larger than 5?")], True, label=True)]


# --------------------------------------------------------------------------------------------------------------
# Errors: one line naming the file, the record and the field
# --------------------------------------------------------------------------------------------------------------
BAD = [
    ([{"text": "hello"}], "record 0: no prompt (keys ['text']); expected one of: prompt (TRL: a string or messages"),
    ([{"prompt": "a"}, {"prompt": [user("Hi"), {"role": "assistant", "content": "Hello."}]}],
     "record 1: field 'prompt': the prompt must end with a user message, got 'assistant'"),
    ([{"prompt": "a"}, {"prompt": "  "}], "record 1: field 'prompt': empty"),
    ([{"prompt": [SYSTEM, user(" ")]}], "record 0: field 'prompt': the last user message is empty"),
    ([{"prompt": 5}], "record 0: field 'prompt': must be a string or a list of messages, got int"),
    ([{"question": ["q"], "answer": "#### 1"}], "record 0: field 'question': must be a string, got list"),
    ([{"messages": [{"role": "assistant", "content": "Hello."}]}],
     "record 0: field 'messages': the turns before the last assistant message must end with a user message"),
    ([{"conversations": [{"from": "human", "value": "Hi"}, {"from": "system", "value": "x"}]}],
     "record 0: field 'conversations': the prompt must end with a user message"),
    ([{"prompt": [user("Hi")], "reward_model": {"style": "rule"}}],
     "record 0: field 'reward_model.ground_truth': missing"),
    ([{"prompt": [user("Hi")], "reward_model": {"ground_truth": "1"}, "ground_truth": "2"}],
     "record 0: field 'ground_truth': differs from reward_model.ground_truth"),
]


@pytest.mark.parametrize("rows, expected", BAD, ids=range(len(BAD)))
def test_bad_prompts_are_one_line_errors(tmp_path, rows, expected):
    path = write(tmp_path / "bad.jsonl", rows)
    assert message(lambda: load(path)).startswith(f"{path}: {expected}")


def test_prompt_only_files_are_refused_by_the_offline_losses():
    for kind in ("sft", "preference", "unpaired"):
        assert message(lambda: load(os.path.join(FIX, "prompts_gsm8k.jsonl"), kind)).endswith(
            f"question/answer (GSM8K prompts) data has prompts and no responses: it cannot be {kind} data; the online "
            "losses take it (loss.name=grpo, dr_grpo, dapo, gspo, rloo, reinforce_pp)")


def test_cli_without_prompts_is_one_line_exit_2(tmp_path):
    path = write(tmp_path / "text.jsonl", [{"text": "hello"}])
    assert_one_line_error(run_cli("data.py", "check", path, "--loss", "grpo"), path, "record 0", "no prompt",
                          "question, answer (GSM8K)")


# --------------------------------------------------------------------------------------------------------------
# Tokenization and datasets
# --------------------------------------------------------------------------------------------------------------
def test_tokenize_renders_the_generation_prompt_and_keeps_the_columns(tok):
    rec = load(os.path.join(FIX, "prompts_trl.jsonl"))[1]
    out, truncated = data.tokenize_example(rec, tok, "prompt", 4, 512)  # max_length: no response, no effect
    text = tok.apply_chat_template(rec["prompt"], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n") and not truncated
    assert out == {"prompt_input_ids": tok(text, add_special_tokens=False)["input_ids"], "prompt": rec["prompt"],
                   "prompt_is_text": False, "columns": {"solution": "8", "level": 1}}
    short, truncated = data.tokenize_example(rec, tok, "prompt", 512, 5)
    assert truncated and short["prompt_input_ids"] == out["prompt_input_ids"][-5:]  # the prompt keeps its END


def test_build_datasets_of_prompts(tok, tmp_path):
    rows = [{"prompt": f"Please write numbers. {'More. ' * i}", "i": i} for i in range(10)]
    spec = {"type": "custom_dataset", "path": write(tmp_path / "p.jsonl", rows)}
    train, evals, stats = data.build_datasets([spec], [], tok, "prompt", 64, 30, 2, seed=0)
    assert (len(train), len(evals)) == (8, 2) and stats["skipped"] == 0
    assert sorted(ex["columns"]["i"] for ex in train + evals) == list(range(10))
    texts = [tok.apply_chat_template([user(r["prompt"])], tokenize=False, add_generation_prompt=True) for r in rows]
    lengths = [len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]
    assert 0 < stats["truncated"] == sum(n > 30 for n in lengths) < 10
    assert all(len(ex["prompt_input_ids"]) <= 30 and ex["prompt_is_text"] for ex in train + evals)


# --------------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------------
def test_every_online_method_checks_prompt_data(capsys):
    import rl_losses
    assert set(data.ONLINE_LOSSES) == set(rl_losses.ONLINE)
    assert data.main(["check", os.path.join(FIX, "prompts_trl.jsonl"), "--loss", "grpo"]) == 0
    out = capsys.readouterr().out
    assert "prompts_trl.jsonl: 3 records (0 dropped), format prompt (TRL prompts), kind prompt: ok" in out
    assert "prompts: 1 plain text, 2 conversations; columns: answer, level, solution" in out
    assert re.search(r"\n  prompt +p50 \d+  p90 \d+  max \d+\n", out)
    assert "at max_prompt_length 256: 0 truncated" in out
    for loss in data.ONLINE_LOSSES[1:]:
        assert data.main(["check", os.path.join(FIX, "sft_sharegpt.jsonl"), "--loss", loss]) == 0
        assert "format conversations (ShareGPT SFT), kind prompt: ok" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["prompts_trl.jsonl", "prompts_gsm8k.jsonl", "verl", "dpo_seed.json"])
@pytest.mark.parametrize("out_name", ["out.jsonl", "out.json.gz"])
def test_convert_to_prompts_round_trip(tmp_path, verl_parquet, name, out_name):
    src = verl_parquet if name == "verl" else os.path.join(FIX, name)
    out = str(tmp_path / out_name)
    assert data.main(["convert", src, out, "--to", "prompts"]) == 0
    assert fmt_of(out) in ("trl_prompt", "verl") and load(out) == load(src)


def test_convert_writes_trl_prompt_rows(tmp_path):
    out = tmp_path / "p.jsonl"
    assert data.main(["convert", os.path.join(FIX, "prompts_gsm8k.jsonl"), str(out), "--to", "prompts"]) == 0
    row = json.loads(out.read_text().splitlines()[0])
    assert row == {"prompt": GSM8K_Q0, "answer": json.loads(open(os.path.join(FIX, "prompts_gsm8k.jsonl")).readline())
                   ["answer"]}
    src = write(tmp_path / "clash.jsonl", [{"messages": [user("Hi")], "prompt": "x"}])
    assert message(lambda: formats.prompt_row(load(src)[0], (src, 0))).startswith(
        f"{src}: record 0: field 'prompt': a column of this format")
    assert data.main(["convert", src, str(tmp_path / "x.jsonl"), "--to", "prompts"]) == 2
    assert data.main(["convert", str(out), str(tmp_path / "x.jsonl"), "--to", "sft"]) == 2
    assert not os.path.exists(tmp_path / "x.jsonl")


# --------------------------------------------------------------------------------------------------------------
# Demo prompts and docs
# --------------------------------------------------------------------------------------------------------------
def test_demo_prompts_are_reproducible_and_ask_for_numbers_or_words(tmp_path):
    demo = os.path.join(ROOT, "example", "data", "prompts_demo.json")
    proc = run_cli(os.path.join("example", "make_demo_data.py"), "--out-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert open(tmp_path / "prompts_demo.json").read() == open(demo).read()
    recs = load(demo)
    asks = [("numbers" in r["prompt"][-1]["content"], "words" in r["prompt"][-1]["content"]) for r in recs]
    assert 350 <= len(recs) <= 450 and asks.count((True, False)) == asks.count((False, True)) == len(recs) // 2
    assert len({r["prompt"][-1]["content"] for r in recs}) > 4 and fmt_of(demo) == "trl_prompt"


def test_make_tokenizer_reads_every_demo_file(tmp_path):
    # the README's "python example/make_demo_data.py && python example/make_tokenizer.py" with the prompts file present
    proc = run_cli(os.path.join("example", "make_tokenizer.py"), "--out-dir", str(tmp_path / "tok"))
    assert proc.returncode == 0 and "check ok" in proc.stdout, proc.stderr[-2000:]
    sys.path.insert(0, os.path.join(ROOT, "example"))
    import make_tokenizer
    files = make_tokenizer.corpus_files(ROOT, os.path.join(ROOT, "example", "data"))
    texts = list(make_tokenizer.iter_texts([f for f in files if f.endswith("prompts_demo.json")]))
    assert len(texts) == len(load(os.path.join(ROOT, "example", "data", "prompts_demo.json"))) and "words" in texts[0]


def prompt_section(name):
    text = open(os.path.join(ROOT, name), encoding="utf-8").read()
    return re.search(r"\n## (?:Prompt data|提示数据).*?\n(.*?)\n## ", text, re.S).group(1)


def test_docs_prompt_section_examples_and_commands(tmp_path, monkeypatch, capsys):
    """Each language's prompt section: its example records load as the shapes they show, and its data.py commands
    are the same in both and run."""
    sections = [prompt_section(n) for n in ("docs/data.md", "docs/zh/data.md")]
    blocks = [re.findall(r"```(json|bash)\n(.*?)```", s, re.S) for s in sections]
    assert len(blocks[0]) == len(blocks[1]) == 5 and blocks[0][-1][0] == blocks[1][-1][0] == "bash"
    shapes = []
    for i, (lang, text) in enumerate(blocks[0][:-1]):
        assert blocks[1][i] == (lang, text) and lang == "json"
        rows = json.loads(text)
        shapes.append(fmt_of(write(tmp_path / f"{i}.jsonl", rows if isinstance(rows, list) else [rows])))
    assert shapes == ["trl_prompt", "verl", "gsm8k", "sharegpt"]
    assert load(str(tmp_path / "1.jsonl"))[0]["columns"]["ground_truth"] == "31"
    commands = [[shlex.split(line, comments=True) for line in b[-1][1].splitlines()] for b in blocks]
    assert commands[0] == commands[1] and len(commands[0]) == 2
    shutil.copy(os.path.join(FIX, "prompts_gsm8k.jsonl"), tmp_path / "gsm8k_train.jsonl")
    monkeypatch.chdir(tmp_path)
    for args in commands[0]:
        assert args[:2] == ["python", "data.py"]
        args = [os.path.join(ROOT, a) if a.startswith("example/") else a for a in args[2:]]
        assert data.main(args) == 0, (args, capsys.readouterr().err)
    assert "kind prompt: ok" in capsys.readouterr().out
    assert load("prompts.jsonl") == load("gsm8k_train.jsonl")
