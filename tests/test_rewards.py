"""Tests for rewards.py (issue 20): the math / format / overlong built-ins on hand-made cases, loading user functions
and its one-line errors, calling them (misbehaving functions are one-line errors naming the function, the record
and the value), combining with weights and None, and example/rewards.py.

Run: ``OMP_NUM_THREADS=1 python -m pytest -q tests/test_rewards.py``
"""

import math
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from rewards import (Reward, call_reward, completion_text, extract_answer, load_reward, load_rewards,  # noqa: E402
                     math_reward, reward_metrics, reward_sums, score)
from utils import TrainingError, UserError  # noqa: E402

GSM8K_ANSWER = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips "
                "altogether in April and May.\n#### 72")


def math_score(completions, **columns):
    return math_reward(prompts=["q"] * len(completions), completions=completions,
                       completion_ids=[[]] * len(completions), **columns)


# ---------------------------------------------------------------------------------------------------------------------
# math
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("completion,gold", [
    ("The answer is 72.", "72"),
    ("She sold 3 boxes, so 72.00", "72"),
    ("It costs 1,080 in total.", "1080"),
    ("It costs $1,080.", "1080"),
    ("It costs $1,080.", "$1,080"),
    ("Work: 48 + 24\n#### 72", GSM8K_ANSWER),  # the gold is a whole GSM8K solution ending in #### 72
    ("I think 10 and then 72", GSM8K_ANSWER),  # the last number
    ("#### 72 clips\nand later 5", "72"),  # '####' wins over the last number
    ("so \\boxed{1,080} it is, not 3", "1080"),
    ("so \\boxed{\\frac{1}{2}}", "0.5"),  # LaTeX: math-verify
    ("The answer is 0.5", "\\frac{1}{2}"),
    ("$x = \\boxed{\\frac{\\pi}{2}}$", "The solution ... so $\\boxed{\\pi/2}$."),  # MATH's solution column
    ("-3 degrees", "-3"),
])
def test_math_matches(completion, gold):
    assert math_score([completion], answer=[gold]) == [1.0]


@pytest.mark.parametrize("completion,gold", [
    ("The answer is 72.", "720"),
    ("The answer is 73", GSM8K_ANSWER),
    ("#### 71\nthen 72", "72"),  # the '####' answer counts, not a later number
    ("no idea", "72"),
    ("\\boxed{\\frac{1}{3}}", "0.5"),
    ("1,2,3", "123"),  # a list of numbers is not 123: the last number is 3
])
def test_math_does_not_match(completion, gold):
    assert math_score([completion], answer=[gold]) == [0.0]


def test_math_reference_columns_messages_and_none():
    messages = [[{"role": "assistant", "content": "... #### 72"}], [{"role": "assistant", "content": "It is 5"}]]
    assert math_score(messages, solution=["72", "6"]) == [1.0, 0.0]
    assert math_score(["72", "72"], ground_truth=[72, None]) == [1.0, None]  # no reference: cannot score
    assert math_score(["72"], reward_model=[{"ground_truth": "72", "style": "rule"}]) == [1.0]  # verl's parquet
    assert math_score(["72"], answer=["72"], solution=["5"]) == [1.0]  # answer first
    with pytest.raises(UserError, match="math reward needs a column answer / solution / ground_truth.*question"):
        math_score(["72"], question=["how many?"])


def test_extract_answer_and_completion_text():
    assert extract_answer("a \\boxed{x^{2}+1} b") == "x^{2}+1"  # nested braces
    assert extract_answer("1,080. Then 2.") == "2"
    assert extract_answer("nothing here") is None
    assert extract_answer("\\frac{1}{2}", fallback_last_number=False) is None
    assert completion_text([{"role": "assistant", "content": [{"type": "text", "text": "a"}, {"type": "text",
                                                                                           "text": "b"}]}]) == "ab"


