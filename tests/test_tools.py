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
