"""Tests for data.py's unpaired (KTO) data: formats and validation, pairs as unpaired examples, tokenization, the
KL pairing of build_datasets, collate, and the CLI (check's counts, convert --to kto)."""
import json
import os

import pytest
from conftest import ROOT, TOKENIZER, assert_one_line_error, run_cli

import data
import formats
from formats import DataError

FIX = os.path.join(ROOT, "tests", "fixtures")


def user(text):
    return {"role": "user", "content": text}


def bot(text):
    return {"role": "assistant", "content": text}


def ex(prompt, completion, desirable):
    return {"prompt": prompt, "completion": [bot(completion)], "desirable": desirable}


TRL_ROWS = [{"prompt": "Is 7 larger than 5?", "completion": "Yes.", "label": True},
            {"prompt": [{"role": "system", "content": "Be kind."}, user("Spell cat.")],
             "completion": [bot("Dog.")], "label": False}]
SEED_ROWS = [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."},
                                {"from": "human", "value": "Is 7 larger than 5?"}],
              "completion": {"from": "gpt", "value": "Yes."}, "label": True},
             {"conversations": [{"from": "system", "value": "Be kind."}, {"from": "human", "value": "Spell cat."}],
              "completion": [{"from": "gpt", "value": "D-O-G."}, {"from": "gpt", "value": "Dog."}], "label": False}]


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer
    return data.prepare_tokenizer(AutoTokenizer.from_pretrained(TOKENIZER))


def enc(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) if path.suffix == ".jsonl" else json.dumps(rows))
    return str(path)


def load(path, kind="unpaired"):
    return formats.load_examples({"type": "custom_dataset", "path": path}, kind)


# --------------------------------------------------------------------------------------------------------------
# Formats
# --------------------------------------------------------------------------------------------------------------
def test_trl_and_seed_unpaired_formats(tmp_path):
    assert load(write(tmp_path / "trl.jsonl", TRL_ROWS)) == [
        ex([user("Is 7 larger than 5?")], "Yes.", True),
        ex([{"role": "system", "content": "Be kind."}, user("Spell cat.")], "Dog.", False)]
    seed = load(write(tmp_path / "seed.json", SEED_ROWS))
    assert seed == [ex([user("Hi"), bot("Hello."), user("Is 7 larger than 5?")], "Yes.", True),
                    {"prompt": [{"role": "system", "content": "Be kind."}, user("Spell cat.")],
                     "completion": [bot("D-O-G."), bot("Dog.")], "desirable": False}]
    assert formats._detect(TRL_ROWS[0]) == "trl_unpaired" and formats._detect(SEED_ROWS[0]) == "seed_unpaired"
    assert "unpaired" in formats.KINDS


@pytest.mark.parametrize("kind", ["sft", "preference"])
def test_unpaired_files_are_only_for_unpaired_losses(tmp_path, kind):
    for name, rows in (("trl.jsonl", TRL_ROWS), ("seed.json", SEED_ROWS)):
        path = write(tmp_path / name, rows)
        with pytest.raises(DataError, match=rf"^{path}: .*unpaired.* cannot be {kind} data: .*loss.name=kto"):
            load(path, kind)


def test_sft_files_are_refused_as_unpaired():
    for name in ("sft_messages.json", "sft_sharegpt.jsonl"):
        with pytest.raises(DataError, match=rf"{name}: SFT data .* no undesirable examples.*kto"):
            load(os.path.join(FIX, name))


