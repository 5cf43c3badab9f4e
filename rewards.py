"""Reward functions for online RL (issue 20): loading users' functions, the built-ins, calling and combining them.

A reward function has TRL's signature, so that users can bring theirs:

    fn(prompts, completions, completion_ids, **columns) -> list[float | None]

called with keywords, one value per completion: ``prompts`` and ``completions`` are strings, or message lists
(``[{"role": "assistant", "content": ...}]``) when the prompts are conversations; ``completion_ids`` are lists of
token ids; ``columns`` are the records' other fields by name (``answer``, ``solution``, ...), each a list aligned with
the completions. None means "cannot score this one": its advantage is 0 (rl_losses).

`rewards:` entries name a built-in (``math``, ``format``, ``overlong``, with their options beside ``function``) or
``path/to/file.py:name`` / ``importable.module:name``. Mistakes there are one-line ``UserError``s at load time, before
any model loads; a function that misbehaves during training is a one-line ``TrainingError``.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import numbers
import os
import re
import sys
import threading
from dataclasses import dataclass
from typing import Callable

import torch

from utils import TrainingError, UserError

ARGUMENTS = ("prompts", "completions", "completion_ids")
GOLD_COLUMNS = ("answer", "solution", "ground_truth")  # where the math reward finds the reference answer


@dataclass(frozen=True)
class Reward:
    name: str          # unique within a run: its metrics are rewards/<name>/mean and rewards/<name>/std
    fn: Callable
    weight: float = 1.0


def completion_text(completion) -> str:
    """The text of a completion: a string, or the content of the last message of a message list (a conversational
    completion; content given as a list of parts is joined from its text parts)."""
    if isinstance(completion, str):
        return completion
    content = completion[-1]["content"] if completion else ""
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return content or ""


# ---------------------------------------------------------------------------------------------------------------------
# Built-ins
# ---------------------------------------------------------------------------------------------------------------------
NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")  # 1,080 | 72 | 72.5 (a sentence's final '.' is not)
PLAIN_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|-?\.\d+")


def _boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} (or \\fbox{...}), braces matched; None if there is none."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i, depth = text.index("{", start), 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j].strip()
    return None


def extract_answer(text: str, fallback_last_number: bool = True) -> str | None:
    """The final answer in a text: after GSM8K's last ``#### `` (its first number, else the rest of that line), else
    the last \\boxed{...}, else (``fallback_last_number``) the last number; None if none is found."""
    marks = re.findall(r"####\s*([^\n]*)", text)
    if marks:
        number = NUMBER.search(marks[-1])
        return number.group() if number else marks[-1].strip()
    boxed = _boxed(text)
    if boxed is not None:
        return boxed
    numbers_ = NUMBER.findall(text) if fallback_last_number else []
    return numbers_[-1] if numbers_ else None


def parse_number(answer: str) -> float | None:
    """A plain number written the usual ways ("72", "72.", "72.00", "1,080", "$1,080", "-3.5", "45%"), else None."""
    s = answer.strip().replace("\\$", "$").replace("\\%", "%").strip("$% ")
    s = s.rstrip(".") if re.fullmatch(r".*\d\.", s) else s  # "72." is 72
    return float(s.replace(",", "")) if PLAIN_NUMBER.fullmatch(s) else None


def answers_match(predicted: str, gold: str) -> bool:
    """Equal as numbers when both are plain numbers; otherwise as maths by math-verify (LaTeX: \\frac{1}{2} == 0.5).

    math-verify bounds its parsing time with signal.alarm, which works only in the main thread: elsewhere it runs
    without a time limit."""
    a, b = parse_number(predicted), parse_number(gold)
    if a is not None and b is not None:
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)
    from math_verify import parse, verify  # imported here: it takes a second and only LaTeX answers need it
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    parsed_gold = parse(f"${gold}$", parsing_timeout=timeout)
    parsed = parse(f"${predicted}$", parsing_timeout=timeout)
    return bool(parsed_gold and parsed and verify(parsed_gold, parsed, timeout_seconds=timeout))


def _gold(columns: dict, i: int):
    """Record i's reference answer text (from answer / solution / ground_truth, or verl's reward_model.ground_truth)."""
    for key in GOLD_COLUMNS:
        if key in columns:
            value = columns[key][i]
            return None if value is None else str(value)
    if "reward_model" in columns:
        value = (columns["reward_model"][i] or {}).get("ground_truth")
        return None if value is None else str(value)
    raise UserError(f"the math reward needs a column {' / '.join(GOLD_COLUMNS)} with the reference answer; the records "
                    f"have: {', '.join(sorted(columns)) or 'no other columns'}")


def math_reward(prompts, completions, completion_ids, **columns):
    """1.0 if the completion's final answer (``extract_answer``) equals the record's reference answer, else 0.0;
    None when the record has no reference. The reference is extracted the same way (GSM8K's answer column is a whole
    solution ending in ``#### n``; MATH's solution has a \\boxed{}), and is used whole when it has neither mark."""
    out = []
    for i, completion in enumerate(completions):
        gold = _gold(columns, i)
        if gold is None:
            out.append(None)
            continue
        gold = extract_answer(gold, fallback_last_number=False) or gold.strip()
        predicted = extract_answer(completion_text(completion))
        out.append(float(predicted is not None and answers_match(predicted, gold)))
    return out


def format_reward(pattern: str = r"<think>.*?</think>.*"):
    """A reward of 1.0 for completions that match ``pattern`` as a whole (re.fullmatch, '.' matching newlines), else
    0.0. The default asks for DeepSeek-R1's ``<think>...</think>`` reasoning block first (arXiv:2501.12948)."""
    try:
        regex = re.compile(pattern, re.DOTALL)
    except (re.error, TypeError) as e:
        raise UserError(f"reward 'format': pattern {pattern!r} is not a regular expression: {e}") from None

    def matches_format(prompts, completions, completion_ids, **columns):
        return [float(regex.fullmatch(completion_text(c)) is not None) for c in completions]
    return matches_format


def overlong_reward(max_length: int, buffer: int):
    """DAPO's soft overlong punishment (Yu et al. 2025, arXiv:2503.14476, sec. 3.4) on a completion of L tokens:

        0 if L <= max_length - buffer;  (max_length - buffer - L) / buffer if L <= max_length;  -1 beyond

    L is ``len(completion_ids[i])``. max_length is usually rollout.max_new_tokens (a truncated completion gets -1)."""
    if not (isinstance(max_length, int) and isinstance(buffer, int) and 0 < buffer <= max_length):
        raise UserError(f"reward 'overlong' needs integers 0 < buffer <= max_length, got max_length={max_length!r}, "
                        f"buffer={buffer!r}")
    start = max_length - buffer

    def overlong(prompts, completions, completion_ids, **columns):
        return [0.0 if len(ids) <= start else max((start - len(ids)) / buffer, -1.0) for ids in completion_ids]
    return overlong


BUILTINS = {"math": lambda: math_reward, "format": format_reward, "overlong": overlong_reward}  # name -> factory


# ---------------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------------
def check_signature(fn: Callable, name: str, columns=None) -> None:
    """UserError unless ``fn(prompts=..., completions=..., completion_ids=..., **columns)`` binds: the function must
    take those three by keyword (or through **kwargs) and take any other column through **kwargs, as TRL requires
    (it passes more keywords). ``columns``: the records' column names, if known; parameters that are not among the
    three are taken to be columns when they are not."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins have no signature: nothing to check
        return
    params = signature.parameters.values()
    if not any(p.kind is p.VAR_KEYWORD for p in params):
        raise UserError(f"reward function {name!r} must accept **kwargs (the records' columns): define it as "
                        f"def {getattr(fn, '__name__', 'fn')}(prompts, completions, completion_ids, **kwargs)")
    if columns is None:
        columns = [p.name for p in params if p.name not in ARGUMENTS and p.kind in (p.POSITIONAL_OR_KEYWORD,
                                                                                    p.KEYWORD_ONLY)]
    try:
        signature.bind(**{key: [] for key in (*ARGUMENTS, *columns)})
    except TypeError as e:
        raise UserError(f"reward function {name!r} cannot be called as fn(prompts, completions, completion_ids, "
                        f"**columns): {e}") from None


def _import_file(path: str, spec: str):
    if not os.path.isfile(path):
        raise UserError(f"reward file not found: {path} (rewards: function {spec!r})")
    module_name = "reward_file_" + re.sub(r"\W", "_", os.path.splitext(os.path.abspath(path))[0])
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module  # dataclasses and pickling look a module up by its name
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[module_name]
        raise UserError(f"could not import reward file {path}: {type(e).__name__}: {_one_line(e)}") from None
    return module


def _load_user_function(spec: str) -> Callable:
    source, _, attr = spec.rpartition(":")
    if not source or not attr:
        raise UserError(f"rewards: function {spec!r} is neither a built-in ({', '.join(BUILTINS)}) nor "
                        f"'path/to/file.py:name' or 'module:name'")
    if source.endswith(".py") or "/" in source or os.sep in source:
        module = _import_file(source, spec)
    else:
        try:
            module = importlib.import_module(source)
        except ImportError as e:
            raise UserError(f"could not import reward module {source!r}: {_one_line(e)}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        defined = sorted(k for k, v in vars(module).items() if inspect.isfunction(v) and not k.startswith("_")
                         and v.__module__ == module.__name__)
        what = "not found" if fn is None else "not a function"
        raise UserError(f"reward function {attr!r} {what} in {source} (it defines: {', '.join(defined) or 'none'})")
    return fn


def load_reward(function: str, weight: float = 1.0, columns=None, **options) -> Reward:
    """One `rewards:` entry: a built-in with its options (``format``: pattern; ``overlong``: max_length, buffer), or a
    user function (no options). Its signature is checked here (``check_signature``)."""
    if function in BUILTINS:
        factory = BUILTINS[function]
        allowed = list(inspect.signature(factory).parameters)
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise UserError(f"reward {function!r} takes no option {unknown[0]!r} (it takes: {', '.join(allowed) or 'none'})")
        required = [name for name, p in inspect.signature(factory).parameters.items()
                    if p.default is inspect.Parameter.empty and name not in options]
        if required:
            raise UserError(f"reward {function!r} needs {' and '.join(required)}, e.g. "
                            f"{{function: {function}, {', '.join(f'{n}: N' for n in required)}}}")
        if function == "math" and importlib.util.find_spec("math_verify") is None:
            raise UserError("the math reward needs math-verify: pip install math-verify")
        return Reward(function, factory(**options), float(weight))
    if options:
        raise UserError(f"reward function {function!r}: options {sorted(options)} are only for the built-ins; a user "
                        f"function reads the records' columns instead")
    fn = _load_user_function(function)
    name = function.rpartition(":")[2]
    check_signature(fn, name, columns)
    return Reward(name, fn, float(weight))


def load_rewards(entries, columns=None, device=None, shard=False) -> list[Reward]:
    """The `rewards:` list ({function, weight, options...} or {model, weight} each) as Rewards with unique names (a
    repeated name gets _2, _3, ...). device: where a reward model runs (the run's: "cpu" or "cuda"; None: cuda when
    there is a GPU); shard: a reward model sharded over the processes (FSDPTrainer with fsdp.shard_reference)."""
    out, seen = [], {}
    for i, entry in enumerate(entries):
        entry = dict(entry)
        if "model" in entry:  # a trained reward model (reward_models.py)
            from reward_models import ModelReward
            fn = ModelReward(entry.pop("model"), f"rewards[{i}].model", device, shard)
            reward = Reward(fn.__name__, fn, float(entry.pop("weight", 1.0)))
        else:
            reward = load_reward(entry.pop("function"), entry.pop("weight", 1.0), columns, **entry)
        seen[reward.name] = seen.get(reward.name, 0) + 1
        name = reward.name if seen[reward.name] == 1 else f"{reward.name}_{seen[reward.name]}"
        out.append(Reward(name, reward.fn, reward.weight))
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Calling and combining
# ---------------------------------------------------------------------------------------------------------------------
def _one_line(value, limit: int = 200) -> str:
    text = " ".join(str(value).split())
    return text if len(text) <= limit else text[:limit] + "..."


def call_reward(reward: Reward, prompts, completions, completion_ids, columns: dict, records=None) -> list[float]:
    """One function's values for N completions, None as NaN. ``records``: each completion's record id (its index in
    the dataset), for the messages; default: its position. A function that raises, returns other than N values, a
    non-number, NaN or an infinity is a one-line TrainingError naming the function, the record and the value."""
    records = list(range(len(completions))) if records is None else records
    try:
        values = reward.fn(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
    except UserError:
        raise
    except Exception as e:
        raise TrainingError(f"reward function {reward.name!r} raised {type(e).__name__}: {_one_line(e)} (scoring "
                            f"records {_one_line(sorted(set(records)), 80)})") from e
    values = values.tolist() if hasattr(values, "tolist") else values
    if not isinstance(values, (list, tuple)) or len(values) != len(completions):
        got = f"{len(values)} values" if isinstance(values, (list, tuple)) else _one_line(repr(values), 80)
        raise TrainingError(f"reward function {reward.name!r} returned {got} for {len(completions)} completions "
                            f"(expected a list with one float or None per completion)")
    out = []
    for i, value in enumerate(values):
        if value is None:
            out.append(math.nan)
        elif isinstance(value, numbers.Real) and math.isfinite(value):
            out.append(float(value))
        else:
            raise TrainingError(f"reward function {reward.name!r} returned {_one_line(repr(value), 80)} "
                                f"({type(value).__name__}) for record {records[i]} (completion {i}); expected a "
                                f"finite number, or None for 'cannot score'")
    return out


def score(rewards: list[Reward], prompts, completions, completion_ids, columns: dict, records=None):
    """(total [N], {name: [N]}) float32 tensors: each function's values (NaN = None) and their weighted sum.

    As TRL: the sum skips a function's None (NaN-sum over functions), and a completion that EVERY function left
    unscored is NaN, "cannot score" (advantage 0), rather than 0, which would bias its group's baseline."""
    per_function = {r.name: torch.tensor(call_reward(r, prompts, completions, completion_ids, columns, records),
                                         dtype=torch.float32) for r in rewards}
    stacked = torch.stack([per_function[r.name] * r.weight for r in rewards], dim=1)
    total = stacked.nansum(dim=1)
    total[torch.isnan(stacked).all(dim=1)] = math.nan
    return total, per_function


def prompt_for_rewards(record):
    """A prompt record (data kind "prompt") as reward functions receive it: its text, or its messages."""
    return record["prompt"][-1]["content"] if record["prompt_is_text"] else record["prompt"]


def score_records(rewards: list[Reward], records, texts, completion_ids, num_generations: int):
    """`score` of the completions of prompt records (num_generations each, adjacent), called as TRL calls reward
    functions: prompts and completions as text, or as messages when the prompt is a conversation; every other field
    of the record as a keyword argument, one value per completion."""
    repeat = lambda values: [v for v in values for _ in range(num_generations)]  # noqa: E731
    conversational = repeat([not r["prompt_is_text"] for r in records])
    shown = [[{"role": "assistant", "content": t}] if chat else t for t, chat in zip(texts, conversational)]
    names = sorted({k for r in records for k in r["columns"]} - set(ARGUMENTS))
    columns = {k: repeat([r["columns"].get(k) for r in records]) for k in names}
    return score(rewards, repeat([prompt_for_rewards(r) for r in records]), shown, completion_ids, columns)


def reward_sums(total: torch.Tensor, per_function: dict) -> dict:
    """What TRL's reward metrics are made of, as sums that add up over processes: for the total and for each
    function, the count, sum and sum of squares of the scored (non-None) rewards; and the number of completions."""
    sums = {"n": len(total)}
    for name, values in [("reward", total), *((f"rewards/{k}", v) for k, v in per_function.items())]:
        scored = values[~torch.isnan(values)].double()
        sums.update({f"{name}:count": len(scored), f"{name}:sum": scored.sum().item(),
                     f"{name}:squares": (scored ** 2).sum().item()})
    return sums


def reward_metrics(sums: dict) -> dict:
    """TRL's reward metrics from the global batch's reward_sums: reward, reward_std, rewards/<name>/mean and /std
    (over the scored completions; std with Bessel's correction, as TRL's nanstd) and frac_reward_unscored, the
    share that every function left unscored."""
    out = {"frac_reward_unscored": 1 - sums["reward:count"] / max(sums["n"], 1)}
    for name in [k[:-len(":count")] for k in sums if k.endswith(":count")]:
        n, total, squares = sums[f"{name}:count"], sums[f"{name}:sum"], sums[f"{name}:squares"]
        mean = total / n if n else math.nan
        std = math.sqrt(max(squares - n * mean ** 2, 0.0) / (n - 1)) if n > 1 else math.nan
        out.update({name: mean, "reward_std": std} if name == "reward" else {f"{name}/mean": mean, f"{name}/std": std})
    return out