# ---------------------------------------------------------------------------------------------------------------------
# format, overlong
# ---------------------------------------------------------------------------------------------------------------------
def call(reward, completions=None, completion_ids=None):
    n = len(completions if completions is not None else completion_ids)
    return reward.fn(prompts=["p"] * n, completions=completions or ["c"] * n, completion_ids=completion_ids or [[]] * n)


def test_format():
    default = load_reward("format")
    assert call(default, ["<think>a\nb</think>\nanswer", "answer <think>late</think>", "<think>open"]) == [1, 0, 0]
    gsm8k = load_reward("format", pattern=r".*#### -?\d+\s*")
    assert call(gsm8k, ["work\n#### 42", "#### 42 clips", [{"role": "assistant", "content": "x #### 7"}]]) == [1, 0, 1]
    with pytest.raises(UserError, match="reward 'format': pattern '\\(' is not a regular expression"):
        load_reward("format", pattern="(")


def test_overlong_values_at_the_edges():
    reward = load_reward("overlong", max_length=10, buffer=4)  # penalty starts after 6 tokens, -1 from 10
    lengths = [0, 6, 7, 8, 9, 10, 11, 50]
    values = call(reward, completion_ids=[[1] * n for n in lengths])
    assert values == pytest.approx([0, 0, -0.25, -0.5, -0.75, -1, -1, -1], abs=1e-12)
    for bad in ({"max_length": 10, "buffer": 0}, {"max_length": 4, "buffer": 5}, {"max_length": 10.0, "buffer": 2}):
        with pytest.raises(UserError, match="reward 'overlong' needs integers 0 < buffer <= max_length"):
            load_reward("overlong", **bad)
    with pytest.raises(UserError, match="reward 'overlong' takes no option 'length' \\(it takes: max_length, buffer\\)"):
        load_reward("overlong", length=3)


# ---------------------------------------------------------------------------------------------------------------------
# Loading user functions
# ---------------------------------------------------------------------------------------------------------------------
USER_FILE = '''
from dataclasses import dataclass

@dataclass
class Weights:  # a dataclass: the module must be registered by name to import
    short: float = 1.0

def brevity(prompts, completions, completion_ids, **kwargs):
    return [Weights().short / (1 + len(ids)) for ids in completion_ids]

def uses_answer(completions, answer, **kwargs):
    return [float(c == a) for c, a in zip(completions, answer)]

def no_kwargs(prompts, completions, completion_ids):
    return [0.0] * len(prompts)

def positional_only(prompts, completions, completion_ids, /, **kwargs):
    return [0.0] * len(prompts)

def wants_trainer(prompts, completions, completion_ids, trainer, **kwargs):
    return [0.0] * len(prompts)

NOT_A_FUNCTION = 3
'''


@pytest.fixture
def user_file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(USER_FILE)
    return str(path)


def test_load_user_function_from_a_file_and_a_module(user_file):
    brevity = load_reward(f"{user_file}:brevity", weight=0.5)
    assert (brevity.name, brevity.weight) == ("brevity", 0.5)
    assert call(brevity, completion_ids=[[1, 2, 3], []]) == [0.25, 1.0]
    assert load_reward(f"{user_file}:uses_answer", columns=["answer"]).fn(
        prompts=["p"], completions=["x"], completion_ids=[[]], answer=["x"]) == [1.0]
    assert load_reward("rewards:math_reward").fn is math_reward  # importable.module:name
    assert [r.name for r in load_rewards([{"function": "format"}, {"function": "format", "pattern": "a"},
                                          {"function": "math", "weight": 2}])] == ["format", "format_2", "math"]


