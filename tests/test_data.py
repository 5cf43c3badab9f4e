"""Tests for data.py: formats and validation, assistant-only labels, truncation, splitting, collate, CLI."""
import copy
import json
import os

import pytest
import torch
from conftest import ROOT, TOKENIZER, assert_one_line_error, run_cli

import batching
import data
import formats
from formats import DataError

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


# A response starting with whitespace: the example tokenizer (byte-level BPE) merges the template's "\n" after
# "<|im_start|>assistant" with it ("\n\n", "\n " are single tokens), as SmolLM2's and Qwen's do.
WHITESPACE_STARTS = ["\n\nHi there.", "  Hi there.", " \nHi there.", "\n\n\nHi there."]
GEN_PROMPT_DIFFERS = CHATML_PLAIN.replace("'<|im_start|>assistant\\n' }}{%- endif",  # "\n\n" after it, not "\n"
                                          "'<|im_start|>assistant\\n\\n' }}{%- endif")


@pytest.fixture(scope="module")
def plain_tok():
    """The example tokenizer with a ChatML template without {% generation %} markers (SmolLM2's, say)."""
    from transformers import AutoTokenizer
    tok = data.prepare_tokenizer(AutoTokenizer.from_pretrained(TOKENIZER))
    tok.chat_template = CHATML_PLAIN
    return tok


def common_prefix(a, b):
    return next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


@pytest.mark.parametrize("response", WHITESPACE_STARTS)
@pytest.mark.parametrize("template", ["plain", "markers"])
def test_response_whitespace_merging_with_the_template(example_tok, plain_tok, template, response):
    tok = plain_tok if template == "plain" else example_tok
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": response}]
    prompt, ids = enc(tok, "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n"), \
        enc(tok, f"<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n{response}<|im_end|>\n")
    n = common_prefix(prompt, ids)
    assert n == len(prompt) - 1  # the tokenizer does merge: the rendered prompt is no token prefix
    notes = set()
    out, _ = data.tokenize_example({"messages": msgs}, tok, "sft", 512, 256, notes)
    assert out["input_ids"] == ids and notes == ({"merged"} if template == "plain" else set())
    # Labelled: exactly the tokens after the common prefix, up to the end-of-turn token (the merged one included).
    assert out["labels"] == [-100] * n + ids[n:-1] + [-100]
    assert tok.decode(ids[n:-1]) == "\n" + response + "<|im_end|>"
    # Preference: only chosen merges; the sequences start with what both sides share (a true prefix of each), while
    # sampling continues the whole generation prompt, its final "\n" included
    pref = {"prompt": msgs[:1], "chosen": msgs[1:], "rejected": [{"role": "assistant", "content": "No."}]}
    notes = set()
    out, _ = data.tokenize_example(pref, tok, "preference", 512, 256, notes)
    assert out["prompt_input_ids"] == prompt and notes == {"merged"}
    assert out["chosen_labels"][:n] == [-100] * n and out["rejected_input_ids"][:n] == prompt[:n]
    assert out["chosen_input_ids"] == ids and out["chosen_labels"] == [-100] * n + ids[n:-1] + [-100]
    rejected = enc(tok, "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\nNo.<|im_end|>\n")
    assert out["rejected_input_ids"] == rejected and rejected[:len(prompt)] == prompt
    assert out["rejected_labels"] == [-100] * len(prompt) + rejected[len(prompt):-1] + [-100]  # not the "\n"


def test_whitespace_merge_in_a_middle_turn(plain_tok, example_tok):
    conv = [*CONV[:2], {"role": "assistant", "content": "\n\n4."}, *CONV[3:]]
    outs = [data.tokenize_example({"messages": conv}, tok, "sft", 512, 256)[0] for tok in (plain_tok, example_tok)]
    assert outs[0] == outs[1]
    assert [plain_tok.decode(r) for r in runs(outs[0]["labels"])] == ["\n\n\n4.<|im_end|>", "It is 6.<|im_end|>"]


