"""Tests for data.py: formats and validation, assistant-only labels, truncation, splitting, collate, CLI."""
import json
import os

import pytest
import torch
from conftest import ROOT, TOKENIZER, assert_one_line_error, run_cli

import data
from data import DataError

FIX = os.path.join(ROOT, "tests", "fixtures")

CHATML_MARKERS = (  # same text as CHATML_PLAIN, with {% generation %} around assistant content + <|im_end|>
    "{%- for m in messages %}{%- if m['role'] == 'assistant' %}{{- '<|im_start|>assistant\\n' }}"
    "{%- generation %}{{- m['content'] + '<|im_end|>' }}{%- endgeneration %}{{- '\\n' }}"
    "{%- else %}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
CHATML_PLAIN = (
    "{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
QWEN_STYLE = (  # Qwen2.5-like: default system prompt, no generation markers
    "{%- if messages[0]['role'] != 'system' %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}" + CHATML_PLAIN)
BOS_TEMPLATE = "{{- bos_token }}" + CHATML_MARKERS
BOS_TEMPLATE_PLAIN = "{{- bos_token }}" + CHATML_PLAIN
NOT_PREFIX = CHATML_PLAIN.replace("m['content'] +", "(m['content'] if not loop.last else m['content'] + '!') +")

CONV = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4."}, {"role": "user", "content": "And 3 + 3?"},
        {"role": "assistant", "content": "It is 6."}]
PREF = {"prompt": [{"role": "user", "content": "Is 7 larger than 5?"}],
        "chosen": [{"role": "assistant", "content": "Yes, 7 is larger than 5."}],
        "rejected": [{"role": "assistant", "content": "No idea."}]}


# --------------------------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def example_tok():
    from transformers import AutoTokenizer
    return data.prepare_tokenizer(AutoTokenizer.from_pretrained(TOKENIZER))


def make_tok(template, bos=False):
    """A tiny byte-level BPE trained here; ChatML special tokens; eos <|im_end|>; optional BOS <s> that the
    tokenizer itself also prepends (so a doubled BOS would show)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<s>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [m["content"] for m in CONV] + ["user assistant system", "Yes, 7 is larger than 5. No idea."] * 3
    tok.train_from_iterator(corpus, trainer=trainer)
    post = [processors.ByteLevel(trim_offsets=False)]
    if bos:
        post.append(processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]))
    tok.post_processor = processors.Sequence(post)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<s>" if bos else None,
                                 pad_token=None)
    hf.chat_template = template
    return data.prepare_tokenizer(hf)


def runs(labels):
    """Contiguous runs of labelled token ids."""
    out, cur = [], []
    for l in labels + [-100]:
        if l != -100:
            cur.append(l)
        elif cur:
            out, cur = out + [cur], []
    return out


def enc(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


# --------------------------------------------------------------------------------------------------------------
# Labels
# --------------------------------------------------------------------------------------------------------------
def test_exact_labels_hand_checked(example_tok):
    tok = example_tok
    ex = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo there"}]}
    out, truncated = data.tokenize_example(ex, tok, "sft", 512, 256)
    head = enc(tok, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    body = enc(tok, "yo there<|im_end|>")
    assert not truncated
    assert out["input_ids"] == head + body + enc(tok, "\n")
    assert out["labels"] == [-100] * len(head) + body + [-100]
    assert body[-1] == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    assert out["prompt_input_ids"] == head


@pytest.mark.parametrize("template", ["example", None, CHATML_MARKERS, CHATML_PLAIN, QWEN_STYLE, BOS_TEMPLATE,
                                      BOS_TEMPLATE_PLAIN])
def test_multiturn_labels_only_on_assistant_turns(example_tok, template):
    tok = example_tok if template == "example" else make_tok(template, bos="bos_token" in (template or ""))
    out, _ = data.tokenize_example({"messages": CONV}, tok, "sft", 512, 256)
    got = [tok.decode(r) for r in runs(out["labels"])]
    assert got == ["4.<|im_end|>", "It is 6.<|im_end|>"]
    assert all(l in (-100, i) for l, i in zip(out["labels"], out["input_ids"]))
    assert tok.decode(out["prompt_input_ids"]).endswith("And 3 + 3?<|im_end|>\n<|im_start|>assistant\n")


def test_default_template_and_markers_agree_with_incremental():
    a, b = make_tok(CHATML_MARKERS), make_tok(CHATML_PLAIN)
    for ex, kind in (({"messages": CONV}, "sft"), (PREF, "preference")):
        assert data.tokenize_example(ex, a, kind, 512, 256) == data.tokenize_example(ex, b, kind, 512, 256)
    tok = make_tok(None)
    assert tok.chat_template == data.DEFAULT_CHAT_TEMPLATE and tok.pad_token == tok.eos_token == "<|im_end|>"
    out, _ = data.tokenize_example({"messages": CONV}, tok, "sft", 512, 256)
    assert tok.decode(out["input_ids"]).startswith("<|im_start|>system\nYou are terse.<|im_end|>\n")


@pytest.mark.parametrize("template", [BOS_TEMPLATE, BOS_TEMPLATE_PLAIN, None])
def test_no_doubled_bos(template):
    tok = make_tok(template, bos=True)
    assert tok("x")["input_ids"][0] == tok.bos_token_id  # the tokenizer itself would add one
    sft, _ = data.tokenize_example({"messages": CONV}, tok, "sft", 512, 256)
    pref, _ = data.tokenize_example(PREF, tok, "preference", 512, 256)
    for ids in (sft["input_ids"], sft["prompt_input_ids"], pref["chosen_input_ids"], pref["prompt_input_ids"]):
        assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1


def test_template_not_prefix_consistent_is_clear_error():
    with pytest.raises(DataError, match="not prefix-consistent.*generation"):
        data.tokenize_example({"messages": CONV}, make_tok(NOT_PREFIX), "sft", 512, 256)


def test_empty_assistant_mask_is_data_error():
    tok = make_tok("{%- for m in messages %}{{- m['content'] }}{%- generation %}{%- endgeneration %}{%- endfor %}")
    with pytest.raises(DataError, match="assistant mask is empty"):
        data.tokenize_example({"messages": CONV}, tok, "sft", 512, 256)


@pytest.mark.parametrize("template", ["example", QWEN_STYLE])
def test_preference_prefix_rule(example_tok, template):
    tok = example_tok if template == "example" else make_tok(template)
    out, truncated = data.tokenize_example(PREF, tok, "preference", 512, 256)
    p = out["prompt_input_ids"]
    assert not truncated and tok.decode(p).endswith("Is 7 larger than 5?<|im_end|>\n<|im_start|>assistant\n")
    for side in ("chosen", "rejected"):
        ids, labels = out[f"{side}_input_ids"], out[f"{side}_labels"]
        assert ids[:len(p)] == p and labels[:len(p)] == [-100] * len(p) and len(ids) == len(labels)
        assert runs(labels) == [enc(tok, PREF[side][0]["content"] + "<|im_end|>")]
        assert labels[len(p)] != -100  # the response starts right after the prompt


# --------------------------------------------------------------------------------------------------------------
# Truncation
# --------------------------------------------------------------------------------------------------------------
def test_sft_truncation_keeps_prompt_end_and_response_start(example_tok):
    tok = example_tok
    ex = {"messages": [{"role": "user", "content": "one two three four five six seven eight nine ten " * 3},
                       {"role": "assistant", "content": "alpha beta gamma delta epsilon zeta eta theta " * 3}]}
    full, t0 = data.tokenize_example(ex, tok, "sft", 10_000, 10_000)
    first = next(i for i, l in enumerate(full["labels"]) if l != -100)
    out, t1 = data.tokenize_example(ex, tok, "sft", 30, 8)
    assert not t0 and t1 and len(out["input_ids"]) == 30
    assert out["input_ids"] == full["input_ids"][first - 8:first + 22]  # 8 prompt tokens (its end) + response start
    assert out["labels"] == full["labels"][first - 8:first + 22]
    assert out["prompt_input_ids"] == full["prompt_input_ids"][-8:]
    # Short enough: nothing cut even though the prompt is longer than max_prompt_length.
    same, t2 = data.tokenize_example(ex, tok, "sft", len(full["input_ids"]), 8)
    assert not t2 and (same["input_ids"], same["labels"]) == (full["input_ids"], full["labels"])
    # No room left for the response: skipped, not an error.
    assert data.tokenize_example(ex, tok, "sft", 8, 8) == (None, True)


def test_preference_truncation(example_tok):
    tok = example_tok
    ex = {"prompt": [{"role": "user", "content": "one two three four five six seven eight nine ten " * 3}],
          "chosen": [{"role": "assistant", "content": "alpha beta gamma delta epsilon " * 4}],
          "rejected": [{"role": "assistant", "content": "no"}]}
    full, _ = data.tokenize_example(ex, tok, "preference", 10_000, 10_000)
    P = len(full["prompt_input_ids"])
    out, truncated = data.tokenize_example(ex, tok, "preference", 24, 10)
    assert truncated and out["prompt_input_ids"] == full["prompt_input_ids"][-10:]
    assert out["chosen_input_ids"] == full["prompt_input_ids"][-10:] + full["chosen_input_ids"][P:P + 14]
    assert out["chosen_labels"] == [-100] * 10 + full["chosen_labels"][P:P + 14]
    assert out["rejected_input_ids"] == full["prompt_input_ids"][-10:] + full["rejected_input_ids"][P:]
    assert max(len(out["chosen_input_ids"]), len(out["rejected_input_ids"])) == 24
    assert data.tokenize_example(ex, tok, "preference", 10, 10) == (None, True)


# --------------------------------------------------------------------------------------------------------------
# Formats
# --------------------------------------------------------------------------------------------------------------
def load(name, kind, **spec):
    return data.load_examples({"type": "custom_dataset", "path": os.path.join(FIX, name), **spec}, kind)


def test_sft_formats():
    msgs = load("sft_messages.json", "sft")
    assert msgs[0] == {"messages": [{"role": "system", "content": "You are terse."},
                                    {"role": "user", "content": "What is 2 + 2?"},
                                    {"role": "assistant", "content": "4."},
                                    {"role": "user", "content": "And 3 + 3?"},
                                    {"role": "assistant", "content": "6."}]}
    share = load("sft_sharegpt.jsonl", "sft")
    assert share[0] == {"messages": msgs[0]["messages"][:3]} and share[1] == msgs[1]


def test_preference_formats_seed_and_trl():
    seed, trl = load("dpo_seed.json", "preference"), load("dpo_trl.jsonl", "preference")
    assert seed[0] == {"prompt": [{"role": "user", "content": "Hi, can you help me?"},
                                  {"role": "assistant", "content": "Sure, what do you need?"},
                                  {"role": "user", "content": "Is 7 larger than 5?"}],
                       "chosen": [{"role": "assistant", "content": "Yes, 7 is larger than 5."}],
                       "rejected": [{"role": "assistant", "content": "No idea."}]}
    assert trl[0] == {**seed[0], "prompt": seed[0]["prompt"][2:]}
    assert seed[1] == trl[1] == {"prompt": [{"role": "system", "content": "Be kind."},
                                            {"role": "user", "content": "Spell cat."}],
                                 "chosen": [{"role": "assistant", "content": "C-A-T."}],
                                 "rejected": [{"role": "assistant", "content": "Dog."}]}
    # Preference files are no SFT data (data.py convert --to sft makes them so); hh is (see test_hh_parser).
    with pytest.raises(DataError, match="dpo_seed.json: .* loss.name=sft: .*data.py convert"):
        load("dpo_seed.json", "sft")
    with pytest.raises(DataError, match="sft_messages.json: SFT data .* no rejected"):
        load("sft_messages.json", "preference")


def pair(q, c, r, prompt=None):
    return {"prompt": prompt or [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": c}],
            "rejected": [{"role": "assistant", "content": r}]}


def test_hh_parser():
    spec = {"type": "huggingface_dataset", "name": "hh", "path": os.path.join(FIX, "hh_raw.jsonl")}
    records, _, dropped, _ = data._load(spec, "preference")
    assert dropped == 1  # empty final response
    assert records == [
        pair("What color is the sky on a clear day?", "It is blue.", "Purple, always."),
        pair(None, "A pear.", "No.", prompt=[{"role": "user", "content": "Name a fruit."},
                                             {"role": "assistant", "content": "An apple."},
                                             {"role": "user", "content": "Another one?"}])]
    assert load("hh_raw.jsonl", "preference") == records  # auto-detected as a custom file too
    sft = data.load_examples(spec, "sft")
    assert sft[1] == {"messages": records[1]["prompt"] + [{"role": "assistant", "content": "A pear."}]}


def test_shp_parser():
    spec = {"type": "huggingface_dataset", "name": "shp", "path": os.path.join(FIX, "shp_raw.jsonl")}
    records, _, dropped, _ = data._load(spec, "preference")
    assert dropped == 1  # score ratio 10/8 < 2
    assert records == [pair("How long should I boil an egg?", "About nine minutes for a firm yolk.", "Until it explodes."),
                       pair("Is cast iron hard to clean?", "No, hot water and a brush do it.", "Yes, impossible.")]
    with pytest.raises(DataError, match="preference-only"):
        data.load_examples(spec, "sft")


def test_se_parser_and_folder_split(tmp_path):
    spec = {"type": "huggingface_dataset", "name": "se", "path": os.path.join(FIX, "se_raw.jsonl")}
    records, _, dropped, _ = data._load(spec, "preference")
    q = "How do I reverse a list in Python?"
    assert records == [pair(q, "Use reversed(xs) or xs[::-1].", "You cannot."),
                       pair(q, "Use reversed(xs) or xs[::-1].", "Write a loop.")]
    assert dropped == 1  # equal pm_score only
    # A folder of raw files: files named after the split are used.
    (tmp_path / "sub").mkdir()
    with open(FIX + "/se_raw.jsonl") as f:
        first = f.readline()
    (tmp_path / "sub" / "train.jsonl").write_text(first)
    (tmp_path / "sub" / "test.jsonl").write_text("not json")
    assert data.load_examples({**spec, "path": str(tmp_path)}, "preference") == records


def test_parquet_via_datasets(tmp_path):
    import datasets
    rows = [json.loads(l) for l in open(os.path.join(FIX, "dpo_trl.jsonl"))][:1]
    path = str(tmp_path / "d.parquet")
    datasets.Dataset.from_list(rows).to_parquet(path)
    assert data.load_examples({"type": "custom_dataset", "path": path}, "preference") == \
        load("dpo_trl.jsonl", "preference")[:1]


def test_hh_raw_folder_layout_gz(tmp_path):
    """Like the hub repo: <subset>/train.jsonl.gz and <subset>/test.jsonl.gz; split picks the files."""
    import gzip
    lines = open(os.path.join(FIX, "hh_raw.jsonl"), "rb").read().splitlines(keepends=True)
    for subset in ("helpful-base", "harmless-base"):
        (tmp_path / subset).mkdir()
        with gzip.open(tmp_path / subset / "train.jsonl.gz", "wb") as f:
            f.writelines(lines)
        with gzip.open(tmp_path / subset / "test.jsonl.gz", "wb") as f:
            f.writelines(lines[:1])
    spec = {"type": "huggingface_dataset", "name": "hh", "path": str(tmp_path)}
    assert len(data.load_examples(spec, "preference")) == 4
    assert data.load_examples({**spec, "split": "test"}, "preference") == [load("hh_raw.jsonl", "preference")[0]] * 2


def test_hub_id_offline_is_data_error():
    with pytest.raises(DataError, match=r"someone/somedata \[train\]: cannot load"):
        data.load_examples({"type": "custom_dataset", "path": "someone/somedata"}, "sft")


# --------------------------------------------------------------------------------------------------------------
# Bad data
# --------------------------------------------------------------------------------------------------------------
GOOD_SFT = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
GOOD_PREF = {"conversations": [{"from": "human", "value": "q"}], "chosen": {"from": "gpt", "value": "a"},
             "rejected": {"from": "gpt", "value": "b"}}
BAD = [
    (GOOD_PREF, {"conversations": [{"from": "human", "value": "q"}], "rejected": {"from": "gpt", "value": "b"}},
     "field 'chosen': missing"),
    (GOOD_SFT, {"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]},
     "field 'messages[1].role': unknown value 'bot'; allowed: system, user, assistant"),
    (GOOD_PREF, {**GOOD_PREF, "conversations": [{"from": "user", "value": "q"}]},
     "field 'conversations[0].from': unknown value 'user'; allowed: system, human, gpt"),
    (GOOD_SFT, {"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}]},
     "field 'messages[0].content': must be a string, got int"),
    (GOOD_SFT, {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]},
     "field 'messages[1].content': empty"),
    (GOOD_PREF, {**GOOD_PREF, "chosen": {"from": "gpt", "value": ""}}, "field 'chosen.value': empty"),
    (GOOD_PREF, {**GOOD_PREF, "rejected": {"from": "human", "value": "x"}}, "field 'rejected.from': the response"),
    (GOOD_SFT, {"messages": [{"role": "user", "content": "q"}]}, "field 'messages': no assistant message"),
    (GOOD_SFT, {"messages": "hello"}, "field 'messages': must be a list"),
    (GOOD_SFT, {"conversations": [{"from": "human", "value": "q"}]}, "one format per file"),
    (GOOD_SFT, ["not", "a", "dict"], "expected a JSON object"),
    ({"prompt": "q", "chosen": "a", "rejected": "b"}, {"prompt": "q", "chosen": "a"}, "field 'rejected': missing"),
]


@pytest.mark.parametrize("good,bad,needle", BAD)
def test_bad_records_name_file_record_and_field(tmp_path, good, bad, needle):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([good, good, good, bad]))
    with pytest.raises(DataError) as e:
        data.load_examples({"type": "custom_dataset", "path": str(path)}, "sft" if "messages" in good else "preference")
    assert str(e.value).startswith(f"{path}: record 3: ") and needle in str(e.value), str(e.value)


def test_bad_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('[\n {"messages": []},\n {"messages": [}\n]')
    with pytest.raises(DataError, match=r"bad.json: invalid JSON at line 3 column 16: "):
        load(str(bad), "sft")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(GOOD_SFT) + "\n{oops\n")
    with pytest.raises(DataError, match=r"bad.jsonl: invalid JSON at line 2 column 2: "):
        load(str(bad), "sft")
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(DataError, match="empty.json: no records"):
        load(str(tmp_path / "empty.json"), "sft")
    with pytest.raises(DataError, match="nope.json: no such file"):
        load(str(tmp_path / "nope.json"), "sft")
    (tmp_path / "odd.json").write_text('[{"text": "hello"}]')
    with pytest.raises(DataError, match=r"odd.json: record 0: unrecognized format \(keys \['text'\]\)"):
        load(str(tmp_path / "odd.json"), "sft")
    (tmp_path / "obj.json").write_text('{"data": []}')
    with pytest.raises(DataError, match="obj.json: expected a JSON list of records"):
        load(str(tmp_path / "obj.json"), "sft")
    with pytest.raises(DataError, match="unknown type"):
        data.load_examples({"type": "csv", "path": "x"}, "sft")
    with pytest.raises(DataError, match="needs name: hh | shp | se"):
        data.load_examples({"type": "huggingface_dataset", "name": "imdb"}, "sft")


# --------------------------------------------------------------------------------------------------------------
# build_datasets and collate
# --------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def many_sft(tmp_path_factory):
    path = tmp_path_factory.mktemp("d") / "many.json"
    path.write_text(json.dumps([{"messages": [{"role": "user", "content": f"question {i}"},
                                              {"role": "assistant", "content": f"answer {i}"}]} for i in range(20)]))
    return {"type": "custom_dataset", "path": str(path)}


def test_build_datasets_split(example_tok, many_sft):
    build = lambda seed, n, ev=(): data.build_datasets([many_sft], list(ev), example_tok, "sft", 64, 32, n, seed)  # noqa
    tr1, ev1, st = build(0, 5)
    tr2, ev2, _ = build(0, 5)
    tr3, ev3, _ = build(1, 5)
    assert (tr1, ev1) == (tr2, ev2) and ev1 != ev3
    assert st == {"train": 15, "eval": 5, "truncated": 0, "skipped": 0, "dropped": 0}
    ids = lambda xs: sorted(tuple(x["input_ids"]) for x in xs)  # noqa: E731
    assert ids(tr1 + ev1) == ids(tr3 + ev3) and not set(ids(tr1)) & set(ids(ev1))
    tr, ev, st = build(0, 0)
    assert len(tr) == 20 and ev == [] and st["eval"] == 0
    eval_spec = {"type": "custom_dataset", "path": os.path.join(FIX, "sft_messages.json")}
    tr, ev, st = build(0, 1, [eval_spec])
    assert len(tr) == 20 and len(ev) == 1 and example_tok.decode(ev[0]["input_ids"]).count("You are terse.") == 1
    with pytest.raises(DataError, match="cannot hold out n_eval_examples=20"):
        build(0, 20)


def test_build_datasets_counts_truncated_and_skipped(example_tok):
    spec = {"type": "custom_dataset", "path": os.path.join(FIX, "dpo_seed.json")}
    # Prompts of 41 and 21 tokens, responses of 8-11: the first prompt is cut to 30 tokens, leaving no room.
    tr, ev, st = data.build_datasets([spec], [], example_tok, "preference", 30, 30, 0, 0)
    assert st["truncated"] == 1 and st["skipped"] == 1 and len(tr) == 1 and len(tr[0]["chosen_input_ids"]) == 29
    tr, ev, st = data.build_datasets([spec], [], example_tok, "preference", 24, 12, 0, 0)
    assert st["truncated"] == 2 and st["skipped"] == 0 and [len(x["prompt_input_ids"]) for x in tr] == [12, 12]
    tr, ev, st = data.build_datasets([spec], [], example_tok, "preference", 512, 256, 0, 0)
    assert st["truncated"] == st["skipped"] == 0 and len(tr) == 2


def test_tokenization_error_names_file_and_record(many_sft):
    with pytest.raises(DataError, match=r"many.json: record \d+: .*not prefix-consistent"):
        data.build_datasets([many_sft], [], make_tok(NOT_PREFIX), "sft", 64, 32, 0, 0)


def test_collate_padded(example_tok):
    pad = example_tok.pad_token_id
    sft = [data.tokenize_example({"messages": m}, example_tok, "sft", 512, 256)[0] for m in (CONV, CONV[1:3])]
    b = data.collate(sft, pad)
    T, P = len(sft[0]["input_ids"]), len(sft[0]["prompt_input_ids"])
    assert b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape == b["seq_ids"].shape == (2, T)
    n = len(sft[1]["input_ids"])
    assert b["input_ids"][1, n:].eq(pad).all() and b["labels"][1, n:].eq(-100).all()
    assert b["seq_ids"].tolist() == [[0] * T, [1] * n + [-1] * (T - n)]
    assert b["attention_mask"].sum(1).tolist() == [T, n] and b["attention_mask"].dtype == torch.long
    # segments of the flattened rows: sequence 0, sequence 1, then row 1's padding
    assert b["cu_seq_lens"].tolist() == [0, T, T + n, 2 * T] and b["cu_seq_lens"].dtype == torch.int32
    assert b["max_seq_len"] == T
    assert b["labels"][0, 1:].tolist() == sft[0]["labels"][1:] and "position_ids" not in b
    p1 = sft[1]["prompt_input_ids"]
    assert b["prompt_input_ids"].shape == (2, P) and b["prompt_input_ids"][1, P - len(p1):].tolist() == p1
    assert b["prompt_attention_mask"][1].tolist() == [0] * (P - len(p1)) + [1] * len(p1)
    pref = [data.tokenize_example(PREF, example_tok, "preference", 512, 256)[0]]
    b = data.collate(pref, pad)
    T = len(pref[0]["chosen_input_ids"])
    assert T > len(pref[0]["rejected_input_ids"])
    # chosen then rejected, one row each, one common length: ONE forward pass scores both
    assert b["input_ids"].shape == (2, T) and b["input_ids"][0].tolist() == pref[0]["chosen_input_ids"]
    assert b["input_ids"][1, :len(pref[0]["rejected_input_ids"])].tolist() == pref[0]["rejected_input_ids"]
    assert set(b) == {"input_ids", "labels", "seq_ids", "attention_mask", "prompt_input_ids", "prompt_attention_mask",
                      "cu_seq_lens", "max_seq_len"}
    pref[0]["reference_logps"] = (-3.5, -7.25)
    assert data.collate(pref, pad)["reference_logps"].tolist() == [-3.5, -7.25]  # chosen, then rejected


def test_best_fit_rows():
    # longest first: 7 opens row 0 (3 free), 6 row 1 (4 free), 5 row 2 (5 free); then each goes to the fullest row it
    # fits: 3 -> row 0 (0 free), 2 -> row 1 (2 free), 1 -> row 1 (1 free)
    assert data.best_fit_rows([7, 3, 6, 2, 5, 1], capacity=10) == [[0, 1], [2, 3, 5], [4]]
    assert data.best_fit_rows([12, 4], capacity=10) == [[0], [1]]  # too long for any row: a row of its own
    assert sorted(i for row in data.best_fit_rows(list(range(1, 30)), 40) for i in row) == list(range(29))


def test_collate_packed(example_tok):
    pad = example_tok.pad_token_id
    pref = [data.tokenize_example(PREF, example_tok, "preference", 512, 256)[0],
            data.tokenize_example({**PREF, "chosen": PREF["rejected"], "rejected": PREF["chosen"]}, example_tok,
                                  "preference", 512, 256)[0]]
    seqs = data.sequences_of(pref)  # chosen 0, chosen 1, rejected 0, rejected 1
    lengths = [len(ids) for ids, _ in seqs]
    capacity = lengths[0] + lengths[1] + 1
    b = data.collate(pref, pad, packing=True, max_length=capacity)
    assert "attention_mask" not in b and b["input_ids"].shape[1] <= capacity
    assert b["input_ids"].shape[0] == len(data.best_fit_rows(lengths, capacity)) < 4
    for i, (ids, labels) in enumerate(seqs):  # every sequence is there once, whole, with positions from 0
        where = b["seq_ids"] == i
        assert where.sum() == len(ids) and b["input_ids"][where].tolist() == ids
        assert b["position_ids"][where].tolist() == list(range(len(ids)))
        assert b["labels"][where].tolist() == [-100] + labels[1:]  # the first token is never a target
    real = b["seq_ids"] >= 0
    assert real.sum() == sum(lengths) and b["labels"][~real].eq(-100).all() and b["input_ids"][~real].eq(pad).all()
    for row in range(b["input_ids"].shape[0]):  # the padding at a row's end restarts at 0 as well
        n = int(real[row].sum())
        assert b["position_ids"][row, n:].tolist() == list(range(b["input_ids"].shape[1] - n))
    segments = []  # each row's sequences in packing order, then its padding, if any
    for row in data.best_fit_rows(lengths, capacity):
        segments += [lengths[i] for i in row] + [b["input_ids"].shape[1] - sum(lengths[i] for i in row)]
    segments = [n for n in segments if n]
    assert b["cu_seq_lens"].tolist() == [sum(segments[:i]) for i in range(len(segments) + 1)]
    assert b["max_seq_len"] == max(segments)
    rounded = data.collate(pref, pad, packing=True, max_length=capacity, pad_to_multiple_of=64)
    assert rounded["input_ids"].shape[1] == 64 * -(-b["input_ids"].shape[1] // 64)
    assert torch.equal(rounded["seq_ids"][:, :b["input_ids"].shape[1]], b["seq_ids"]) and rounded["seq_ids"].min() == -1
    assert data.collate(pref, pad, pad_to_multiple_of=64)["attention_mask"].shape == (4, 64 * -(-max(lengths) // 64))


# --------------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------------
def test_cli_check(tmp_path, capsys):
    assert data.main(["check", os.path.join(FIX, "dpo_seed.json"), "--max-length", "30", "--max-prompt-length", "30"]) == 0
    out = capsys.readouterr().out
    assert "2 records" in out and "kind preference" in out and "prompt+chosen" in out and "p90" in out
    assert "1 truncated, 1 skipped" in out
    assert data.main(["check", os.path.join(FIX, "hh_raw.jsonl"), "--loss", "sft"]) == 0
    assert "2 records (1 dropped), format Anthropic HH, kind sft" in capsys.readouterr().out
    bad = tmp_path / "bad.json"
    bad.write_text("[{")
    assert data.main(["check", str(bad)]) == 2
    assert capsys.readouterr().err == f"error: {bad}: invalid JSON at line 1 column 3: Expecting property name enclosed in double quotes\n"
    bad.write_text(json.dumps([GOOD_PREF, {**GOOD_PREF, "chosen": None}]))
    assert_one_line_error(run_cli("data.py", "check", str(bad)), "bad.json: record 1: field 'chosen': missing")


def test_cli_convert_round_trip(tmp_path):
    out_dpo, out_sft = str(tmp_path / "dpo.json"), str(tmp_path / "sft.jsonl")
    trl = os.path.join(FIX, "dpo_trl.jsonl")
    assert data.main(["convert", trl, out_dpo, "--to", "dpo"]) == 0
    rows = json.load(open(out_dpo))
    assert rows[1] == {"conversations": [{"from": "system", "value": "Be kind."}, {"from": "human", "value": "Spell cat."}],
                       "chosen": {"from": "gpt", "value": "C-A-T."}, "rejected": {"from": "gpt", "value": "Dog."}}
    assert load(out_dpo, "preference") == load("dpo_trl.jsonl", "preference")
    assert data.main(["convert", out_dpo, out_sft, "--to", "sft"]) == 0
    assert load(out_sft, "sft") == [{"messages": r["prompt"] + r["chosen"]} for r in load("dpo_trl.jsonl", "preference")]
    assert json.loads(open(out_sft).readline()) == {"messages": [{"role": "user", "content": "Is 7 larger than 5?"},
                                                                 {"role": "assistant", "content": "Yes, 7 is larger than 5."}]}
    assert sorted(os.listdir(tmp_path)) == ["dpo.json", "sft.jsonl"]  # no temp files left
    proc = run_cli("data.py", "convert", out_sft, str(tmp_path / "x.json"), "--to", "dpo")
    assert_one_line_error(proc, "sft.jsonl", "no rejected")
    assert not os.path.exists(tmp_path / "x.json")
    before = open(out_dpo).read()
    assert data.main(["convert", out_dpo, out_dpo, "--to", "dpo"]) == 2 and open(out_dpo).read() == before

