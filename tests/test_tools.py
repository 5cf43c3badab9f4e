"""What a researcher runs right after train.py (issue 22): evaluation without training (eval_only, of the weights
alone), runs compared (plot.py), chat and batch generation (chat.py; a LoRA run's step checkpoint on its base; a reward
model on chat's device)."""
import json
import math
import os
import shutil

import pytest
import torch

import checkpoints
import train
from conftest import ROOT, TINY, local_model_overrides, read_jsonl

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


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # dcp in one process, as intended
@pytest.mark.parametrize("how", ["no optimizer", "save_optimizer=false", "sharded"])
def test_eval_only_loads_the_weights_alone(how, tmp_path, monkeypatch):
    """eval_only=true resume=auto reads a checkpoint's weights and never its optimizer state: a final/ whose
    training_state.pt lost its optimizer, one without training_state.pt (save_optimizer=false: the export), one with
    the weights in dcp/ (a sharded run's) give the run's own last evaluation."""
    run, copy = tmp_path / "run", tmp_path / "copy"
    common = ["n_examples=32", "n_epochs=null", "n_eval_examples=16", "report_to_tensorboard=false"]
    assert train.main(TINY["dpo"], [*common, f"output_dirs={run}"]) == 0
    last = [r for r in read_jsonl(run / "metrics.jsonl") if "eval/loss" in r][-1]
    copy.mkdir()
    shutil.copy(run / "config.yaml", copy)
    final = shutil.copytree(run / "final", copy / "final")
    state = torch.load(final / "training_state.pt", weights_only=True)
    masters = state.pop("master_weights")
    del state["optimizer"]
    if how == "sharded":  # as a sharded run writes it: weights (and optimizer) in dcp/, the rest beside
        import torch.distributed.checkpoint as dcp
        dcp.save({"model": masters}, checkpoint_id=str(final / "dcp"), no_dist=True)
    if how == "save_optimizer=false":
        os.remove(final / "training_state.pt")
    else:
        torch.save(state if how == "sharded" else {**state, "master_weights": masters}, final / "training_state.pt")
    marks = json.load(open(final / "trainer_state.json"))  # the files as they are now: not a damaged checkpoint
    os.remove(final / "trainer_state.json")
    (final / "trainer_state.json").write_text(json.dumps({**marks, "files": checkpoints.checkpoint_files(final)}))

    def never(*args, **kwargs):
        raise AssertionError("eval_only loaded an optimizer state")
    monkeypatch.setattr(torch.optim.Optimizer, "load_state_dict", never)
    assert train.main(TINY["dpo"], [*common, f"output_dirs={copy}", "resume=auto", "eval_only=true"]) == 0
    report = json.load(open(copy / "eval.json"))
    assert report["model"] == str(final)
    for key in ("eval/loss", "eval/rewards/accuracies", "eval/rewards/margins"):
        assert report[key] == pytest.approx(last[key], rel=1e-5, abs=1e-7), key


def fake_run(folder, overrides, losses):
    """A run folder as plot.py reads it: the config.yaml of tiny-dpo.yml with `overrides`, and a metrics.jsonl."""
    from config import config_yaml, load_config
    folder.mkdir()
    (folder / "config.yaml").write_text(config_yaml(load_config(TINY["dpo"], overrides)))
    (folder / "metrics.jsonl").write_text("".join(json.dumps({"step": i + 1, "loss": v}) + "\n"
                                                  for i, v in enumerate(losses)))


def test_plot_labels_leave_out_what_does_not_change_training(tmp_path, capsys):
    """Two runs that differ in lr and in keys that do not change the maths (exp_name, output_dirs, logging, eval
    and save frequency, wandb, ...): labelled by lr alone."""
    import plot
    fake_run(tmp_path / "a", ["lr=1e-3"], [0.7, 0.6])
    fake_run(tmp_path / "b", ["lr=1e-4", "exp_name=other", "print_log_step=1", "eval_every_steps=2",
                              "save_model_step=3", "save_total_limit=2", "wandb.project=p", "sample_during_eval=true",
                              "report_to_tensorboard=false", "debug=true", "resume=auto"], [0.7, 0.65])
    assert plot.main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "runs.png")]) == 0
    said = capsys.readouterr().out
    assert said.strip().endswith("a (lr=0.001); b (lr=0.0001)"), said


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


