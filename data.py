"""Datasets for SFT, preference (DPO/IPO), unpaired (KTO) and prompt (online RL) training: tokenize, truncate, split,
collate, and the `check` / `convert` CLI. The records come from formats.load_records (the formats, their detection
and validation).

Tokenization goes through the tokenizer's chat template (DEFAULT_CHAT_TEMPLATE when it has none). Labels are the
token ids on assistant tokens (content + end-of-turn token) and -100 everywhere else; the assistant mask comes from
the template's {% generation %} markers, or else from prefix-consistent incremental rendering (where a response's
first tokens merge with the template's, at the longest common token prefix: _split).

CLI:  python data.py check FILE [--loss sft|dpo|kto|grpo|...] [--tokenizer DIR] [--max-length N] [--max-prompt-length N]
      python data.py convert IN OUT --to sft|dpo|kto|prompts
"""
from __future__ import annotations

import argparse
import gzip
import io
import json
import math
import os
import random
import re
import stat
import sys
import tempfile

from formats import FORMAT_NAMES, KINDS, UNPAIRED_FORMATS, DataError, load_records, own_kind, prompt_row, seed_row

ROOT = os.path.dirname(os.path.abspath(__file__))

# ChatML-style text. Assistant content + eos_token sit inside {% generation %} so exactly they are labelled (the
# model learns to stop); other turns end with the literal text '<|im_end|>' (eos_token for ChatML tokenizers).
# The tokenizer's bos_token, if any, is rendered once at the start (text is tokenized without special tokens).
DEFAULT_CHAT_TEMPLATE = (
    "{%- if bos_token %}{{- bos_token }}{%- endif %}"
    "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{%- generation %}{{- message['content'] + eos_token }}{%- endgeneration %}"
    "{%- else %}{{- message['content'] + '<|im_end|>' }}{%- endif %}{{- '\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
_GENERATION_RE = re.compile(r"{%-?\s*generation\s*-?%}")


# --- Tokenization ------------------------------------------------------------------------------------------------
def prepare_tokenizer(tokenizer):
    """Sets DEFAULT_CHAT_TEMPLATE when the tokenizer has no chat template and pad_token = eos_token when it has no
    pad token (collate pads explicitly, so padding_side does not matter). Returns the tokenizer."""
    if tokenizer.eos_token is None and (tokenizer.chat_template is None or tokenizer.pad_token is None):
        raise DataError(f"tokenizer {tokenizer.name_or_path!r}: has no eos_token; set one (e.g. in tokenizer_config.json)")
    if tokenizer.chat_template is None:
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _render(tok, messages, add_generation_prompt):  # -> (text, token ids)
    # The text already holds every special token the template wants (e.g. bos_token): no doubled BOS.
    try:
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # jinja errors raised by templates, e.g. "roles must alternate"
        raise DataError(f"chat template of tokenizer {tok.name_or_path!r} failed: {type(e).__name__}: {e}") from None
    return text, list(tok(text, add_special_tokens=False)["input_ids"])


def _template_error(tok, what):
    return DataError(f"chat template of tokenizer {tok.name_or_path!r} is not prefix-consistent ({what}), so the "
                     "assistant tokens cannot be located; add {% generation %}...{% endgeneration %} around assistant "
                     "content in the template, or use a template that renders earlier turns identically")


MERGE_WINDOW = 4  # tokens at the end of a rendered prefix that may merge with the text after it (see _split)


def _split(tok, prefix, ids, text, what, notes):
    """Where the rendering prefix = (text, ids) of the first messages ends in the rendering (text(), ids) of more:
    their longest common token prefix. BPE may merge the prefix's last tokens with the text after it (a response
    that starts with "\n\n" or two spaces: the template's "\n" and the response's whitespace become one token); that
    is accepted (notes gets "merged") when text() starts with the prefix's text and the tokens differ only in the
    prefix's last MERGE_WINDOW tokens. Otherwise the template renders earlier turns differently: DataError."""
    p_text, p_ids = prefix
    n = next((k for k, (x, y) in enumerate(zip(p_ids, ids)) if x != y), min(len(p_ids), len(ids)))
    if n < len(p_ids):
        if len(p_ids) - n > MERGE_WINDOW or not text().startswith(p_text):
            raise _template_error(tok, what)
        if notes is not None:
            notes.add("merged")
    return n


def _labelled(tok, messages, field, first=0, notes=None):
    """-> (ids, labels, start) of the rendered conversation; labels = ids on the assistant messages with index >= first
    (content and end-of-turn token), else -100; start = where messages[:first] rendered with add_generation_prompt=True
    ends in ids (_split; 0 when first == 0), no label before it. DataError when the template is not prefix-consistent
    or nothing is labelled."""
    cache = {}

    def render(k, gen):  # messages[:k], each rendering made once
        if (k, gen) not in cache:
            cache[k, gen] = _render(tok, messages[:k], gen)
        return cache[k, gen]

    text = lambda: render(len(messages), False)[0]  # noqa: E731
    template = tok.chat_template
    if isinstance(template, str) and _GENERATION_RE.search(template) and getattr(tok, "is_fast", False):
        out = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
    else:  # No markers: the tokens that messages[:i+1] adds to messages[:i] + generation prompt are assistant turn i.
        ids = render(len(messages), False)[1]
        mask = [0] * len(ids)
        for i in range(first, len(messages)):
            if messages[i]["role"] != "assistant":
                continue
            what = f"rendering messages[:{i}] with add_generation_prompt=True is not a token prefix of rendering " \
                   f"messages[:{i + 1}]"
            a = _split(tok, render(i, True), ids, text, what, notes)
            b = _split(tok, render(i + 1, False), ids, text, what, notes)
            if b <= a:
                raise _template_error(tok, what)
            span = ids[a:b]
            # Drop what the template adds after the end-of-turn token (e.g. ChatML's '\n'): not something to learn.
            if tok.eos_token_id in span:
                span = span[:len(span) - span[::-1].index(tok.eos_token_id)]
            mask[a:a + len(span)] = [1] * len(span)
    what = f"the prompt rendered with add_generation_prompt=True is not a token prefix of prompt + {field}"
    start = _split(tok, render(first, True), ids, text, what, notes) if first else 0
    mask[:start] = [0] * start
    if not any(mask):
        raise DataError(f"field '{field}': the assistant mask is empty (no assistant tokens after the chat template)")
    return ids, [t if m else -100 for t, m in zip(ids, mask)], start


def _generation_prompt(tok, messages, max_prompt_length):
    """-> (messages rendered with add_generation_prompt=True: their last max_prompt_length ids, whether cut)."""
    ids = _render(tok, messages, True)[1]
    return ids[max(0, len(ids) - max_prompt_length):], len(ids) > max_prompt_length


def tokenize_example(example: dict, tokenizer, kind: str, max_length: int, max_prompt_length: int,
                     notes: set | None = None) -> tuple[dict | None, bool]:
    """Tokenize one normalized record through the chat template. Returns (tokenized, was_truncated); tokenized is
    None when no labelled token is left after truncation (skip it).
      sft:        {"input_ids", "labels", "prompt_input_ids"}; labels = input_ids on assistant tokens, else -100.
                  prompt_input_ids = the messages before the last assistant turn with add_generation_prompt=True,
                  keeping its last max_prompt_length tokens (used to sample completions).
      preference: {"prompt_input_ids", "chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"};
                  <side>_input_ids = the prompt + response ids; labels -100 on the prompt. That prompt is the
                  rendered one, less its last token(s) when a response's first tokens merge with them (_split);
                  prompt_input_ids (to sample from) is the whole rendered prompt, cut at the front as it is.
      unpaired:   {"prompt_input_ids", "chosen_input_ids", "chosen_labels", "desirable"}: the completion as a
                  preference example's chosen side (so collate, sequences_of and the reference log-prob cache take
                  it as they are); "rejected_*" (the KL sequence) is added by build_datasets (kl_pairs).
      prompt:     {"prompt_input_ids", "prompt" (the messages), "prompt_is_text" (bool), "columns" ({field: value},
                  the record's own)}: what the online methods sample from and hand the reward functions; the
                  prompt keeps its last max_prompt_length tokens (there is no response to make room for).
    notes: a set that gets "merged" when that happened (for a warning).
    Truncation: when prompt + response exceeds max_length, the prompt (the context before the first labelled token)
    keeps its END, at most max_prompt_length tokens; then the response keeps its START so the whole fits max_length.
    Raises DataError when the assistant mask is empty before any truncation."""
    if kind == "sft":
        return _tokenize_sft(example["messages"], tokenizer, max_length, max_prompt_length, notes)
    if kind == "prompt":
        ids, truncated = _generation_prompt(tokenizer, example["prompt"], max_prompt_length)
        return {"prompt_input_ids": ids, "prompt": example["prompt"], "prompt_is_text": example["prompt_is_text"],
                "columns": example["columns"]}, truncated
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    # side -> (field named in errors, response messages)
    responses = ({"chosen": ("completion", example["completion"])} if kind == "unpaired" else
                 {side: (side, example[side]) for side in ("chosen", "rejected")})
    full = {side: _labelled(tokenizer, example["prompt"] + msgs, field, len(example["prompt"]), notes)
            for side, (field, msgs) in responses.items()}
    # The prompt: the tokens both sides start with (shorter than the rendered prompt when a response merges with it).
    start = min(s for _, _, s in full.values())
    prompt = full["chosen"][0][:start]
    sides = {side: (ids[start:], labels[start:]) for side, (ids, labels, _) in full.items()}
    longest = max(len(ids) for ids, _ in sides.values())
    truncated = False
    if len(prompt) + longest > max_length and len(prompt) > max_prompt_length:
        prompt, truncated = prompt[len(prompt) - max_prompt_length:], True
    room = max(0, max_length - len(prompt))
    if longest > room:
        sides, truncated = {k: (ids[:room], lab[:room]) for k, (ids, lab) in sides.items()}, True
    if any(all(l == -100 for l in lab) for _, lab in sides.values()):
        return None, truncated
    # what the model is asked to continue when sampling: the whole generation prompt, even where a response's first
    # tokens merged with its end, cut at the front as the shared prefix was
    generation = _render(tokenizer, example["prompt"], True)[1]
    out = {"prompt_input_ids": generation[start - len(prompt):]}
    for side, (ids, lab) in sides.items():
        out[f"{side}_input_ids"], out[f"{side}_labels"] = prompt + ids, [-100] * len(prompt) + lab
    if kind == "unpaired":
        out["desirable"] = example["desirable"]
    if "margin" in example:  # a pair's own margin (reward_model)
        out["margin"] = example["margin"]
    return out, truncated


def _tokenize_sft(msgs, tokenizer, max_length, max_prompt_length, notes):
    """tokenize_example of an SFT conversation: (tokenized or None, was_truncated)."""
    ids, labels, _ = _labelled(tokenizer, msgs, "messages", notes=notes)
    last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
    prompt = _generation_prompt(tokenizer, msgs[:last], max_prompt_length)[0]
    truncated = len(ids) > max_length
    if truncated:
        first = next(i for i, l in enumerate(labels) if l != -100)
        cut = max(0, first - max_prompt_length)
        ids, labels = ids[cut:cut + max_length], labels[cut:cut + max_length]
    if all(l == -100 for l in labels):
        return None, truncated
    return {"input_ids": ids, "labels": labels, "prompt_input_ids": prompt}, truncated


# --- Datasets and batches ----------------------------------------------------------------------------------------
MERGE_WARNING = ("warning: {} records: the response's first tokens merge with the chat template's (e.g. a response "
                 "starting with whitespace); split at the longest common token prefix")


def _held_out(n_eval, n):
    """-> (how many of n training records to hold out for n_eval_examples=n_eval, warning or None): n_eval while it
    leaves at least half of them for training, else 10% (rounded down; at least 1, none of a single record)."""
    if n_eval <= n // 2:
        return n_eval, None
    held = max(1, n // 10) if n > 1 else 0
    return held, (f"warning: n_eval_examples={n_eval} but the data has only {n} records: holding out {held} for "
                  "evaluation (set n_eval_examples or eval_datasets)")


def kl_pairs(examples: list[dict], max_length: int) -> list[dict]:
    """KTO's KL term needs mismatched pairs: TRL's dataset-level pairing, made once per set (train, eval) in its
    (seeded, shuffled) order and fixed for the run, which is what lets the reference log-probs of the KL pairs be
    precomputed and cached like any other sequence. Example i's KL sequence, stored as its "rejected_input_ids" /
    "rejected_labels" (so that sequence B + i of a collated batch is example i's KL sequence): its own prompt,
    chosen_input_ids before its first label (labels -100), then the completion of example (i + 1) % n, its
    chosen_input_ids / chosen_labels from their first label on, cut to max_length at the end (the completion keeps
    its start). A single example is paired with its own completion. Adds the keys in place; returns examples."""
    starts = [next(k for k, l in enumerate(ex["chosen_labels"]) if l != -100) for ex in examples]
    for i, ex in enumerate(examples):
        j = (i + 1) % len(examples)
        other, n = examples[j], starts[j]
        ex["rejected_input_ids"] = (ex["chosen_input_ids"][:starts[i]] + other["chosen_input_ids"][n:])[:max_length]
        ex["rejected_labels"] = ([-100] * starts[i] + other["chosen_labels"][n:])[:max_length]
    return examples


def build_datasets(train_specs: list[dict], eval_specs: list[dict], tokenizer, kind: str, max_length: int,
                   max_prompt_length: int, n_eval_examples: int, seed: int) -> tuple[list[dict], list[dict], dict]:
    """Load every train spec (concatenated) and shuffle with random.Random(seed). Eval: without eval_specs the first
    n_eval_examples shuffled records are held out (fewer, with a warning, when that would take more than half of
    them: _held_out); with eval_specs, eval = their first n_eval_examples records (file order) and train is not
    reduced; n_eval_examples == 0 -> no eval (prompt data alike: its eval prompts are scored by reward). Then tokenize
    everything; unpaired (KTO) data then gets its KL sequences (kl_pairs), train and eval separately.
    Returns (train, eval, stats), stats = {"train", "eval", "truncated", "skipped" (nothing left to learn after
    truncation), "dropped" (raw hh/shp/se records filtered out)} and, only when there are any, "warnings": a list of
    one-line messages for the caller to print. Raises DataError; prints nothing."""
    def load_all(specs):  # -> ([(record, (label, raw index))], n dropped)
        loaded = [load_records(spec, kind) for spec in specs]
        return [x for recs, origins, _, _ in loaded for x in zip(recs, origins)], sum(d for _, _, d, _ in loaded)

    def tokenize_all(pairs):
        out = []
        for rec, (label, i) in pairs:
            notes = set()
            try:
                tok, truncated = tokenize_example(rec, tokenizer, kind, max_length, max_prompt_length, notes)
            except DataError as e:
                raise DataError(f"{label}: record {i}: {e}") from None
            stats["truncated"] += truncated
            stats["skipped"] += tok is None
            stats["merged"] += bool(notes)
            if tok is not None:
                out.append(tok)
        return out

    if not train_specs:
        raise DataError("datasets: no training dataset given")
    records, dropped = load_all(train_specs)
    random.Random(seed).shuffle(records)
    n_eval, warnings = max(0, n_eval_examples), []
    if eval_specs and n_eval:
        ev_records, ev_dropped = load_all(eval_specs)
        ev_records, dropped = ev_records[:n_eval], dropped + ev_dropped
    else:
        n_eval, warning = _held_out(n_eval, len(records))
        warnings += [warning] if warning else []
        ev_records, records = records[:n_eval], records[n_eval:]
    stats = {"truncated": 0, "skipped": 0, "dropped": dropped, "merged": 0}
    train, evals = tokenize_all(records), tokenize_all(ev_records)
    if kind == "unpaired":
        train, evals = kl_pairs(train, max_length), kl_pairs(evals, max_length)
    if not train:
        raise DataError(f"datasets: no training example left: all {stats['skipped']} were skipped after truncation "
                        f"(max_length={max_length}, max_prompt_length={max_prompt_length})")
    merged = stats.pop("merged")
    warnings += [MERGE_WARNING.format(merged)] if merged else []
    stats = {"train": len(train), "eval": len(evals), **stats}
    return train, evals, {**stats, "warnings": warnings} if warnings else stats


def _pad(seqs, value, length, left=False):
    import torch  # imported here so that the CLI and the loaders start fast
    out = torch.full((len(seqs), length), value, dtype=torch.long)
    for row, seq in zip(out, seqs):
        if seq:
            (row[length - len(seq):] if left else row[:len(seq)]).copy_(torch.tensor(seq, dtype=torch.long))
    return out


def example_length(example: dict) -> int:
    """Tokens of an example's longest sequence (for group_by_length)."""
    keys = ("input_ids", "chosen_input_ids", "rejected_input_ids", "prompt_input_ids")  # prompt data: the prompt alone
    return max(len(example[k]) for k in keys if k in example)


def sequences_of(examples: list[dict]) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) of every sequence of a batch, in sequence-id order: SFT one per example; preference the
    B chosen responses, then the B rejected ones (sequence i < B is the chosen of example i, B + i its rejected);
    unpaired (KTO) examples are laid out the same way: their completions, then their KL sequences (kl_pairs), or
    their completions alone when the examples hold no KL sequences (a KTO micro-batch: objectives.OfflineObjective.scored)."""
    prefixes = [p for p in ("chosen_", "rejected_") if f"{p}input_ids" in examples[0]] or [""]
    return [(ex[f"{p}input_ids"], ex[f"{p}labels"]) for p in prefixes for ex in examples]


def label_count(labels: list[int]) -> int:
    """How many tokens of a sequence are scored: its labels other than -100, but never its first token (nothing
    predicts it). The one definition, for loss normalisers and FLOP counts alike."""
    return sum(1 for t in labels[1:] if t != -100)


def collate(examples: list[dict], pad_token_id: int, packing: bool = False, max_length: int | None = None,
            pad_to_multiple_of: int = 1, prefix_sharing: bool = False, segments_only: bool = False) -> dict:
    """A batch of tokenize_example outputs as long tensors, in one layout for SFT and preference data:
      input_ids, labels, seq_ids [R, T]: every sequence of the batch (`sequences_of`); seq_ids says which sequence
                  a token belongs to (-1 on padding), so per-sequence log-probs never depend on the layout.
      padded (packing=False): one row per sequence, right-padded; attention_mask [R, T].
      packed (packing=True): sequences laid end to end in rows of up to max_length tokens (batching.py);
                  position_ids [R, T] restart at 0 for every sequence (and for the padding at a row's end), and
                  there is no attention_mask: the model then attends only within each sequence. The first token
                  of each sequence gets label -100 (it would be "predicted" by the previous sequence's last token).
      cu_seq_lens [S + 1] int32, max_seq_len (an int): the rows as segments (batching.segments); n_seqs (an int).
      pad_to_multiple_of: T rounded up to it (GPUs: fewer distinct shapes, so kernels planned per shape, e.g.
                  cuDNN attention's, are planned a few times instead of at almost every step).
      prompt_input_ids, prompt_attention_mask [B, P]: the prompts, LEFT-padded (for generate).
      reference_logps [n_seqs] (in sequence order, like seq_ids): when the examples carry precomputed ones.
      desirable [B] bool: unpaired (KTO) examples' labels (rows i < B their completions, B + i their KL sequences).
      margin [B] float: the pairs' own margins (reward_model), when any example has one (0 for the others).
      prefix_sharing: pairs (and KTO's KL pairs) laid out with their prompt once (prefix.py): position_ids and a
                  4-D attention_mask [R, 1, T, T], the rest as above.
      segments_only: the model attends by the segments alone (varlen_attn), so packing puts every sequence in ONE
                  row, with no length limit (rows exist only for masks and would add padding at their ends), and
                  prefix sharing builds no 4-D mask."""
    import torch  # imported here so that the CLI and the loaders start fast
    import batching
    if pad_token_id is None:
        raise ValueError("pad_token_id is None: call prepare_tokenizer(tokenizer) first")
    if prefix_sharing and "rejected_input_ids" in examples[0]:
        import prefix
        batch = prefix.collate_pairs(examples, pad_token_id, packing, max_length, pad_to_multiple_of, segments_only)
    else:
        batch = batching.sequence_rows(sequences_of(examples), pad_token_id, packing, max_length, pad_to_multiple_of,
                                       segments_only)
    prompts = [ex["prompt_input_ids"] for ex in examples]
    P = max(len(x) for x in prompts)
    batch["prompt_input_ids"] = _pad(prompts, pad_token_id, P, left=True)
    batch["prompt_attention_mask"] = _pad([[1] * len(x) for x in prompts], 0, P, left=True)
    if all("reference_logps" in ex for ex in examples):  # in sequence order: the B chosen, then the B rejected
        sides = range(batch["n_seqs"] // len(examples))  # (unpaired data without its KL sequences: the chosen only)
        batch["reference_logps"] = torch.tensor([ex["reference_logps"][side] for side in sides for ex in examples])
    if "desirable" in examples[0]:
        batch["desirable"] = torch.tensor([ex["desirable"] for ex in examples], dtype=torch.bool)
    if any("margin" in ex for ex in examples):  # pairs without one: margin 0
        batch["margin"] = torch.tensor([float(ex.get("margin", 0.0)) for ex in examples])
    return batch


# --- CLI ---------------------------------------------------------------------------------------------------------
ONLINE_LOSSES = ("grpo", "dr_grpo", "dapo", "gspo", "rloo", "reinforce_pp", "ppo")  # rl_losses.ONLINE (it imports torch)
LOSS_KINDS = {"sft": "sft", "dpo": "preference", "kto": "unpaired", "reward_model": "preference",  # --loss
              **dict.fromkeys(ONLINE_LOSSES, "prompt")}
CONVERT_KINDS = {"sft": "sft", "dpo": "preference", "kto": "unpaired", "prompts": "prompt"}  # --to -> data kind
LENGTHS = {"sft": {"sequence": "input_ids"}, "prompt": {"prompt": "prompt_input_ids"},  # check's statistics
           "unpaired": {"prompt": "prompt_input_ids", "prompt+completion": "chosen_input_ids"},
           "preference": {"prompt": "prompt_input_ids", "prompt+chosen": "chosen_input_ids",
                          "prompt+rejected": "rejected_input_ids"}}


def _cmd_check(args):
    kind = LOSS_KINDS.get(args.loss)
    records, _, dropped, formats = load_records({"type": "custom_dataset", "path": args.file}, kind)
    fmt = next(iter(formats.values()))
    kind = kind or own_kind(fmt)
    print(f"{args.file}: {len(records)} records ({dropped} dropped), format {FORMAT_NAMES[fmt]}, kind {kind}: ok")
    if kind == "unpaired":
        n = sum(r["desirable"] for r in records)
        how = "" if fmt in UNPAIRED_FORMATS else " (each pair: its chosen desirable, its rejected undesirable)"
        print(f"desirable {n}, undesirable {len(records) - n}{how}")
    if kind == "prompt":  # what the reward functions will be given
        n = sum(r["prompt_is_text"] for r in records)
        columns = sorted({c for r in records for c in r["columns"]})
        print(f"prompts: {n} plain text, {len(records) - n} conversations; columns: {', '.join(columns) or 'none'}")
    tok_path = args.tokenizer or os.path.join(ROOT, "example", "tokenizer")
    if not (args.tokenizer or os.path.isdir(tok_path)):  # no tokenizer given and no example one: records only
        return
    from transformers import AutoTokenizer
    try:
        tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(tok_path))
    except (OSError, ValueError) as e:
        raise DataError(f"{tok_path}: cannot load tokenizer: {e}") from None
    columns = LENGTHS[kind]
    lengths, n_trunc, n_skip, n_merged = {name: [] for name in columns}, 0, 0, 0
    for i, rec in enumerate(records):
        notes = set()
        try:
            full, _ = tokenize_example(rec, tokenizer, kind, sys.maxsize, sys.maxsize, notes)  # untruncated lengths
            tok, truncated = tokenize_example(rec, tokenizer, kind, args.max_length, args.max_prompt_length)
        except DataError as e:
            raise DataError(f"{args.file}: record {i}: {e}") from None
        for name, key in columns.items():
            lengths[name].append(len(full[key]))
        n_trunc, n_skip, n_merged = n_trunc + truncated, n_skip + (tok is None), n_merged + bool(notes)
    if n_merged:
        print(MERGE_WARNING.format(n_merged), file=sys.stderr)
    print(f"tokens ({tok_path}):")
    for name, v in lengths.items():
        v = sorted(v)
        at = lambda q: v[max(0, math.ceil(q * len(v)) - 1)]  # noqa: E731 (nearest-rank percentile)
        print(f"  {name:17s} p50 {at(0.5)}  p90 {at(0.9)}  max {v[-1]}")
    if kind == "prompt":  # no response: max_length does not apply, nothing is skipped
        print(f"at max_prompt_length {args.max_prompt_length}: {n_trunc} truncated (the prompt keeps its end)")
    else:
        print(f"at max_length {args.max_length}, max_prompt_length {args.max_prompt_length}: "
              f"{n_trunc} truncated, {n_skip} skipped (nothing left to learn)")


OUT_EXTS = (".json", ".jsonl", ".json.gz", ".jsonl.gz")


def _cmd_convert(args):
    if not args.out.endswith(OUT_EXTS):  # what train.py reads back by its name (.gz: gzip-compressed)
        raise DataError(f"{args.out}: OUT must end with {', '.join(OUT_EXTS)}")
    if os.path.exists(args.out) and os.path.exists(args.input) and os.path.samefile(args.input, args.out):
        raise DataError(f"{args.out}: is the input file; refusing to overwrite it")
    kind = None if args.to == "sft" else CONVERT_KINDS[args.to]  # --to sft: pairs too (prompt + chosen)
    records, origins, _, formats = load_records({"type": "custom_dataset", "path": args.input}, kind)
    if args.to == "sft" and ("completion" in records[0] or "columns" in records[0]):
        raise DataError(f"{args.input}: {FORMAT_NAMES[next(iter(formats.values()))]} data cannot be converted to SFT "
                        "data (convert --to sft takes preference pairs)")
    if args.to == "sft":  # preference -> SFT: the conversation is prompt + chosen
        records = [r if "messages" in r else {"messages": r["prompt"] + r["chosen"]} for r in records]
    rows = [prompt_row(r, o) for r, o in zip(records, origins)] if kind == "prompt" else [seed_row(r) for r in records]
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        raise DataError(f"{args.out}: folder {out_dir} does not exist")
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "wb") as raw, (gzip.open(raw, "wt", encoding="utf-8") if args.out.endswith(".gz") else
                                          io.TextIOWrapper(raw, encoding="utf-8")) as f:
            if args.out.removesuffix(".gz").endswith(".jsonl"):
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
            else:
                json.dump(rows, f, ensure_ascii=False, indent=1)
        umask = os.umask(0o22)
        os.umask(umask)  # mkstemp made it 0600: give OUT the mode a plain open() would (kept when OUT exists)
        os.chmod(tmp, stat.S_IMODE(os.stat(args.out).st_mode) if os.path.exists(args.out) else 0o666 & ~umask)
        os.replace(tmp, args.out)  # atomic: OUT is either the old file or the complete new one
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    print(f"wrote {len(rows)} {args.to} records to {args.out}")


def main(argv=None):
    ap = argparse.ArgumentParser(prog="data.py", description="Check or convert SFT / preference / unpaired / prompt "
                                 "datasets.")
    sub = ap.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="validate every record; with a tokenizer, token-length statistics")
    check.add_argument("file")
    check.add_argument("--loss", choices=tuple(LOSS_KINDS), default=None, help="default: from the file's format")
    check.add_argument("--tokenizer", default=None, help="default: example/tokenizer when it exists")
    check.add_argument("--max-length", type=int, default=512)
    check.add_argument("--max-prompt-length", type=int, default=None, help="default: half of --max-length, as train.py")
    conv = sub.add_parser("convert", help="write the seed README's sft (messages) or dpo format, kto (unpaired: "
                          "conversations/completion/label, two examples per pair) or TRL's prompts (prompt + columns)")
    conv.add_argument("input", metavar="IN")
    conv.add_argument("out", metavar="OUT")
    conv.add_argument("--to", choices=tuple(CONVERT_KINDS), required=True)
    args = ap.parse_args(argv)
    if getattr(args, "max_prompt_length", 0) is None:
        args.max_prompt_length = args.max_length // 2
    try:
        _cmd_check(args) if args.command == "check" else _cmd_convert(args)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