TRL_GOOD, SEED_GOOD = TRL_ROWS[0], SEED_ROWS[0]
BAD = [
    (TRL_GOOD, {"prompt": "q", "completion": "a"}, "field 'label': missing"),
    (TRL_GOOD, {**TRL_GOOD, "label": "yes"}, "field 'label': must be true or false, got 'yes'"),
    (TRL_GOOD, {**TRL_GOOD, "label": 1}, "field 'label': must be true or false, got 1"),
    (TRL_GOOD, {**TRL_GOOD, "label": None}, "field 'label': missing"),
    (TRL_GOOD, {**TRL_GOOD, "completion": [user("a")]},
     "field 'completion[0].role': the response must be 'assistant', got 'user'"),
    (TRL_GOOD, {**TRL_GOOD, "completion": ""}, "field 'completion': empty"),
    (TRL_GOOD, {**TRL_GOOD, "completion": None}, "field 'completion': missing"),
    (TRL_GOOD, {"completion": "a", "label": True}, "field 'prompt': missing"),
    (TRL_GOOD, {**TRL_GOOD, "prompt": [bot("a")]}, "field 'prompt': the prompt must end with a user message"),
    (SEED_GOOD, {**SEED_GOOD, "label": "true"}, "field 'label': must be true or false, got 'true'"),
    (SEED_GOOD, {k: v for k, v in SEED_GOOD.items() if k != "label"}, "field 'label': missing"),
    (SEED_GOOD, {**SEED_GOOD, "completion": {"from": "human", "value": "a"}},
     "field 'completion.from': the response must be 'gpt', got 'human'"),
    (SEED_GOOD, {**SEED_GOOD, "completion": {"from": "gpt", "value": " "}}, "field 'completion.value': empty"),
    (SEED_GOOD, {"conversations": SEED_GOOD["conversations"], "label": True}, "field 'completion': missing"),
    (SEED_GOOD, {**SEED_GOOD, "completion": {"from": "gpt"}}, "field 'completion.value': missing"),
    (SEED_GOOD, TRL_GOOD, "one format per file"),
]


@pytest.mark.parametrize("good,bad,needle", BAD)
def test_bad_records_name_file_record_and_field(tmp_path, good, bad, needle):
    path = write(tmp_path / "bad.json", [good, good, bad])
    with pytest.raises(DataError) as e:
        load(path)
    assert str(e.value).startswith(f"{path}: record 2: ") and needle in str(e.value), str(e.value)


def test_bad_record_0_is_still_detected_and_named(tmp_path):
    path = write(tmp_path / "bad.jsonl", [{"prompt": "q", "completion": "a", "label": "no"}, TRL_GOOD])
    proc = run_cli("data.py", "check", path, "--tokenizer", TOKENIZER)
    assert_one_line_error(proc, f"{path}: record 0: field 'label': must be true or false, got 'no'")


def test_pair_files_as_unpaired_two_examples_per_pair():
    for name in ("dpo_seed.json", "dpo_trl.jsonl", "hh_raw.jsonl", "shp_raw.jsonl", "se_raw.jsonl"):
        spec = {"type": "custom_dataset", "path": os.path.join(FIX, name)}
        if name.endswith("_raw.jsonl"):
            spec = {**spec, "type": "huggingface_dataset", "name": name.split("_")[0]}
        pairs = formats.load_examples(spec, "preference")
        assert formats.load_examples(spec, "unpaired") == [
            {"prompt": p["prompt"], "completion": p[side], "desirable": side == "chosen"}
            for p in pairs for side in ("chosen", "rejected")], name
    q = [user("Is 7 larger than 5?")]
    assert load(os.path.join(FIX, "dpo_trl.jsonl"))[:2] == [ex(q, "Yes, 7 is larger than 5.", True),
                                                            ex(q, "No idea.", False)]


