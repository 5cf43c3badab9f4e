"""Train the small byte-level BPE tokenizer used by the examples and tests.

Run from the repository root, after generating the demo data::

    python example/make_demo_data.py && python example/make_tokenizer.py

The tokenizer is trained with the ``tokenizers`` library on the project's own text. By default that is
the demo data (``example/data/*.json``) plus the ``*.md`` / ``*.py`` files in ``example/``, so the result
is deterministic and does not change when unrelated files elsewhere in the repository are edited;
``--all-repo-text`` adds every ``*.md`` / ``*.py`` file of the repository (hidden folders, ``.venv`` and
build/output folders skipped; files read in sorted order).
It is wrapped in ``transformers.PreTrainedTokenizerFast`` with

* special tokens ``<|endoftext|>`` (pad), ``<|im_start|>``, ``<|im_end|>`` (eos), no bos token;
* a ChatML chat template in which each assistant message's content *and* its ``<|im_end|>`` sit inside
  ``{% generation %}...{% endgeneration %}``, so ``return_assistant_tokens_mask=True`` labels exactly the
  assistant content plus its end-of-turn token;

and saved with ``save_pretrained`` to ``example/tokenizer/``. The script then reloads it with
``AutoTokenizer`` and checks the round trip and the assistant mask.
"""

from __future__ import annotations

import argparse
import json
import os

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
SKIP_DIRS = {"venv", "node_modules", "outputs", "runs", "wandb", "__pycache__", "build", "dist"}

# ChatML. The assistant content and its <|im_end|> are inside {% generation %} so they are labelled;
# the role header "<|im_start|>assistant\n" and the newline after <|im_end|> are not.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def corpus_files(root: str, data_dir: str, all_repo_text: bool = False) -> list[str]:
    files = [os.path.join(data_dir, n) for n in sorted(os.listdir(data_dir)) if n.endswith(".json")]
    for dirpath, dirnames, filenames in os.walk(root if all_repo_text else HERE):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in SKIP_DIRS)
        files += [os.path.join(dirpath, n) for n in sorted(filenames) if n.endswith((".md", ".py"))]
    return files


def iter_texts(files: list[str]):
    for path in files:
        if path.endswith(".json"):
            # Feed the natural-language strings, not the JSON syntax.
            with open(path, encoding="utf-8") as f:
                for rec in json.load(f):
                    if "messages" in rec or "prompt" in rec:  # SFT conversations, online prompts (messages)
                        yield "\n".join(m["content"] for m in rec.get("messages") or rec["prompt"])
                    else:
                        turns = rec["conversations"] + [rec["chosen"], rec["rejected"]]
                        yield "\n".join(t["value"] for t in turns)
        else:
            with open(path, encoding="utf-8", errors="replace") as f:
                yield f.read()


def train(files: list[str], vocab_size: int) -> Tokenizer:
    return train_texts(iter_texts(files), vocab_size)


def train_texts(texts, vocab_size: int) -> Tokenizer:
    """A byte-level BPE tokenizer of at most vocab_size tokens trained on an iterable of strings (fewer when the text
    runs out of pairs to merge)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # trim_offsets=False keeps character offsets exact, which the assistant-mask computation relies on.
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def wrap(tok: Tokenizer):
    """The trained tokenizer as transformers' PreTrainedTokenizerFast, with the special tokens and the chat template
    described above (save it with save_pretrained)."""
    from transformers import PreTrainedTokenizerFast

    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
        model_max_length=2048,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    hf_tok.chat_template = CHAT_TEMPLATE
    return hf_tok


def check(out_dir: str) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out_dir)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>" and tok.bos_token is None
    text = "Sure! 7 + 5 = 12. Hope that helps."
    assert tok.decode(tok(text)["input_ids"]) == text

    msgs = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is 7 + 5?"},
        {"role": "assistant", "content": "Sure! 7 + 5 = 12."},
        {"role": "user", "content": "Spell 'lemon' backwards."},
        {"role": "assistant", "content": "'lemon' spelled backwards is 'nomel'."},
    ]
    out = tok.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    labelled = [i for i, m in zip(ids, mask) if m]
    expected = "Sure! 7 + 5 = 12.<|im_end|>'lemon' spelled backwards is 'nomel'.<|im_end|>"
    assert tok.decode(labelled) == expected, tok.decode(labelled)
    # Exactly those tokens: the labelled spans are the tokenisation of content + <|im_end|>.
    exp_ids = sum((tok(m["content"] + "<|im_end|>")["input_ids"] for m in msgs if m["role"] == "assistant"), [])
    assert labelled == exp_ids
    prompt = tok.apply_chat_template(msgs[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n"), prompt
    print(f"check ok: vocab {len(tok)}, {len(ids)} chat tokens, {sum(mask)} assistant tokens")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=os.path.join(HERE, "data"))
    ap.add_argument("--out-dir", default=os.path.join(HERE, "tokenizer"))
    ap.add_argument("--vocab-size", type=int, default=2048)
    ap.add_argument("--all-repo-text", action="store_true", help="also train on every *.md / *.py of the repo")
    args = ap.parse_args()

    files = corpus_files(ROOT, args.data_dir, args.all_repo_text)
    print("training on:", ", ".join(os.path.relpath(p, ROOT) for p in files))
    hf_tok = wrap(train(files, args.vocab_size))
    hf_tok.save_pretrained(args.out_dir)
    print(f"saved tokenizer (vocab {len(hf_tok)}) to {os.path.relpath(args.out_dir, ROOT)}")
    check(args.out_dir)


if __name__ == "__main__":
    main()
