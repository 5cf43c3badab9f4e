"""Dataset formats: raw records (JSON, JSONL, gzip, parquet, the hub's datasets) -> validated, normalized examples of
one data kind (sft, preference, unpaired, prompt), with one-line errors naming the file, the record and the field;
data.py tokenizes and batches what `load_records` / `load_examples` return.

Formats (detected per file from the records' keys; one format per file; every record is validated):
  SFT         {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}            (seed format)
              {"conversations": [{"from": "system"|"human"|"gpt", "value": str}, ...]}             (ShareGPT)
  preference  {"conversations": [...], "chosen": {"from": "gpt", "value"}, "rejected": {...}}      (seed format)
              {"prompt": str | [messages], "chosen": str | [messages], "rejected": str | [messages]} (TRL)
  raw hub     Anthropic/hh-rlhf ("hh"), stanfordnlp/SHP ("shp"), HuggingFaceH4/stack-exchange-preferences ("se")
  unpaired    {"conversations": [...], "completion": {"from": "gpt", "value"}, "label": true|false}      (seed style)
              {"prompt": str | [messages], "completion": str | [messages], "label": true|false}        (TRL)
  prompt      {"prompt": str | [messages ending with a user turn], ...columns}                         (TRL)
              {"prompt": [messages], "reward_model": {"ground_truth", "style"}, "data_source", ...}     (verl)
              {"question": str, "answer": "... #### n"} (the answer stays a column)                       (raw GSM8K)
hh used for SFT trains on its chosen transcript (as the original DPO code does); other preference data must be
converted first (`convert --to sft`). SFT data cannot be used for preference training (no rejected response).
Unpaired data (label = desirable or not) is only for the losses of data kind "unpaired" (loss.name=kto); pair data
used as unpaired gives two examples per pair, its chosen desirable and its rejected undesirable (TRL's convention).
Prompt data (kind "prompt", the online methods: the model writes the completions) is any format's prompt: a
conversation ending with a user turn, or an SFT conversation's turns before its last assistant turn, or a pair's
prompt; every field that does not hold the prompt or the responses is kept as a column for the reward functions.
"""
from __future__ import annotations

import gzip
import json
import os
import re
import zlib

ROLES = {"system": "system", "user": "user", "assistant": "assistant"}
SHAREGPT_ROLES = {"system": "system", "human": "user", "gpt": "assistant"}
# How a message is spelled: (role key, text key, {accepted role: normalized role}).
CHATML, SHAREGPT = ("role", "content", ROLES), ("from", "value", SHAREGPT_ROLES)
HUB_IDS = {"hh": "Anthropic/hh-rlhf", "shp": "stanfordnlp/SHP", "se": "HuggingFaceH4/stack-exchange-preferences"}
DATA_EXTS = (".json", ".jsonl", ".json.gz", ".jsonl.gz", ".parquet")
FORMAT_NAMES = {"messages": "messages (SFT)", "sharegpt": "conversations (ShareGPT SFT)",
                "seed_pref": "conversations/chosen/rejected (preference)", "trl": "prompt/chosen/rejected (TRL preference)",
                "hh": "Anthropic HH", "shp": "Stanford SHP", "se": "stack-exchange-preferences",
                "seed_unpaired": "conversations/completion/label (unpaired)",
                "trl_unpaired": "prompt/completion/label (TRL unpaired)", "verl": "prompt/reward_model (verl prompts)",
                "trl_prompt": "prompt (TRL prompts)", "gsm8k": "question/answer (GSM8K prompts)"}
SFT_FORMATS, UNPAIRED_FORMATS = ("messages", "sharegpt"), ("seed_unpaired", "trl_unpaired")
PROMPT_FORMATS = ("verl", "trl_prompt", "gsm8k")  # prompts only; any other format's prompt part also serves as a prompt
KINDS = ("sft", "preference", "unpaired", "prompt")  # the data kinds of losses.LOSSES and rl_losses.ONLINE (prompt)

class DataError(Exception):
    """One-line, user-facing message naming the file, the record index (0-based) and the field, e.g.
    "example/data/bad.json: record 3: field 'chosen': missing"."""

    def __init__(self, message):
        super().__init__(" ".join(str(message).split("\n")))  # always one line