# --------------------------------------------------------------------------------------------------------------
# Tokenization
# --------------------------------------------------------------------------------------------------------------
def test_tokenization_labels_exactly_on_the_completion(tok):
    out, truncated = data.tokenize_example(ex([user("hi")], "yo there", False), tok, "unpaired", 512, 256)
    head = enc(tok, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    body = enc(tok, "yo there<|im_end|>")
    assert not truncated and set(out) == {"prompt_input_ids", "chosen_input_ids", "chosen_labels", "desirable"}
    assert out["prompt_input_ids"] == head and out["desirable"] is False
    assert out["chosen_input_ids"] == head + body + enc(tok, "\n")
    assert out["chosen_labels"] == [-100] * len(head) + body + [-100]


@pytest.mark.parametrize("max_length,max_prompt_length", [(512, 256), (30, 10), (20, 20), (12, 4)])
def test_tokenization_is_a_preference_chosen_side(tok, max_length, max_prompt_length):
    """Same ids, labels, prompt and truncation as the chosen side of a pair whose two sides are the completion."""
    prompt = [{"role": "system", "content": "You are terse."}, user("What is 2 + 2?"), bot("4."), user("And 3 + 3?")]
    completion = [bot("It is 6, and that is all there is to say about it.")]
    got = data.tokenize_example({"prompt": prompt, "completion": completion, "desirable": True}, tok, "unpaired",
                                max_length, max_prompt_length)
    want = data.tokenize_example({"prompt": prompt, "chosen": completion, "rejected": completion}, tok, "preference",
                                 max_length, max_prompt_length)
    if (max_length, max_prompt_length) == (20, 20):  # the prompt takes all the room: skipped, as the pair is
        assert got == want == (None, True)
        return
    assert got == ({**{k: v for k, v in want[0].items() if not k.startswith("rejected")}, "desirable": True}, want[1])
    assert want[1] is (max_length < 512)


def test_tokenization_error_names_completion(tok):
    bad = data.prepare_tokenizer(type(tok).from_pretrained(TOKENIZER))
    bad.chat_template = "{%- for m in messages %}{{- m['content'] }}{%- generation %}{%- endgeneration %}{%- endfor %}"
    with pytest.raises(DataError, match="field 'completion': the assistant mask is empty"):
        data.tokenize_example(ex([user("hi")], "yo", True), bad, "unpaired", 64, 32)


# --------------------------------------------------------------------------------------------------------------
# KL pairing (build_datasets) and collate
# --------------------------------------------------------------------------------------------------------------
def test_kl_pairs_rule_and_truncation():
    examples = [{"chosen_input_ids": [1, 2, 3, 4], "chosen_labels": [-100, -100, 3, 4]},
                {"chosen_input_ids": [5, 6, 7], "chosen_labels": [-100, 6, -100]},
                {"chosen_input_ids": [8, 9, 10, 11, 12], "chosen_labels": [-100, -100, -100, 11, 12]}]
    data.kl_pairs(examples, 5)
    assert [(e["rejected_input_ids"], e["rejected_labels"]) for e in examples] == [
        ([1, 2, 6, 7], [-100, -100, 6, -100]),          # prompt 0 + completion 1
        ([5, 11, 12], [-100, 11, 12]),                  # prompt 1 + completion 2
        ([8, 9, 10, 3, 4], [-100, -100, -100, 3, 4])]   # prompt 2 + completion 0, exactly max_length
    data.kl_pairs(examples, 4)
    assert examples[2]["rejected_input_ids"] == [8, 9, 10, 3] and examples[2]["rejected_labels"] == [-100] * 3 + [3]
    one = data.kl_pairs([{"chosen_input_ids": [1, 2, 3], "chosen_labels": [-100, 2, 3]}], 8)
    assert one[0]["rejected_input_ids"] == [1, 2, 3] and one[0]["rejected_labels"] == [-100, 2, 3]
    assert data.kl_pairs([], 8) == []


QUESTIONS = {"Name a fruit.": "Apple.", "Name a colour.": "A deep and calm blue.", "Name a number.": "Seven."}


def head(tok, question):
    return enc(tok, f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n")


def test_build_datasets_kl_sequences_exactly(tmp_path, tok):
    rows = [{"prompt": q, "completion": a, "label": i != 1} for i, (q, a) in enumerate(QUESTIONS.items())]
    spec = {"type": "custom_dataset", "path": write(tmp_path / "three.jsonl", rows)}
    train, evals, stats = data.build_datasets([spec], [], tok, "unpaired", 512, 256, 0, seed=3)
    assert evals == [] and stats["train"] == 3 and len(train) == 3
    order = [next(q for q in QUESTIONS if head(tok, q) == e["prompt_input_ids"]) for e in train]
    assert sorted(order) == sorted(QUESTIONS)
    for i, e in enumerate(train):
        q, q_next = order[i], order[(i + 1) % 3]
        body = enc(tok, QUESTIONS[q_next] + "<|im_end|>")
        assert e["desirable"] is (q != "Name a colour.")
        assert e["rejected_input_ids"] == head(tok, q) + body + enc(tok, "\n")
        assert e["rejected_labels"] == [-100] * len(head(tok, q)) + body + [-100]
        assert e["chosen_input_ids"] == head(tok, q) + enc(tok, QUESTIONS[q] + "<|im_end|>\n")
    again = data.build_datasets([spec], [], tok, "unpaired", 512, 256, 0, seed=3)[0]
    assert again == train  # deterministic: the same pairs for the same seed

    # Truncation to max_length: the completion keeps its start.
    short, _, stats = data.build_datasets([spec], [], tok, "unpaired", 14, 7, 0, seed=3)
    assert stats["truncated"] == 3 and len(short) == 3
    starts = [next(k for k, l in enumerate(e["chosen_labels"]) if l != -100) for e in short]
    for i, e in enumerate(short):
        j = (i + 1) % 3
        n, m = starts[i], starts[j]
        assert e["rejected_input_ids"] == (e["chosen_input_ids"][:n] + short[j]["chosen_input_ids"][m:])[:14]
        assert e["rejected_labels"] == ([-100] * n + short[j]["chosen_labels"][m:])[:14]
    assert max(len(e["rejected_input_ids"]) for e in short) == 14


def test_single_example_and_eval_set_paired_separately(tmp_path, tok):
    one = write(tmp_path / "one.json", [{"prompt": "Name a fruit.", "completion": "Apple.", "label": False}])
    train, _, _ = data.build_datasets([{"path": one}], [], tok, "unpaired", 512, 256, 0, 0)
    assert train[0]["rejected_input_ids"] == train[0]["chosen_input_ids"]
    assert train[0]["rejected_labels"] == train[0]["chosen_labels"]
    pairs = {"type": "custom_dataset", "path": os.path.join(FIX, "dpo_trl.jsonl")}  # 2 pairs -> 4 examples
    train, evals, stats = data.build_datasets([pairs], [], tok, "unpaired", 512, 256, 1, 0)
    assert (stats["train"], stats["eval"]) == (3, 1)
    assert evals[0]["rejected_input_ids"] == evals[0]["chosen_input_ids"]  # eval's own pairing: itself
    for i, e in enumerate(train):  # train's KL completions come from train only
        nxt = train[(i + 1) % 3]
        n = next(k for k, l in enumerate(nxt["chosen_labels"]) if l != -100)
        assert e["rejected_input_ids"][-(len(nxt["chosen_input_ids"]) - n):] == nxt["chosen_input_ids"][n:]
    assert sorted(e["desirable"] for e in train + evals) == [False, False, True, True]


def test_collate_gives_the_preference_layout(tmp_path, tok):
    rows = [{"prompt": q, "completion": a, "label": True} for q, a in QUESTIONS.items()]
    spec = {"type": "custom_dataset", "path": write(tmp_path / "three.json", rows)}
    train = data.build_datasets([spec], [], tok, "unpaired", 512, 256, 0, 0)[0]
    train[1]["desirable"] = False
    pad = tok.pad_token_id
    b = data.collate(train, pad)
    B = len(train)
    assert set(b) == {"input_ids", "labels", "seq_ids", "attention_mask", "prompt_input_ids", "prompt_attention_mask",
                      "cu_seq_lens", "max_seq_len", "n_seqs", "desirable"}
    assert b["n_seqs"] == 2 * B and b["desirable"].tolist() == [True, False, True]
    assert data.sequences_of(train) == ([(e["chosen_input_ids"], e["chosen_labels"]) for e in train]
                                        + [(e["rejected_input_ids"], e["rejected_labels"]) for e in train])
    for i, e in enumerate(train):
        for row, (ids, labels) in ((i, (e["chosen_input_ids"], e["chosen_labels"])),
                                   (B + i, (e["rejected_input_ids"], e["rejected_labels"]))):
            n = len(ids)
            assert b["input_ids"][row, :n].tolist() == ids and b["labels"][row, 1:n].tolist() == labels[1:]
            assert b["seq_ids"][row, :n].eq(row).all() and b["input_ids"][row, n:].eq(pad).all()
    packed = data.collate(train, pad, packing=True, max_length=128)
    for i, (ids, _) in enumerate(data.sequences_of(train)):
        assert packed["input_ids"][packed["seq_ids"] == i].tolist() == ids
    for i, e in enumerate(train):
        e["reference_logps"] = (-1.0 - i, -10.0 - i)
    assert data.collate(train, pad)["reference_logps"].tolist() == [-1, -2, -3, -10, -11, -12]
    assert data.example_length(train[0]) == max(len(train[0]["chosen_input_ids"]), len(train[0]["rejected_input_ids"]))


# --------------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------------
def test_cli_check_counts(tmp_path, capsys):
    rows = [{**TRL_GOOD, "label": i % 3 != 0} for i in range(5)]  # 3 desirable, 2 undesirable
    path = write(tmp_path / "u.jsonl", rows)
    assert data.main(["check", path, "--tokenizer", TOKENIZER]) == 0
    out = capsys.readouterr().out
    assert "5 records (0 dropped), format prompt/completion/label (TRL unpaired), kind unpaired: ok" in out
    assert "desirable 3, undesirable 2\n" in out and "prompt+completion" in out and "prompt+rejected" not in out
    assert data.main(["check", os.path.join(FIX, "dpo_seed.json"), "--loss", "kto", "--tokenizer", TOKENIZER]) == 0
    out = capsys.readouterr().out
    assert "4 records" in out and "kind unpaired" in out and "desirable 2, undesirable 2" in out
    assert data.main(["check", os.path.join(FIX, "dpo_seed.json")]) == 0
    assert "desirable" not in capsys.readouterr().out
    assert_one_line_error(run_cli("data.py", "check", path, "--loss", "dpo"), "u.jsonl", "loss.name=kto")
    assert_one_line_error(run_cli("data.py", "check", os.path.join(FIX, "sft_messages.json"), "--loss", "kto"),
                          "sft_messages.json", "no undesirable examples")


def test_cli_convert_to_kto_round_trip(tmp_path, capsys):
    trl = os.path.join(FIX, "dpo_trl.jsonl")
    out_json, out_jsonl = str(tmp_path / "kto.json"), str(tmp_path / "kto.jsonl")
    assert data.main(["convert", trl, out_json, "--to", "kto"]) == 0
    assert capsys.readouterr().out == f"wrote 4 kto records to {out_json}\n"
    rows = json.load(open(out_json))
    assert rows[2:] == [
        {"conversations": [{"from": "system", "value": "Be kind."}, {"from": "human", "value": "Spell cat."}],
         "completion": {"from": "gpt", "value": "C-A-T."}, "label": True},
        {"conversations": [{"from": "system", "value": "Be kind."}, {"from": "human", "value": "Spell cat."}],
         "completion": {"from": "gpt", "value": "Dog."}, "label": False}]
    assert load(out_json) == load(trl)
    assert data.main(["check", out_json, "--tokenizer", TOKENIZER]) == 0
    assert "desirable 2, undesirable 2" in capsys.readouterr().out
    # unpaired -> unpaired: TRL format in, the seed style out (JSON lines too); multi-message completions stay lists
    src = write(tmp_path / "trl_u.jsonl", TRL_ROWS)
    assert data.main(["convert", src, out_jsonl, "--to", "kto"]) == 0
    assert load(out_jsonl) == load(src)
    assert json.loads(open(out_jsonl).readline())["completion"] == {"from": "gpt", "value": "Yes."}
    seed = write(tmp_path / "seed_u.json", SEED_ROWS)
    assert data.main(["convert", seed, out_json, "--to", "kto"]) == 0
    assert json.load(open(out_json))[1]["completion"] == SEED_ROWS[1]["completion"] and load(out_json) == load(seed)
    assert_one_line_error(run_cli("data.py", "convert", out_json, str(tmp_path / "x.json"), "--to", "dpo"),
                          "kto.json", "loss.name=kto")
    assert_one_line_error(run_cli("data.py", "convert", out_json, str(tmp_path / "x.json"), "--to", "sft"),
                          "kto.json", "cannot be converted to SFT")
    assert_one_line_error(run_cli("data.py", "convert", os.path.join(FIX, "sft_messages.json"),
                                  str(tmp_path / "x.json"), "--to", "kto"), "no undesirable examples")
    assert not os.path.exists(tmp_path / "x.json")