@pytest.mark.parametrize("spec,message", [
    ("missing/file.py:fn", "reward file not found: missing/file.py \\(rewards: function 'missing/file.py:fn'\\)"),
    ("{file}:nope", "reward function 'nope' not found in .*my_rewards.py \\(it defines: brevity, no_kwargs, "
                    "positional_only, uses_answer, wants_trainer\\)"),
    ("{file}:NOT_A_FUNCTION", "reward function 'NOT_A_FUNCTION' not a function in"),
    ("{file}:no_kwargs", "reward function 'no_kwargs' must accept \\*\\*kwargs \\(the records' columns\\)"),
    ("{file}:positional_only", "reward function 'positional_only' cannot be called as fn\\(prompts, completions, "
                               "completion_ids, \\*\\*columns\\): 'prompts' parameter is positional only"),
    ("no_such_module_xyz:fn", "could not import reward module 'no_such_module_xyz': No module named"),
    ("bogus", "rewards: function 'bogus' is neither a built-in \\(math, format, overlong\\) nor"),
])
def test_load_errors_are_one_line(user_file, spec, message):
    with pytest.raises(UserError, match=message) as info:
        load_reward(spec.format(file=user_file))
    assert "\n" not in str(info.value)


def test_signature_checked_against_known_columns(user_file):
    load_reward(f"{user_file}:wants_trainer")  # columns unknown: 'trainer' may be one
    with pytest.raises(UserError, match="reward function 'wants_trainer' cannot be called .*'trainer'"):
        load_reward(f"{user_file}:wants_trainer", columns=["answer"])
    with pytest.raises(UserError, match="options \\['pattern'\\] are only for the built-ins"):
        load_reward(f"{user_file}:brevity", pattern="x")


def test_a_reward_file_that_fails_to_import(tmp_path):
    path = tmp_path / "broken.py"
    path.write_text("import no_such_package_xyz\n")
    with pytest.raises(UserError, match="could not import reward file .*broken.py: ModuleNotFoundError: No module"):
        load_reward(f"{path}:fn")


# ---------------------------------------------------------------------------------------------------------------------
# Calling and combining
# ---------------------------------------------------------------------------------------------------------------------
def returning(value):
    return Reward("bad", lambda prompts, completions, completion_ids, **kw: value)


def raising(prompts, completions, completion_ids, **kw):
    raise ZeroDivisionError("division by zero\nsecond line")


@pytest.mark.parametrize("reward,message", [
    (Reward("boom", raising), "reward function 'boom' raised ZeroDivisionError: division by zero second line "
                              "\\(scoring records \\[10, 11, 12\\]\\)"),
    (returning([1.0, 2.0]), "reward function 'bad' returned 2 values for 3 completions"),
    (returning(None), "reward function 'bad' returned None for 3 completions"),
    (returning([1.0, math.nan, 0.0]), "reward function 'bad' returned nan \\(float\\) for record 11 \\(completion 1\\)"),
    (returning([1.0, 0.0, "0.5"]), "reward function 'bad' returned '0.5' \\(str\\) for record 12 \\(completion 2\\)"),
    (returning([math.inf, 0.0, 1.0]), "reward function 'bad' returned inf \\(float\\) for record 10"),
    (returning([[1.0], 0.0, 1.0]), "reward function 'bad' returned \\[1.0\\] \\(list\\) for record 10"),
])
def test_misbehaving_functions_are_one_line_training_errors(reward, message):
    with pytest.raises(TrainingError, match=message) as info:
        call_reward(reward, ["p"] * 3, ["c"] * 3, [[]] * 3, {}, records=[10, 11, 12])
    assert "\n" not in str(info.value)


def test_call_accepts_none_numbers_and_arrays():
    assert call_reward(returning(torch.tensor([1.0, 0.5])), ["p"] * 2, ["c"] * 2, [[]] * 2, {}) == [1.0, 0.5]
    got = call_reward(returning((None, True, 3)), ["p"] * 3, ["c"] * 3, [[]] * 3, {})
    assert math.isnan(got[0]) and got[1:] == [1.0, 3.0]