def test_whitespace_merge_warning_counts_records(tmp_path, plain_tok, capsys):
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": r}]}
            for i, r in enumerate(WHITESPACE_STARTS[:3] + ["plain", "text"])]
    path = tmp_path / "ws.json"
    path.write_text(json.dumps(rows))
    spec = {"type": "custom_dataset", "path": str(path)}
    tr, ev, st = data.build_datasets([spec], [], plain_tok, "sft", 512, 256, 1, 0)
    assert len(tr) + len(ev) == 5 and st["warnings"] == [
        "warning: 3 records: the response's first tokens merge with the chat template's (e.g. a response starting "
        "with whitespace); split at the longest common token prefix"]
    # make_tok merges no whitespace: no warning
    assert "warnings" not in data.build_datasets([spec], [], make_tok(CHATML_PLAIN), "sft", 512, 256, 0, 0)[2]
    plain_tok.save_pretrained(tmp_path / "tok")
    assert data.main(["check", str(path), "--tokenizer", str(tmp_path / "tok")]) == 0
    assert capsys.readouterr().err == st["warnings"][0] + "\n"


def test_inconsistent_templates_still_fail(plain_tok):
    """Not a merge: the generation prompt's text is not what the conversation renders ("\n\n" vs "\n")."""
    tok = copy.copy(plain_tok)
    tok.chat_template = GEN_PROMPT_DIFFERS
    assert GEN_PROMPT_DIFFERS != CHATML_PLAIN
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "Hi."}]
    for ex, kind in (({"messages": msgs}, "sft"), ({"prompt": msgs[:1], "chosen": msgs[1:], "rejected": msgs[1:]},
                                                   "preference")):
        with pytest.raises(DataError, match="not prefix-consistent"):
            data.tokenize_example(ex, tok, kind, 512, 256)
    # The text is consistent, but the tokens differ before the prompt's last MERGE_WINDOW tokens.
    with pytest.raises(DataError, match="not prefix-consistent"):
        data._split(tok, ("ab", [1, 2, 3, 4, 5, 6]), [1, 7, 8, 9, 10, 11, 12], lambda: "abc", "x", set())
    assert data._split(tok, ("ab", [1, 2, 3, 4, 5, 6]), [1, 2, 8, 9, 10, 11], lambda: "abc", "x", set()) == 2


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
    return formats.load_examples({"type": "custom_dataset", "path": os.path.join(FIX, name), **spec}, kind)


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
    records, _, dropped, _ = formats.load_records(spec, "preference")
    assert dropped == 1  # empty final response
    assert records == [
        pair("What color is the sky on a clear day?", "It is blue.", "Purple, always."),
        pair(None, "A pear.", "No.", prompt=[{"role": "user", "content": "Name a fruit."},
                                             {"role": "assistant", "content": "An apple."},
                                             {"role": "user", "content": "Another one?"}])]
    assert load("hh_raw.jsonl", "preference") == records  # auto-detected as a custom file too
    sft = formats.load_examples(spec, "sft")
    assert sft[1] == {"messages": records[1]["prompt"] + [{"role": "assistant", "content": "A pear."}]}


def test_shp_parser():
    spec = {"type": "huggingface_dataset", "name": "shp", "path": os.path.join(FIX, "shp_raw.jsonl")}
    records, _, dropped, _ = formats.load_records(spec, "preference")
    assert dropped == 1  # score ratio 10/8 < 2
    assert records == [pair("How long should I boil an egg?", "About nine minutes for a firm yolk.", "Until it explodes."),
                       pair("Is cast iron hard to clean?", "No, hot water and a brush do it.", "Yes, impossible.")]
    with pytest.raises(DataError, match="preference-only"):
        formats.load_examples(spec, "sft")


def test_se_parser_and_folder_split(tmp_path):
    spec = {"type": "huggingface_dataset", "name": "se", "path": os.path.join(FIX, "se_raw.jsonl")}
    records, _, dropped, _ = formats.load_records(spec, "preference")
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
    assert formats.load_examples({**spec, "path": str(tmp_path)}, "preference") == records


def test_parquet_via_datasets(tmp_path):
    import datasets
    rows = [json.loads(l) for l in open(os.path.join(FIX, "dpo_trl.jsonl"))][:1]
    path = str(tmp_path / "d.parquet")
    datasets.Dataset.from_list(rows).to_parquet(path)
    assert formats.load_examples({"type": "custom_dataset", "path": path}, "preference") == \
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
    assert len(formats.load_examples(spec, "preference")) == 4
    assert formats.load_examples({**spec, "split": "test"}, "preference") == [load("hh_raw.jsonl", "preference")[0]] * 2