# --- Record validation and parsers: raw record (dict) -> list of normalized records -----------------------------
def _fail(field, msg):
    raise DataError(f"field '{field}': {msg}")


def _str(value, field, allow_empty=False):
    if not isinstance(value, str):
        _fail(field, "missing" if value is None else f"must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        _fail(field, "empty")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:  # e.g. JSON "\ud800": a lone UTF-16 surrogate, which no tokenizer takes
        _fail(field, f"invalid text: lone surrogate {value[e.start]!r} at character {e.start}")
    return value


def _number(value, field):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _fail(field, "missing" if value is None else f"must be a number, got {type(value).__name__}")
    return value


def _messages(value, field, schema=CHATML, use=None):
    """A non-empty list of messages -> normalized [{"role", "content"}], checked for its use: "sft" (has an assistant
    turn), "prompt" (ends with a user turn) or "response" (assistant turns only; a string or one message also do)."""
    if use == "response" and isinstance(value, str):
        return [{"role": "assistant", "content": _str(value, field)}]
    if use == "response" and isinstance(value, dict):
        fields, value = [field], [value]
    elif isinstance(value, list) and value:
        fields = [f"{field}[{j}]" for j in range(len(value))]
    else:
        _fail(field, "missing" if value is None else "empty list" if isinstance(value, list)
              else f"must be a list of messages, got {type(value).__name__}")
    role_key, text_key, roles = schema
    msgs, spelled = [], []  # spelled: the roles as written in the file, for the messages
    for m, f in zip(value, fields):
        if not isinstance(m, dict):
            _fail(f, f"must be an object with '{role_key}' and '{text_key}', got {type(m).__name__}")
        role = m.get(role_key)
        if not isinstance(role, str) or role not in roles:
            _fail(f"{f}.{role_key}", "missing" if role is None else f"unknown value {role!r}; allowed: {', '.join(roles)}")
        spelled.append(role)
        role = roles[role]
        # Empty system/user text is legal; an empty assistant turn would be nothing to learn.
        msgs.append({"role": role, "content": _str(m.get(text_key), f"{f}.{text_key}", allow_empty=role != "assistant")})
    if use == "sft" and not any(m["role"] == "assistant" for m in msgs):
        _fail(field, "no assistant message (nothing to learn)")
    if use == "sft" and msgs[0]["role"] == "assistant":  # a chat template cannot render the empty prompt before it
        _fail(fields[0], "the conversation starts with an assistant message; put a user (or system) message before it")
    if use == "prompt" and msgs[-1]["role"] != "user":
        _fail(field, f"the prompt must end with a user message, got {spelled[-1]!r}")
    want = next(k for k, v in roles.items() if v == "assistant")
    for m, f, role in zip(msgs, fields if use == "response" else [], spelled):
        if m["role"] != "assistant":
            _fail(f"{f}.{role_key}", f"the response must be {want!r}, got {role!r}")
    return msgs


def _preference(rec, prompt, schema):
    return [{"prompt": prompt, **{side: _messages(rec.get(side), side, schema, "response")
                                  for side in ("chosen", "rejected")}}]


def _unpaired(rec, prompt, schema):
    completion = _messages(rec.get("completion"), "completion", schema, "response")
    label = rec.get("label")
    if not isinstance(label, bool):
        _fail("label", "missing" if label is None else f"must be true or false, got {label!r}")
    return [{"prompt": prompt, "completion": completion, "desirable": label}]


def _trl_prompt(rec, *required):
    p = rec.get("prompt")
    if p is not None and not isinstance(p, (str, list)):
        _fail("prompt", f"must be a string or a list of messages, got {type(p).__name__}")
    prompt = [{"role": "user", "content": _str(p, "prompt")}] if isinstance(p, str) else _messages(p, "prompt")
    for field in required:
        if rec.get(field) is None:
            _fail(field, "missing")
    # The prompt's last-turn check comes after the missing-field check; re-checking normalized messages is a no-op.
    return _messages(prompt, "prompt", CHATML, "prompt")


_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def _hh_turns(text, field):
    parts = _HH_TURN.split(_str(text, field))
    if parts[0].strip() or len(parts) < 3:
        _fail(field, "not an Anthropic HH transcript (expected '\\n\\nHuman: ...\\n\\nAssistant: ...')")
    turns = [{"role": "user" if who == "Human" else "assistant", "content": body.strip()}
             for who, body in zip(parts[1::2], parts[2::2])]
    if turns[-1]["role"] != "assistant":
        _fail(field, "the transcript must end with an '\\n\\nAssistant:' turn")
    return turns


def _parse_hh(rec):
    """prompt = the turns before the final assistant turn; chosen/rejected = the final turns. Pairs whose transcripts
    differ before the final turn, or with an empty final response, are dropped (counted, not errors)."""
    chosen, rejected = _hh_turns(rec.get("chosen"), "chosen"), _hh_turns(rec.get("rejected"), "rejected")
    prompt = chosen[:-1]
    if (rejected[:-1] != prompt or not prompt or prompt[-1]["role"] != "user"
            or not chosen[-1]["content"] or not rejected[-1]["content"]):
        return []
    return [{"prompt": prompt, "chosen": chosen[-1:], "rejected": rejected[-1:]}]


def _pair(question, chosen, rejected):
    return {"prompt": [{"role": "user", "content": question}], "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}]}


def _parse_shp(rec):
    """labels == 1 means human_ref_A is preferred. As in the DPO paper, pairs whose score ratio is below 2 are
    dropped (counted), as are pairs with an empty response."""
    history = _str(rec.get("history"), "history")
    a, b = (_str(rec.get(k), k, allow_empty=True) for k in ("human_ref_A", "human_ref_B"))
    label = rec.get("labels")
    if isinstance(label, bool) or label not in (0, 1):
        _fail("labels", "missing" if label is None else f"must be 0 or 1 (1 = A preferred), got {label!r}")
    sa, sb = _number(rec.get("score_A"), "score_A"), _number(rec.get("score_B"), "score_B")
    if (min(sa, sb) > 0 and max(sa, sb) < 2 * min(sa, sb)) or not a.strip() or not b.strip():
        return []
    return [_pair(history, a, b) if label == 1 else _pair(history, b, a)]


def _parse_se(rec):
    """Every pair of answers with different pm_score; the higher-scored answer is chosen. HTML is kept as is."""
    question = _str(rec.get("question"), "question")
    answers = rec.get("answers")
    if not isinstance(answers, list):
        _fail("answers", "missing" if answers is None else f"must be a list, got {type(answers).__name__}")
    scored = []
    for j, ans in enumerate(answers):
        if not isinstance(ans, dict):
            _fail(f"answers[{j}]", f"must be an object with 'text' and 'pm_score', got {type(ans).__name__}")
        text = _str(ans.get("text"), f"answers[{j}].text", allow_empty=True)
        score = _number(ans.get("pm_score"), f"answers[{j}].pm_score")
        if text.strip():
            scored.append((text, score))
    return [_pair(question, *((x[0], y[0]) if x[1] > y[1] else (y[0], x[0])))
            for i, x in enumerate(scored) for y in scored[i + 1:] if x[1] != y[1]]


# --- Prompts (kind "prompt"): any format's prompt, with the record's other fields as columns ---------------------
def _conversation_prompt(value, field, schema):
    """A conversation as a prompt: all of it when it ends with a user turn; an SFT conversation (ending with an
    assistant turn): the turns before that last turn."""
    msgs = _messages(value, field, schema)
    what = "the prompt"
    if msgs[-1]["role"] == "assistant":
        msgs, what = msgs[:-1], "the turns before the last assistant message"
    if not msgs or msgs[-1]["role"] != "user":
        _fail(field, f"{what} must end with a user message")
    return msgs


def _hh_prompt(rec):
    turns = _hh_turns(rec.get("chosen"), "chosen")[:-1]
    if not turns or turns[-1]["role"] != "user":
        _fail("chosen", "no '\\n\\nHuman:' turn right before the last '\\n\\nAssistant:' turn")
    return turns


def _text_prompt(field):
    return lambda rec: [{"role": "user", "content": _str(rec.get(field), field)}]


# Format -> (the field holding the prompt, raw record -> prompt messages ending with a user turn).
_PROMPTS = {
    "messages": ("messages", lambda rec: _conversation_prompt(rec.get("messages"), "messages", CHATML)),
    "sharegpt": ("conversations",
                 lambda rec: _conversation_prompt(rec.get("conversations"), "conversations", SHAREGPT)),
    **dict.fromkeys(("seed_pref", "seed_unpaired"), (
        "conversations", lambda rec: _messages(rec.get("conversations"), "conversations", SHAREGPT, "prompt"))),
    **dict.fromkeys(("trl", "trl_unpaired", "verl", "trl_prompt"), ("prompt", _trl_prompt)),
    "hh": ("chosen", _hh_prompt), "shp": ("history", _text_prompt("history")),
    **dict.fromkeys(("se", "gsm8k"), ("question", _text_prompt("question"))),
}


def _verl_columns(rec):  # verl's reward functions take ground_truth from reward_model: a column of its own here
    rm = rec.get("reward_model")
    if not isinstance(rm, dict):
        _fail("reward_model", f"must be an object with 'ground_truth', got {type(rm).__name__}")
    if rm.get("ground_truth") is None:
        _fail("reward_model.ground_truth", "missing")
    if "ground_truth" in rec and rec["ground_truth"] != rm["ground_truth"]:
        _fail("ground_truth", "differs from reward_model.ground_truth")
    return {"ground_truth": rm["ground_truth"]}


def _prompt_of(fmt, rec):
    """A raw record of format fmt as a prompt record {"prompt": [messages ending with a user turn], "prompt_is_text":
    whether the source prompt was a plain string (TRL then hands reward functions strings, else message lists),
    "columns": every field that holds neither the prompt nor a response, as it is}."""
    field, parse = _PROMPTS[fmt]
    prompt = parse(rec)
    if not prompt[-1]["content"].strip():
        _fail(field, "the last user message is empty (nothing to answer)")
    used = {"verl": ("prompt",), "gsm8k": ("question",)}.get(fmt, _SIGNATURES[fmt])  # gsm8k's answer is a column
    columns = {k: v for k, v in rec.items() if k not in used}
    if fmt == "verl":
        columns.update(_verl_columns(rec))
    # hh's string is a transcript of turns, not one plain prompt
    return {"prompt": prompt, "prompt_is_text": fmt != "hh" and isinstance(rec.get(field), str), "columns": columns}


# Format -> parser: raw record -> [normalized records] ([] = dropped, counted), DataError on invalid data.
PARSERS = {
    "messages": lambda rec: [{"messages": _messages(rec.get("messages"), "messages", CHATML, "sft")}],
    "sharegpt": lambda rec: [{"messages": _messages(rec.get("conversations"), "conversations", SHAREGPT, "sft")}],
    "seed_pref": lambda rec: _preference(
        rec, _messages(rec.get("conversations"), "conversations", SHAREGPT, "prompt"), SHAREGPT),
    "trl": lambda rec: _preference(rec, _trl_prompt(rec, "chosen", "rejected"), CHATML),
    "hh": _parse_hh, "shp": _parse_shp, "se": _parse_se,
    "seed_unpaired": lambda rec: _unpaired(
        rec, _messages(rec.get("conversations"), "conversations", SHAREGPT, "prompt"), SHAREGPT),
    "trl_unpaired": lambda rec: _unpaired(rec, _trl_prompt(rec, "completion", "label"), CHATML),
    **{fmt: (lambda rec, fmt=fmt: [_prompt_of(fmt, rec)]) for fmt in PROMPT_FORMATS},
}
# Format from a record's keys: the first whose signature keys the record all has (the parser checks the rest).
_SIGNATURES = {"messages": ("messages",), "seed_pref": ("conversations", "chosen", "rejected"),
               "seed_unpaired": ("conversations", "completion"), "sharegpt": ("conversations",),
               "trl": ("prompt", "chosen", "rejected"), "trl_unpaired": ("prompt", "completion"),
               "verl": ("prompt", "reward_model"), "trl_prompt": ("prompt",),
               "shp": ("history", "human_ref_A", "human_ref_B"), "se": ("question", "answers"),
               "hh": ("chosen", "rejected"), "gsm8k": ("question", "answer")}
PROMPT_SHAPES = ("prompt (TRL: a string or messages ending with a user turn); prompt, reward_model (verl); question, "
                 "answer (GSM8K); messages or conversations ending with a user turn, or an SFT conversation (the turns "
                 "before its last assistant turn); a preference or unpaired file (its prompt)")


def _detect(rec):  # -> format name, None when unrecognized
    return next((fmt for fmt, keys in _SIGNATURES.items() if set(keys) <= set(rec)), None)


def _unrecognized(rec, kind):
    if kind == "prompt":
        return DataError(f"no prompt (keys {sorted(rec)}); expected one of: {PROMPT_SHAPES}")
    expected = "; ".join(f"{FORMAT_NAMES[f]}: {', '.join(k)}" for f, k in _SIGNATURES.items())
    return DataError(f"unrecognized format (keys {sorted(rec)}); expected the keys of one of: {expected}")


# --- Reading files / hub datasets --------------------------------------------------------------------------------
def _with_datasets(fn, label):
    """Run fn(datasets) quietly; any loader failure becomes a DataError."""
    import datasets
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bar()
    try:
        return fn(datasets)
    except Exception as e:  # pyarrow / hub / filesystem errors: report one line, not a traceback
        raise DataError(f"{label}: cannot load: {type(e).__name__}: {str(e).strip()[:300]}") from None
    finally:
        if was_enabled:
            datasets.enable_progress_bar()


def _json_error(path, e, lineno=None):
    where = f"line {lineno or e.lineno} column {e.colno}"
    # Some of json's messages end in "at" and expect the position after them ("Unterminated string starting at").
    return DataError(f"{path}: invalid JSON at {where}: {e.msg} {where}" if e.msg.endswith(" at") else
                     f"{path}: invalid JSON at {where}: {e.msg}")


def _read_file(path):
    """Raw rows of a .parquet, a JSON list of records, or JSON lines (.jsonl, or a .json that is not one JSON list).
    JSON text may start with a UTF-8 byte order mark."""
    if path.endswith(".parquet"):
        return _with_datasets(lambda ds: ds.load_dataset("parquet", data_files=path, split="train").to_list(), path)
    if not path.endswith(DATA_EXTS):
        raise DataError(f"{path}: unsupported file type (expected one of {', '.join(DATA_EXTS)})")
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rt", encoding="utf-8-sig") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError, EOFError, zlib.error) as e:  # gzip: bad or truncated data
        raise DataError(f"{path}: cannot read: {type(e).__name__}: {e}") from None
    try:
        return _parse_json(path, text)
    except RecursionError:
        raise DataError(f"{path}: invalid JSON: nested too deeply for Python's parser") from None


def _parse_json(path, text):
    if ".jsonl" not in os.path.basename(path):
        try:
            rows = json.loads(text) if text.strip() else []
        except json.JSONDecodeError as e:
            if e.msg != "Extra data":  # "Extra data" after the first value: treat the file as JSON lines
                raise _json_error(path, e) from None
        else:
            if not isinstance(rows, list):
                raise DataError(f"{path}: expected a JSON list of records (or JSON lines), got a {type(rows).__name__}")
            return rows
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise _json_error(path, e, n) from None
    return rows


def _sources(spec):
    """-> (forced format or None, [(label, raw rows)])."""
    typ, name, split = spec.get("type", "custom_dataset"), spec.get("name"), spec.get("split") or "train"
    path = os.path.expanduser(spec["path"]) if spec.get("path") else None
    if typ == "huggingface_dataset":
        if name not in HUB_IDS:
            raise DataError(f"datasets: huggingface_dataset needs name: hh | shp | se, got {name!r}")
        hub_id = None if path else HUB_IDS[name]
    elif typ == "custom_dataset":
        if not path:
            raise DataError("datasets: custom_dataset needs a path (a .json/.jsonl/.parquet file, a folder or a hub id)")
        # Something that looks like a path is never sent to the hub: "no such file" is the useful error.
        looks_local = path.endswith(DATA_EXTS) or path.startswith((".", "/")) or path.count("/") != 1
        hub_id = None if os.path.exists(path) or looks_local else path
        name = None
    else:
        raise DataError(f"datasets: unknown type {typ!r}; allowed: custom_dataset, huggingface_dataset")
    if hub_id:
        label = f"{hub_id} [{split}]"
        from utils import UserError, check_hub_reachable  # no torch: the data tool stays fast
        try:  # offline: one line in seconds, not a minute of retries
            check_hub_reachable(hub_id, "datasets", repo_type="dataset")
        except UserError as e:
            raise DataError(f"{label}: cannot load: {str(e).removeprefix('config: datasets: ')}") from None
        return name, [(label, _with_datasets(lambda ds: ds.load_dataset(hub_id, split=split).to_list(), label))]
    if os.path.isfile(path):
        return name, [(path, _read_file(path))]
    if not os.path.isdir(path):
        raise DataError(f"{path}: no such file or folder")
    # A folder: its data files (recursive), those whose name starts with `split` when there are any.
    files = sorted(os.path.join(d, f) for d, dirs, fs in os.walk(path) for f in fs
                   if f.endswith(DATA_EXTS) and "/." not in d)
    if not files:
        raise DataError(f"{path}: folder has no data files ({', '.join(DATA_EXTS)})")
    files = [f for f in files if os.path.basename(f).startswith(split)] or files
    return name, [(f, _read_file(f)) for f in files]


def _as_kind(rec, kind):
    """A parsed record as a record of `kind`: hh for SFT is prompt + chosen; a pair used as unpaired data is two
    examples, its chosen desirable and its rejected undesirable (TRL's convention)."""
    if kind == "sft" and "messages" not in rec:
        return [{"messages": rec["prompt"] + rec["chosen"]}]
    if kind == "unpaired" and "chosen" in rec:
        return [{"prompt": rec["prompt"], "completion": rec[side], "desirable": side == "chosen"}
                for side in ("chosen", "rejected")]
    return [rec]


def own_kind(fmt):
    """The data kind of a file of format fmt by itself (what `data.py check` assumes without --loss)."""
    return ("sft" if fmt in SFT_FORMATS else "unpaired" if fmt in UNPAIRED_FORMATS else
            "prompt" if fmt in PROMPT_FORMATS else "preference")


def prompt_row(rec, origin):
    """A prompt record (from file/record origin) as a row of TRL's prompt format: {"prompt": the string when
    prompt_is_text, else the messages, **columns}, which reads back as the same record."""
    if "prompt" in rec["columns"]:
        raise DataError(f"{origin[0]}: record {origin[1]}: field 'prompt': a column of this format, which TRL's prompt "
                        "format would overwrite with the prompt; rename it")
    return {"prompt": rec["prompt"][0]["content"] if rec["prompt_is_text"] else rec["prompt"], **rec["columns"]}


def seed_row(r):
    """A normalized record in the seed README's style: messages, or conversations (from/value) with chosen/rejected
    (preference) or completion/label (unpaired; the same style, which the seed has no example of)."""
    if "messages" in r:
        return {"messages": r["messages"]}
    back = {v: k for k, v in SHAREGPT_ROLES.items()}
    turn = lambda m: {"from": back[m["role"]], "value": m["content"]}  # noqa: E731
    side = lambda msgs: turn(msgs[0]) if len(msgs) == 1 else [turn(m) for m in msgs]  # noqa: E731
    if "completion" in r:
        return {"conversations": [turn(m) for m in r["prompt"]], "completion": side(r["completion"]),
                "label": r["desirable"]}
    pair = {"conversations": [turn(m) for m in r["prompt"]], "chosen": side(r["chosen"]), "rejected": side(r["rejected"])}
    return {**pair, "margin": r["margin"]} if "margin" in r else pair  # a pair's own margin (reward_model) is kept


def _refuse(label, fmt, kind):  # -> DataError when a file of format fmt cannot be data of kind, else None
    name = FORMAT_NAMES[fmt]
    if kind not in ("prompt", None) and fmt in PROMPT_FORMATS:
        return DataError(f"{label}: {name} data has prompts and no responses: it cannot be {kind} data; the online "
                         "losses take it (loss.name=grpo, dr_grpo, dapo, gspo, rloo, reinforce_pp)")
    if kind in ("sft", "preference") and fmt in UNPAIRED_FORMATS:
        return DataError(f"{label}: {name} data (one completion per prompt, labelled desirable or not) cannot be "
                         f"{kind} data: only the losses of unpaired data take it (loss.name=kto)")
    if kind == "unpaired" and fmt in SFT_FORMATS:
        return DataError(f"{label}: SFT data ({name}) has no undesirable examples: it cannot be used as unpaired (kto) "
                         "data; give pairs (each gives a desirable and an undesirable example) or labelled completions")
    if kind == "preference" and fmt in SFT_FORMATS:
        return DataError(f"{label}: SFT data ({name}) has no rejected responses: it cannot be used as "
                         "preference (dpo) data")
    if kind == "sft" and fmt in ("shp", "se"):
        return DataError(f"{label}: {name} is preference-only data; for SFT use hh or an SFT file")
    if kind == "sft" and fmt in ("seed_pref", "trl"):  # hh alone trains SFT on its chosen side, as the original did
        return DataError(f"{label}: {name} data with loss.name=sft: train it with dpo/ipo, or make an "
                         f"SFT file of prompt + chosen with: python data.py convert {label} OUT.json --to sft")
    return None


def load_records(spec, kind):
    """-> (records, origins [(label, raw index)], n dropped, {label: format}). A file's format is its record 0's (the
    spec's name for huggingface_dataset); kind None keeps each format's own kind."""
    if kind not in (*KINDS, None):
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    forced, sources = _sources(spec)
    records, origins, dropped, formats = [], [], 0, {}
    for label, rows in sources:
        if not rows:
            raise DataError(f"{label}: no records (empty dataset)")
        fmt = formats[label] = forced or (_detect(rows[0]) if isinstance(rows[0], dict) else None)
        refused = fmt and _refuse(label, fmt, kind)
        if refused:
            raise refused
        for i, row in enumerate(rows):
            try:
                if not isinstance(row, dict):
                    raise DataError(f"expected a JSON object, got {type(row).__name__}")
                if fmt is None:
                    raise _unrecognized(row, kind)
                found = _detect(row)  # a record of another format, not just one missing some of fmt's keys
                if forced is None and found not in (None, fmt) and not set(_SIGNATURES[found]) < set(_SIGNATURES[fmt]):
                    raise DataError(f"format {FORMAT_NAMES[found]} but record 0 is {FORMAT_NAMES[fmt]} "
                                    "(one format per file)")
                new = [_prompt_of(fmt, row)] if kind == "prompt" else PARSERS[fmt](row)
                if kind == "preference" and row.get("margin") is not None:  # a pair's margin (reward_model)
                    margin = _number(row["margin"], "margin")
                    if margin != margin or abs(margin) == float("inf"):
                        _fail("margin", f"must be a finite number, got {margin}")
                    new = [{**r, "margin": margin} for r in new]
            except DataError as e:
                raise DataError(f"{label}: record {i}: {e}") from None
            dropped += not new
            new = [x for r in new for x in _as_kind(r, kind)]
            records += new
            origins += [(label, i)] * len(new)
    if not records:
        raise DataError(f"{', '.join(formats)}: no usable records (empty dataset; {dropped} dropped)")
    return records, origins, dropped, formats


def load_examples(spec: dict, kind: str) -> list[dict]:
    """Load and validate one dataset spec {type, path, name, split}; kind 'sft' | 'preference' | 'unpaired' | 'prompt'.
    Returns sft: [{"messages": [{"role", "content"}, ...]}]; preference: [{"prompt": [msgs], "chosen": [assistant
    msgs], "rejected": [assistant msgs]}]; unpaired: [{"prompt": [msgs], "completion": [assistant msgs], "desirable":
    bool}] (a pair file gives two per pair: _as_kind); prompt: [{"prompt": [msgs ending with a user turn],
    "prompt_is_text": bool, "columns": {field: value}}] (_prompt_of). Raises DataError naming file, record index and
    field."""
    return load_records(spec, kind)[0]