def test_score_weighted_sum_with_none_as_trl():
    first = Reward("first", lambda prompts, completions, completion_ids, **kw: [1.0, None, None, 0.0], 2.0)
    second = Reward("second", lambda prompts, completions, completion_ids, **kw: [0.5, 2.0, None, 1.0], 0.5)
    total, per_function = score([first, second], ["p"] * 4, ["c"] * 4, [[]] * 4, {})
    torch.testing.assert_close(total, torch.tensor([2.25, 1.0, math.nan, 0.5]), equal_nan=True)
    torch.testing.assert_close(per_function["first"], torch.tensor([1.0, math.nan, math.nan, 0.0]), equal_nan=True)
    halves = [reward_sums(total[:2], {k: v[:2] for k, v in per_function.items()}),
              reward_sums(total[2:], {k: v[2:] for k, v in per_function.items()})]
    metrics = reward_metrics({k: halves[0][k] + halves[1][k] for k in halves[0]})  # as summed over 2 processes
    assert metrics["reward"] == pytest.approx((2.25 + 1.0 + 0.5) / 3)
    assert metrics["reward_std"] == pytest.approx(torch.tensor([2.25, 1.0, 0.5]).std().item())
    assert metrics["frac_reward_unscored"] == pytest.approx(0.25)
    assert metrics["rewards/first/mean"] == pytest.approx(0.5)
    assert metrics["rewards/second/mean"] == pytest.approx(3.5 / 3)
    assert metrics["rewards/second/std"] == pytest.approx(torch.tensor([0.5, 2.0, 1.0]).std().item())


def test_score_passes_columns_and_message_completions():
    seen = {}

    def spy(prompts, completions, completion_ids, **columns):
        seen.update(columns, prompts=prompts, completions=completions)
        return [1.0] * len(completions)
    completions = [[{"role": "assistant", "content": "#### 72"}]]
    score([Reward("spy", spy), load_reward("math")], ["q"], completions, [[5]], {"answer": ["72"], "id": [7]})
    assert seen == {"answer": ["72"], "id": [7], "prompts": ["q"], "completions": completions}


# ---------------------------------------------------------------------------------------------------------------------
# example/rewards.py
# ---------------------------------------------------------------------------------------------------------------------
def test_example_reward_depends_on_the_prompt():
    from tokenizers import Tokenizer
    tokenizer = Tokenizer.from_file(os.path.join(ROOT, "example", "tokenizer", "tokenizer.json"))
    reward = load_reward(os.path.join(ROOT, "example", "rewards.py") + ":write_what_is_asked")
    ids = tokenizer.encode(" 12 apples and 345").ids  # ' 12', ' a', 'pp', 'les', ' and', ' 34', '5'
    assert [tokenizer.decode([i]) for i in ids] == [" 12", " a", "pp", "les", " and", " 34", "5"]
    eos = tokenizer.token_to_id("<|im_end|>")
    prompts = ["Please write numbers.", [{"role": "user", "content": "Please write words."}], "Hello"]
    values = reward.fn(prompts=prompts + ["Please write numbers."], completions=["x"] * 4,
                       completion_ids=[ids, ids + [eos], ids, []])
    assert values == [3 / 7, 4 / 7, None, 0.0]  # the end-of-sequence token counts as neither


# ---------------------------------------------------------------------------------------------------------------------
# A reward model runs where the run runs
# ---------------------------------------------------------------------------------------------------------------------
def test_a_reward_model_stays_on_the_runs_device(tiny_reward_model_dir, monkeypatch):
    """device: cpu (load_rewards' device, and what online.py passes from the config) keeps a reward model on the
    CPU even where a GPU is seen: with torch.cuda.is_available() forced True it would otherwise move to CUDA."""
    import online
    from config import load_config
    from models import build_tokenizer
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    direct = load_rewards([{"model": tiny_reward_model_dir}], device="cpu")[0]
    cfg = load_config(os.path.join(ROOT, "example", "tiny-grpo.yml"),
                      [f"rewards=[{{model: {tiny_reward_model_dir}}}]", "device=cpu"])
    from_run = online.OnlineObjective(cfg, build_tokenizer(cfg)).rewards[0]
    for reward in (direct, from_run):
        scores = reward.fn(prompts=["Say hi.", "Count."], completions=["hi", "1 2 3"], completion_ids=[[], []])
        assert len(scores) == 2 and all(math.isfinite(s) for s in scores)
        assert {p.device.type for p in reward.fn.model.parameters()} == {"cpu"}