def test_hub_id_offline_is_data_error():
    """HF_HUB_OFFLINE=1 (conftest): refused at once, saying so; and without it, where the hub cannot be reached here,
    within seconds (a probe, not the library's minute of retries)."""
    for spec in ({"type": "custom_dataset", "path": "someone/somedata"}, {"type": "huggingface_dataset", "name": "hh"}):
        with pytest.raises(DataError, match=r"\[train\]: cannot load: .*HF_HUB_OFFLINE=1 is set"):
            formats.load_examples(spec, "preference")
    script = ("import formats, time; t = time.time()\ntry: formats.load_examples({'type': 'huggingface_dataset', 'name': 'hh'}, "
              "'preference')\nexcept formats.DataError as e: print(round(time.time() - t), e)")
    env = {k: "" for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")}
    proc = run_cli("-c", script, env={**env, "HF_ENDPOINT": "http://127.0.0.1:9"}, timeout=60)  # a closed port
    seconds, message = proc.stdout.split(" ", 1)
    assert int(seconds) <= 5 and "Anthropic/hh-rlhf [train]: cannot load" in message and "cannot be reached" in message


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
    (GOOD_PREF, {**GOOD_PREF, "rejected": {"from": "human", "value": "x"}},
     "field 'rejected.from': the response must be 'gpt', got 'human'"),  # as written, not normalized ('user')
    (GOOD_PREF, {**GOOD_PREF, "chosen": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "x"}]},
     "field 'chosen[1].from': the response must be 'gpt', got 'human'"),
    (GOOD_PREF, {**GOOD_PREF, "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
     "field 'conversations': the prompt must end with a user message, got 'gpt'"),
    (GOOD_SFT, {"messages": [{"role": "assistant", "content": "Hello!"}, *GOOD_SFT["messages"]]},
     "field 'messages[0]': the conversation starts with an assistant message"),
    (GOOD_SFT, {"messages": [{"role": "user", "content": "a\ud800b"}, GOOD_SFT["messages"][1]]},
     "field 'messages[0].content': invalid text: lone surrogate '\\ud800' at character 1"),
    (GOOD_PREF, {**GOOD_PREF, "chosen": {"from": "gpt", "value": "\udfff"}},
     "field 'chosen.value': invalid text: lone surrogate"),
    ({"prompt": "q", "chosen": "a", "rejected": "b"}, {"chosen": "a", "rejected": "b"}, "field 'prompt': missing"),
    (GOOD_SFT, {"messages": [{"role": "user", "content": "q"}]}, "field 'messages': no assistant message"),
    (GOOD_SFT, {"messages": "hello"}, "field 'messages': must be a list"),
    (GOOD_SFT, {"conversations": [{"from": "human", "value": "q"}]}, "one format per file"),
    (GOOD_SFT, ["not", "a", "dict"], "expected a JSON object"),
    ({"prompt": "q", "chosen": "a", "rejected": "b"}, {"prompt": "q", "chosen": "a"}, "field 'rejected': missing"),
    ({"prompt": "q", "chosen": "a", "rejected": "b"}, {"prompt": "q", "chosen": "a", "rejected": "b", "margin": "1"},
     "field 'margin': must be a number, got str"),
    ({"prompt": "q", "chosen": "a", "rejected": "b"}, {"prompt": "q", "chosen": "a", "rejected": "b",
                                                       "margin": float("nan")}, "field 'margin': must be a finite"),
]


def test_a_pair_margin_reaches_the_batch(tmp_path, example_tok):
    """A pair's own `margin` (reward_model, as TRL's RewardTrainer takes it) rides along to the batch; pairs of the
    same file without one get 0."""
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps([{"prompt": "q", "chosen": "a", "rejected": "b", "margin": 2},
                                {"prompt": "r", "chosen": "c", "rejected": "d"}]))
    records = formats.load_examples({"type": "custom_dataset", "path": str(path)}, "preference")
    assert [r.get("margin") for r in records] == [2, None]
    examples = [data.tokenize_example(r, example_tok, "preference", 64, 32)[0] for r in records]
    batch = data.collate(examples, example_tok.pad_token_id)
    assert batch["margin"].tolist() == [2.0, 0.0]


@pytest.mark.parametrize("good,bad,needle", BAD)
def test_bad_records_name_file_record_and_field(tmp_path, good, bad, needle):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([good, good, good, bad]))
    with pytest.raises(DataError) as e:
        formats.load_examples({"type": "custom_dataset", "path": str(path)}, "sft" if "messages" in good else "preference")
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
        formats.load_examples({"type": "csv", "path": "x"}, "sft")
    with pytest.raises(DataError, match="needs name: hh | shp | se"):
        formats.load_examples({"type": "huggingface_dataset", "name": "imdb"}, "sft")


