"""What a researcher runs right after train.py (issue 22): evaluation without training (eval_only), runs compared
(plot.py)."""
import json
import math
import os

import pytest

import train
from conftest import ROOT, TINY, read_jsonl

GRPO = os.path.join(ROOT, "example", "tiny-grpo.yml")


@pytest.mark.parametrize("config, overrides, keys", [
    (TINY["sft"], [], {"eval/loss", "eval/perplexity"}),
    (TINY["dpo"], [], {"eval/loss", "eval/rewards/accuracies", "eval/rewards/margins"}),
    (TINY["dpo"], ["loss.name=reward_model", "loss.beta=null"], {"eval/loss", "eval/rewards/accuracies"}),
    (GRPO, ["eval_num_generations=2", "rollout.max_new_tokens=4"], {"eval/reward", "eval/pass@1", "eval/pass@2",
                                                                     "eval/mean@2"}),
], ids=["sft", "dpo", "reward_model", "grpo"])
def test_eval_only_writes_eval_json_and_nothing_else(config, overrides, keys, tmp_path):
    run = tmp_path / "run"
    assert train.main(config, [*overrides, f"output_dirs={run}", "eval_only=true", "n_eval_examples=16"]) == 0
    assert os.listdir(run) == ["eval.json"]
    report = json.load(open(run / "eval.json"))
    assert keys <= set(report) and report["n_eval_examples"] == 16, report
    if "eval/perplexity" in keys:
        assert report["eval/perplexity"] == pytest.approx(math.exp(report["eval/loss"]))


def test_eval_only_of_a_checkpoint_is_the_runs_own_last_evaluation(tmp_path):
    """resume=<run>/final eval_only=true: the numbers the run logged at its end, in eval.json beside it."""
    run = tmp_path / "run"
    common = [f"output_dirs={run}", "n_examples=64", "n_epochs=null", "n_eval_examples=32"]
    assert train.main(TINY["dpo"], common) == 0
    last = [r for r in read_jsonl(run / "metrics.jsonl") if "eval/loss" in r][-1]
    assert train.main(TINY["dpo"], [*common, f"resume={run / 'final'}", "eval_only=true"]) == 0
    report = json.load(open(run / "eval.json"))
    assert report["model"] == str(run / "final")
    for key in ("eval/loss", "eval/rewards/accuracies", "eval/rewards/margins"):
        assert report[key] == pytest.approx(last[key], rel=1e-5, abs=1e-7), key


def test_plot_compares_runs_labelled_by_what_differs(tmp_path, capsys):
    import plot
    common = ["n_examples=64", "n_epochs=null", "n_eval_examples=32", "report_to_tensorboard=false"]
    for name, loss in (("a", ["loss.name=dpo"]), ("b", ["loss.name=simpo", "loss.beta=2.0"])):
        assert train.main(TINY["dpo"], [*common, *loss, f"output_dirs={tmp_path / name}"]) == 0
    capsys.readouterr()
    out = tmp_path / "runs.png"
    assert plot.main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert out.stat().st_size > 10_000 and out.read_bytes()[:4] == b"\x89PNG"
    assert "a (loss.beta=0.1, loss.name=dpo" in said and "b (loss.beta=2.0, loss.name=simpo" in said, said
    assert "output_dirs" not in said
    (tmp_path / "empty").mkdir()
    for folder, needle in ((tmp_path / "nope", "no such folder"), (tmp_path / "empty", "holds no run")):
        assert plot.main([str(tmp_path / "a"), str(folder)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0] and str(folder) in err[0], err


def read_until(fd, needle, timeout=60) -> str:
    """What a pseudo-terminal printed up to and including `needle`."""
    import select
    import time
    out, deadline = b"", time.time() + timeout
    while needle.encode() not in out:
        assert time.time() < deadline, out.decode(errors="replace")
        if select.select([fd], [], [], 0.5)[0]:
            out += os.read(fd, 4096)
    return out.decode(errors="replace")


def test_chat_in_a_terminal_streams_the_greedy_reply_and_keeps_the_history(tiny_model_dir):
    """chat.py in a pseudo-terminal: a typed message gets the model's greedy reply (the chat template rendered, as
    transformers alone gives it); the second turn sees the first; /reset and /exit."""
    import pty
    import subprocess
    import sys

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import data
    from conftest import OFFLINE_ENV
    tokenizer = data.prepare_tokenizer(AutoTokenizer.from_pretrained(tiny_model_dir))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)

    def greedy(messages):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)["input_ids"]
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    main, child = pty.openpty()
    proc = subprocess.Popen([sys.executable, "chat.py", tiny_model_dir, "--temperature", "0", "--max_new_tokens", "6"],
                            stdin=child, stdout=child, stderr=child, cwd=ROOT, env={**os.environ, **OFFLINE_ENV})
    os.close(child)
    try:
        read_until(main, "you> ")
        os.write(main, b"hello\n")
        first = read_until(main, "you> ").split("model> ", 1)[1].rsplit("you> ", 1)[0].strip()
        reply = greedy([{"role": "user", "content": "hello"}])
        assert first == reply.strip()
        os.write(main, b"and again\n")
        second = read_until(main, "you> ").split("model> ", 1)[1].rsplit("you> ", 1)[0].strip()
        history = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": reply},
                   {"role": "user", "content": "and again"}]
        assert second == greedy(history).strip()
        os.write(main, b"/reset\n")
        assert "(history cleared)" in read_until(main, "you> ")
        os.write(main, b"/exit\n")
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
        os.close(main)


def test_chat_generates_for_a_prompt_file_with_rewards(tiny_model_dir, tmp_path):
    import chat
    out = tmp_path / "out.jsonl"
    prompts = os.path.join(ROOT, "tests", "fixtures", "prompts_gsm8k.jsonl")
    assert chat.main([tiny_model_dir, "--prompts", prompts, "--out", str(out), "--num_generations", "2",
                      "--rewards", "math", "--max_new_tokens", "5", "--temperature", "1"]) == 0
    rows = read_jsonl(out)
    n = len(read_jsonl(prompts))
    assert len(rows) == 2 * n and [(r["index"], r["sample"]) for r in rows[:2]] == [(0, 0), (0, 1)]
    assert all(r["reward"] in (0.0, 1.0) and r["rewards/math"] == r["reward"] and r["completion"] for r in rows)
    again = tmp_path / "again.jsonl"
    chat.main([tiny_model_dir, "--prompts", prompts, "--out", str(again), "--num_generations", "2",
               "--max_new_tokens", "5", "--temperature", "1"])
    assert [r["completion"] for r in read_jsonl(again)] == [r["completion"] for r in rows]  # seeded


@pytest.mark.parametrize("what, needle", [("nowhere", "no such folder"), ("empty", "holds no model"),
                                          ("no prompts", "record 0: no prompt")])
def test_chat_mistakes_are_one_line(what, needle, tiny_model_dir, tmp_path, capsys):
    import chat
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.json").write_text('[{"foo": 1}]')
    args = {"nowhere": [str(tmp_path / "nowhere")], "empty": [str(tmp_path / "empty")],
            "no prompts": [tiny_model_dir, "--prompts", str(tmp_path / "bad.json")]}[what]
    assert chat.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