@pytest.fixture(scope="module", params=["name_or_path", "from_config"])
def lora_run(request, tiny_model_dir, tmp_path_factory):
    """A 2-step LoRA DPO run with a step-1 checkpoint (the adapter only) and final/ (also the merged model), on a
    model folder (model.name_or_path) or on a random base (model.from_config, the example's)."""
    run = tmp_path_factory.mktemp("lora") / "run"
    base = local_model_overrides(tiny_model_dir) if request.param == "name_or_path" else []
    assert train.main(TINY["dpo"], [*base, "model.lora={}", "model.reference_dtype=null", "lr=1e-2", "warmup_steps=0",
                                    "total_batch_size=8", "n_examples=16", "n_epochs=null", "n_eval_examples=0",
                                    "save_model_step=1", "report_to_tensorboard=false", f"output_dirs={run}"]) == 0
    return request.param, run


def greedy_ids(model, tokenizer, text="hello", n=8):
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                              pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:].tolist()


def test_chat_loads_a_lora_step_checkpoint_on_its_base(lora_run, tiny_model_dir, tmp_path):
    """`chat.py RUN/step-000001` of a LoRA run (adapter/ and config.yaml, no merged weights): the adapter on the base
    that config.yaml names (a model folder, or model.from_config drawn again under the run's seed), as the run
    folder resolves it when its newest checkpoint is that one; the same logits and greedy reply as peft on the base
    loaded by hand (from_config: as the merged model final/ holds)."""
    import peft
    from transformers import AutoModelForCausalLM

    import chat
    from adapters import quiet_peft
    kind, run = lora_run
    step = run / "step-000001"
    assert not (step / "config.json").exists() and (step / "adapter" / "adapter_config.json").is_file()
    shutil.copytree(run, tmp_path / "run", ignore=lambda folder, names: ["final"] if folder == str(run) else [])
    assert chat.find_model(str(step)) == (str(step / "config.yaml"), str(step / "adapter"))
    assert chat.find_model(str(tmp_path / "run")) == (str(tmp_path / "run" / "step-000001" / "config.yaml"),
                                                      str(tmp_path / "run" / "step-000001" / "adapter"))
    if kind == "name_or_path":
        model, tokenizer = chat.load(str(step), "cpu")
        with quiet_peft():
            by_hand = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                                     str(step / "adapter")).merge_and_unload().eval()
    else:  # final/ without its merged weights is a step checkpoint of the last step
        last = shutil.copytree(run / "final", tmp_path / "last", ignore=shutil.ignore_patterns("model*", "config.json"))
        model, tokenizer = chat.load(str(last), "cpu")
        by_hand = AutoModelForCausalLM.from_pretrained(run / "final").eval()
    ids = torch.tensor([tokenizer("hello there, how are you")["input_ids"]])
    with torch.no_grad():
        got, want = model(ids).logits, by_hand(ids).logits
        plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir)(ids).logits
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    assert kind == "from_config" or (got - plain).abs().max() > 1e-3  # the adapter is on
    assert greedy_ids(model, tokenizer) == greedy_ids(by_hand, tokenizer)


def test_chat_scores_with_a_reward_model_on_its_device(tiny_model_dir, tiny_reward_model_dir, tmp_path, monkeypatch):
    """--rewards with a reward model's folder: it scores every completion, on chat's --device (cpu here, though a
    GPU is seen)."""
    import chat
    import reward_models
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    placed = []
    monkeypatch.setattr(reward_models.ModelReward, "load", lambda self, real=reward_models.ModelReward.load: (
        real(self), placed.append(next(self.model.parameters()).device.type)))
    out = tmp_path / "out.jsonl"
    prompts = os.path.join(ROOT, "tests", "fixtures", "prompts_gsm8k.jsonl")
    assert chat.main([tiny_model_dir, "--prompts", prompts, "--out", str(out), "--rewards", tiny_reward_model_dir,
                      "--max_new_tokens", "4", "--device", "cpu"]) == 0
    rows = read_jsonl(out)
    name = f"rewards/{os.path.basename(tiny_reward_model_dir)}"
    assert placed == ["cpu"] and all(math.isfinite(r[name]) and r["reward"] == r[name] for r in rows), rows[0]