def message(fn):
    with pytest.raises(DataError) as e:
        fn()
    assert "\n" not in str(e.value)
    return str(e.value)


@pytest.mark.parametrize("name", ["b.json", "b.jsonl", "b.json.gz"])
def test_utf8_bom_is_read(tmp_path, name):
    import gzip
    path = tmp_path / name
    text = json.dumps(GOOD_SFT) + "\n" if name == "b.jsonl" else json.dumps([GOOD_SFT])
    with (gzip.open if name.endswith(".gz") else open)(path, "wb") as f:
        f.write(b"\xef\xbb\xbf" + text.encode())
    assert load(str(path), "sft") == [GOOD_SFT]


def test_corrupt_gzip_is_one_line_error(tmp_path):
    import gzip
    blob = gzip.compress(json.dumps([GOOD_SFT] * 50).encode())
    for name, content, what in (("garbage", blob[:10] + b"\x00not deflate data" * 5, "error"),
                                ("truncated", blob[:-12], "EOFError"), ("plain", b"[]", "BadGzipFile")):
        path = tmp_path / f"{name}.json.gz"
        path.write_bytes(content)
        assert message(lambda: load(str(path), "sft")).startswith(f"{path}: cannot read: {what}")


def test_deeply_nested_json_is_one_line_error(tmp_path):
    for name, text in (("deep.json", "[" * 100000), ("deep.jsonl", json.dumps(GOOD_SFT) + "\n" + "[" * 100000)):
        (tmp_path / name).write_text(text)
        assert message(lambda: load(str(tmp_path / name), "sft")) == \
            f"{tmp_path / name}: invalid JSON: nested too deeply for Python's parser"


def test_json_error_messages_are_complete(tmp_path):
    path = tmp_path / "u.json"
    path.write_text('[\n {"messages": "abc')
    assert message(lambda: load(str(path), "sft")) == \
        f"{path}: invalid JSON at line 2 column 15: Unterminated string starting at line 2 column 15"
    path = tmp_path / "u.jsonl"
    path.write_text(json.dumps(GOOD_SFT) + '\n{"a": "x\ty"}\n')
    assert message(lambda: load(str(path), "sft")) == \
        f"{path}: invalid JSON at line 2 column 9: Invalid control character at line 2 column 9"


def test_format_detection_needs_the_signature_keys(tmp_path):
    import datasets
    path = str(tmp_path / "odd.parquet")
    datasets.Dataset.from_list([{"question_text": "q", "answer": "a"}]).to_parquet(path)
    msg = message(lambda: formats.load_examples({"type": "custom_dataset", "path": path}, "preference"))
    assert msg.startswith(f"{path}: record 0: unrecognized format (keys ['answer', 'question_text']); expected the "
                          "keys of one of: messages (SFT): messages; ")
    assert "stack-exchange-preferences: question, answers; Anthropic HH: chosen, rejected" in msg
    (tmp_path / "q.json").write_text('[{"question": "q"}]')  # shared a key with se: once taken for se
    assert "unrecognized format (keys ['question'])" in message(lambda: load(str(tmp_path / "q.json"), "preference"))
    # Record 1 of another format: "one format per file"; one that lacks keys of record 0's format is parsed as that.
    share = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    (tmp_path / "m.json").write_text(json.dumps([share, GOOD_PREF]))
    assert "record 1: format conversations/chosen/rejected (preference) but record 0 is conversations (ShareGPT SFT)" \
        in message(lambda: formats.load_records({"type": "custom_dataset", "path": str(tmp_path / "m.json")}, None))
    (tmp_path / "p.json").write_text(json.dumps([GOOD_PREF, {"conversations": share["conversations"][:1]}]))
    assert message(lambda: load(str(tmp_path / "p.json"), "preference")).endswith("record 1: field 'chosen': missing")


def test_conversation_starting_with_assistant_names_file_record_field(tmp_path, example_tok):
    rows = [{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
            {"conversations": [{"from": "gpt", "value": "Hello!"}, {"from": "human", "value": "hi"},
                               {"from": "gpt", "value": "yo"}]}]
    path = tmp_path / "a.json"
    path.write_text(json.dumps(rows))
    spec = {"type": "custom_dataset", "path": str(path)}
    assert message(lambda: data.build_datasets([spec], [], example_tok, "sft", 64, 32, 0, 0)) == \
        f"{path}: record 1: field 'conversations[0]': the conversation starts with an assistant message; put a user " \
        "(or system) message before it"
    system_first = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "assistant", "content": "Hi."}]}
    out, _ = data.tokenize_example(formats.PARSERS["messages"](system_first)[0], example_tok, "sft", 64, 32)
    assert [example_tok.decode(r) for r in runs(out["labels"])] == ["Hi.<|im_end|>"]


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
    tr, ev, st = build(0, 10)  # half of the records: held out as asked
    assert (len(tr), len(ev)) == (10, 10) and "warnings" not in st


@pytest.mark.parametrize("n_eval", [11, 20, 256])
def test_n_eval_examples_beyond_what_the_data_can_spare(example_tok, many_sft, n_eval):
    tr, ev, st = data.build_datasets([many_sft], [], example_tok, "sft", 64, 32, n_eval, 0)
    assert (len(tr), len(ev)) == (18, 2) and st["warnings"] == [  # 10% of the 20 records
        f"warning: n_eval_examples={n_eval} but the data has only 20 records: holding out 2 for evaluation "
        "(set n_eval_examples or eval_datasets)"]
    assert ev == data.build_datasets([many_sft], [], example_tok, "sft", 64, 32, 2, 0)[1]  # the same 2


def test_held_out_rule():
    assert [data._held_out(256, n)[0] for n in (1, 2, 3, 19, 20, 39, 40, 500, 511)] == [0, 1, 1, 1, 2, 3, 4, 50, 51]
    assert data._held_out(256, 512) == (256, None) and data._held_out(0, 1) == (0, None)
    assert data._held_out(5, 1)[1].startswith("warning: n_eval_examples=5 but the data has only 1 records: holding "
                                              "out 0")


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
                      "cu_seq_lens", "max_seq_len", "n_seqs"}
    assert b["n_seqs"] == 2
    pref[0]["reference_logps"] = (-3.5, -7.25)
    assert data.collate(pref, pad)["reference_logps"].tolist() == [-3.5, -7.25]  # chosen, then rejected


def test_best_fit_rows():
    # best-fit decreasing needs 3 rows (7 + 3, 6 + 2 + 1, 5: the longest 10 tokens); the same 3 rows evened out, longest
    # first into the emptiest row: 7 -> row 0, 6 -> row 1, 5 -> row 2, 3 -> row 2, 2 -> row 1, 1 -> row 0: 8 tokens each
    assert batching.best_fit_rows([7, 3, 6, 2, 5, 1], capacity=10) == [[0, 5], [2, 3], [4, 1]]
    assert batching.best_fit_rows([12, 4], capacity=10) == [[0], [1]]  # too long for any row: a row of its own
    # 2 rows (5 + 5, 4 + 3 + 3); evened out, 5 + 4 and 5 + 3 + 3 = 11 would not fit: best-fit's rows
    assert batching.best_fit_rows([5, 5, 4, 3, 3], capacity=10) == [[0, 1], [2, 3, 4]]
    lengths = list(range(1, 30))  # 435 tokens: best-fit's 11 rows of up to 40, evened out to 39 or 40 tokens
    rows = batching.best_fit_rows(lengths, 40)
    assert sorted(i for row in rows for i in row) == list(range(29)) and len(rows) == 11
    assert max(sum(lengths[i] for i in row) for row in rows) == 40 > 435 / 11
    lengths = [300, 250, 200, 120, 90, 60, 40]  # rows of 512: best-fit 500, 500, 60 tokens -> 360, 340, 360
    assert batching.best_fit_rows(lengths, 512) == [[0, 5], [1, 4], [2, 3, 6]]


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
    assert b["input_ids"].shape[0] == len(batching.best_fit_rows(lengths, capacity)) < 4
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
    for row in batching.best_fit_rows(lengths, capacity):
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
    assert data.main(["check", os.path.join(FIX, "dpo_seed.json"), "--max-length", "100"]) == 0
    assert "at max_length 100, max_prompt_length 50:" in capsys.readouterr().out  # half, as train.py's default
    bad = tmp_path / "bad.json"
    bad.write_text("[{")
    assert data.main(["check", str(bad)]) == 2
    assert capsys.readouterr().err == f"error: {bad}: invalid JSON at line 1 column 3: Expecting property name enclosed in double quotes\n"
    bad.write_text(json.dumps([GOOD_PREF, {**GOOD_PREF, "chosen": None}]))
    assert_one_line_error(run_cli("data.py", "check", str(bad)), "bad.json: record 1: field 'chosen': missing")


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_cli_convert_output_gets_umask_permissions(tmp_path, umask):
    out = tmp_path / "out.json"
    old = os.umask(umask)
    try:
        assert data.main(["convert", os.path.join(FIX, "dpo_trl.jsonl"), str(out), "--to", "dpo"]) == 0
        assert os.stat(out).st_mode & 0o777 == 0o666 & ~umask
        os.chmod(out, 0o640)  # an existing OUT keeps its mode, as with open(OUT, "w")
        assert data.main(["convert", os.path.join(FIX, "dpo_trl.jsonl"), str(out), "--to", "dpo"]) == 0
        assert os.stat(out).st_mode & 0o777 == 0o640
    finally:
        os.umask(old)


def test_readme_data_tool_commands_work(tmp_path, monkeypatch, capsys):
    """The `python data.py` blocks of the READMEs ("your own data") and of the data page (docs/data.md) work, and each
    language shows the same commands."""
    import re
    import shlex
    import shutil
    commands = []
    for pair in (("README.md", "README_zh.md"), ("docs/data.md", "docs/zh/data.md")):
        blocks = [re.search(r"```bash\n(python data.py.*?)```", open(os.path.join(ROOT, name), encoding="utf-8").read(),
                            re.S).group(1) for name in pair]
        lines = [[shlex.split(line, comments=True) for line in block.splitlines()] for block in blocks]
        assert lines[0] == lines[1], pair
        commands += lines[0]
    shutil.copy(os.path.join(FIX, "dpo_seed.json"), tmp_path / "my_pairs.json")  # the placeholders' kinds of data
    shutil.copy(os.path.join(FIX, "dpo_trl.jsonl"), tmp_path / "trl_pairs.jsonl")
    monkeypatch.chdir(tmp_path)
    for args in commands:
        assert args[:2] == ["python", "data.py"]
        args = [os.path.join(ROOT, a) if a.startswith("example/") else a for a in args[2:]]
        assert data.main(args) == 0, (args, capsys.readouterr().err)
    assert load(str(tmp_path / "pairs.json"), "preference") == load("dpo_trl.jsonl", "preference")


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



def test_cli_convert_keeps_a_pairs_margin(tmp_path):
    """A preference pair's own margin (reward_model) survives convert --to dpo; pairs without one get none."""
    src, out = tmp_path / "pairs.jsonl", str(tmp_path / "dpo.json")
    rows = [json.loads(line) for line in open(os.path.join(FIX, "dpo_trl.jsonl"))]
    rows[0]["margin"] = 2.5
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert data.main(["convert", str(src), out, "--to", "dpo"]) == 0
    converted = json.load(open(out))
    assert converted[0]["margin"] == 2.5 and all("margin" not in r for r in converted[1:])
    assert [r.get("margin") for r in load(out, "preference")] == [2.5] + [None] * (len(rows) - 1)


def test_cli_convert_gz_output_is_gzip(tmp_path, capsys):
    """OUT.json.gz / OUT.jsonl.gz are gzip files (what train.py reads back by that name); another ending is refused."""
    import gzip
    trl = os.path.join(FIX, "dpo_trl.jsonl")
    for name in ("pairs.json.gz", "pairs.jsonl.gz"):
        out = str(tmp_path / name)
        assert data.main(["convert", trl, out, "--to", "dpo"]) == 0
        assert open(out, "rb").read(2) == b"\x1f\x8b"  # the gzip magic
        text = gzip.open(out, "rt", encoding="utf-8").read()
        n = len(load("dpo_trl.jsonl", "preference"))
        assert (len(text.splitlines()) == n) == name.endswith(".jsonl.gz")  # a line a record / one indented list
        assert load(out, "preference") == load("dpo_trl.jsonl", "preference")
    assert data.main(["convert", trl, str(tmp_path / "pairs.parquet"), "--to", "dpo"]) == 2
    assert "pairs.parquet: OUT must end with .json, .jsonl, .json.gz, .jsonl.gz" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["pairs.json.gz", "pairs.jsonl.gz"]
