"""End to end: tiny SFT and DPO runs, their outputs, gradient accumulation, the reference model, archives."""
import glob
import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import metrics
import train
from config import load_config
from conftest import ROOT, TINY, build, local_model_overrides, one_sgd_step, params_of, read_jsonl, run_cli

@pytest.fixture(scope="module")
def tiny_dpo_run(tmp_path_factory):
    """The example as shipped (WandB offline, eval samples on), run once for the tests below: (run folder, process)."""
    tmp_path = tmp_path_factory.mktemp("tiny-dpo")
    run = tmp_path / "run"
    proc = run_cli("train.py", "example/tiny-dpo.yml", "--overrides", f"output_dirs={run}", "wandb.enabled=true",
                   "sample_during_eval=true", "n_eval_model_samples=2", "max_new_tokens=8",
                   env={"WANDB_DIR": str(tmp_path), "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run, proc


def test_tiny_dpo_learns_and_logs_every_metric(tiny_dpo_run):
    """The example as shipped: held-out reward accuracy >= 0.9, and every metric a user looks at."""
    run, _ = tiny_dpo_run
    metrics = read_jsonl(run / "metrics.jsonl")
    evals = [m for m in metrics if "eval/rewards/accuracies" in m]
    assert evals[0]["step"] == 0 and evals[-1]["eval/rewards/accuracies"] >= 0.9, evals
    train_rows = [m for m in metrics if "loss" in m]
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected", "logits/chosen", "logits/rejected", "grad_norm", "lr", "tokens_per_second",
                "examples_seen"):
        assert key in train_rows[-1], key
    assert train_rows[-1]["loss"] < 0.6931 - 0.1                      # DPO starts at log 2


def test_tiny_dpo_tensorboard_has_the_jsonl_values(tiny_dpo_run):
    run, _ = tiny_dpo_run
    train_rows = [m for m in read_jsonl(run / "metrics.jsonl") if "loss" in m]
    # TensorBoard events readable, same values as the JSONL
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    assert [e.value for e in acc.Scalars("loss")] == pytest.approx([m["loss"] for m in train_rows], rel=1e-5)
    assert "eval/rewards/accuracies" in acc.Tags()["scalars"]


def test_tiny_dpo_wandb_offline_run_has_the_samples_table(tiny_dpo_run):
    run, _ = tiny_dpo_run
    assert glob.glob(str(run / "wandb" / "offline-run-*"))             # WandB offline run, with the samples table
    tables = glob.glob(str(run / "wandb" / "offline-run-*" / "files" / "media" / "table" / "samples_*.table.json"))
    assert tables and json.load(open(tables[0]))["columns"] == ["prompt", "policy", "reference"]


def test_tiny_dpo_writes_curve_samples_configs_and_progress(tiny_dpo_run):
    run, proc = tiny_dpo_run
    assert (run / "loss_curve.png").stat().st_size > 1000
    samples = sorted(glob.glob(str(run / "samples" / "*.txt")))
    assert samples and "### reference" in open(samples[-1]).read()
    assert (run / "config.yaml").exists() and (run / "final" / "config.yaml").exists()
    assert "eval/rewards/accuracies" in proc.stderr + proc.stdout         # progress output mentions eval


def test_tiny_dpo_checkpoint_loads_in_transformers_and_generates(tiny_dpo_run):
    run, _ = tiny_dpo_run
    # the checkpoint loads in plain transformers and generates
    model = AutoModelForCausalLM.from_pretrained(run / "final")
    tok = AutoTokenizer.from_pretrained(run / "final")
    ids = tok.apply_chat_template([{"role": "user", "content": "Is 5 larger than 3?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]


@pytest.fixture(scope="module")
def tiny_sft_run(tmp_path_factory, tiny_model_dir):
    """One epoch of the tiny SFT example from the local model folder, checkpoints every 10 steps: its run folder."""
    run = tmp_path_factory.mktemp("tiny-sft") / "run"
    proc = run_cli("train.py", "example/tiny-sft.yml", "--overrides", f"output_dirs={run}", "n_epochs=1",
                   "sample_during_eval=false", "save_model_step=10", "save_optimizer=true",
                   *local_model_overrides(tiny_model_dir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


def test_tiny_sft_checkpoints_and_counters(tiny_sft_run):
    run = tiny_sft_run
    steps = sorted(os.listdir(run))
    assert [s for s in steps if s.startswith("step-")] == ["step-000010", "step-000020"]   # 23 steps in all
    assert (run / "step-000010" / "training_state.pt").exists() and (run / "final" / "training_state.pt").exists()
    assert not any(s.endswith(".tmp") for s in steps)
    counters = json.load(open(run / "final" / "trainer_state.json"))
    assert (counters["step"], counters["examples_seen"]) == (23, 368)
    assert counters["files"]["model.safetensors"] == os.path.getsize(run / "final" / "model.safetensors")


def test_tiny_sft_from_local_model_changes_weights(tiny_sft_run, tiny_model_dir):
    run = tiny_sft_run
    before = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    after = AutoModelForCausalLM.from_pretrained(run / "final").state_dict()
    assert before.keys() == after.keys()
    assert all(not torch.equal(before[k], after[k]) for k in before if "norm" not in k)
    metrics = read_jsonl(run / "metrics.jsonl")
    train_loss = [m["loss"] for m in metrics if "loss" in m]
    eval_loss = [m["eval/loss"] for m in metrics if "eval/loss" in m]
    assert train_loss[-1] < train_loss[0] - 1.0 and eval_loss[-1] < eval_loss[0] - 1.0
    assert (run / "loss_curve.png").exists()


def test_dpo_starts_from_the_sft_run_folder(tiny_sft_run, tiny_model_dir):
    """The pythia recipe: DPO starts from the SFT run's folder (model.archive), policy and reference alike."""
    run = tiny_sft_run
    after = AutoModelForCausalLM.from_pretrained(run / "final").state_dict()
    trainer = build("dpo", tiny_model_dir, f"model.archive={run / 'final'}")
    for k, v in after.items():
        assert torch.equal(trainer.policy.state_dict()[k], v) and torch.equal(trainer.reference.model.state_dict()[k], v)


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_gradient_accumulation_equivalence(kind, tiny_model_dir):
    """One step on the same 8 examples: 1 micro-batch of 8 == 8 micro-batches of 1 (SGD, no clipping)."""
    common = ["optimizer=SGD", "lr=1.0", "warmup_steps=0", "max_grad_norm=0", "total_batch_size=8"]
    weights = {}
    for accumulation in (1, 8):
        trainer = build(kind, tiny_model_dir, *common, f"gradient_accumulation_steps={accumulation}")
        before = params_of(trainer.policy)
        trainer.train_step(next(trainer.global_batches()))
        weights[accumulation] = {k: v - before[k] for k, v in params_of(trainer.policy).items()}
    for k in weights[1]:
        delta = weights[1][k]
        assert delta.abs().max() > 0 or "rotary" in k
        torch.testing.assert_close(weights[8][k], delta, rtol=1e-4, atol=1e-6 * max(1.0, delta.abs().max().item()))


def test_dpo_reference_frozen_and_policy_moves(tiny_model_dir):
    trainer = build("dpo", tiny_model_dir, "n_examples=32", "n_epochs=null", "debug=true",
                    f"output_dirs={tiny_model_dir}/../dpo-ref-run")
    initial = params_of(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    os.close(train.prepare_run_dir(trainer.cfg)[1])  # the run folder and its lock
    trainer.train()
    reference, policy = params_of(trainer.reference.model), params_of(trainer.policy)
    assert all(torch.equal(reference[k], initial[k]) for k in initial)
    assert any(not torch.equal(policy[k], initial[k]) for k in initial)
    assert all(not p.requires_grad for p in trainer.reference.model.parameters())
    assert not os.path.exists(os.path.join(trainer.run_dir, "final"))  # debug: no checkpoint


def test_sft_has_no_reference_and_n_examples_counts(tiny_model_dir):
    trainer = build("sft", tiny_model_dir, "n_epochs=null", "n_examples=40", "total_batch_size=16")
    assert trainer.reference.model is None
    assert trainer.total_steps == 3
    assert sum(len(b) for b in trainer.global_batches()) == 40


SEED_CUSTOM_CONFIG = """\
# 基础配置
seed: 0
exp_name: my_experiment
datasets: 
  - type: custom_dataset
    path: {data}

# 训练参数
trainer: BasicTrainer
optimizer: AdamW
lr: 1e-5
total_batch_size: 16
gradient_accumulation_steps: 4
max_length: 512
n_epochs: 100

# 模型配置
model:
  name_or_path: {model}
  policy_dtype: float16

# 损失函数配置
loss:
  name: dpo  # 或 sft
  beta: 0.1  # DPO参数
"""


@pytest.mark.parametrize("name", ["dpo", "sft"])
def test_seed_custom_config_block_runs_as_written(name, tmp_path, tiny_model_dir):
    """The seed README's custom config, verbatim but for local paths and with `name: dpo  # 或 sft` set to either
    value (its `beta: 0.1  # DPO参数` stays: for SFT a one-line warning); overrides only cut the run short."""
    config = tmp_path / "config.yml"
    text = SEED_CUSTOM_CONFIG.format(data=os.path.join(ROOT, "example", "data", f"{name}_demo.json"), model=tiny_model_dir)
    config.write_text(text.replace("name: dpo  # 或 sft", f"name: {name}  # 或 sft"))
    run = tmp_path / "run"
    proc = run_cli("train.py", str(config), "--overrides", "lr=2e-5", "batch_size=32", "n_examples=64",
                   "n_eval_examples=32", f"output_dirs={run}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    noted = "warning: loss.beta=0.1 is not used by loss.name=sft and is ignored" in proc.stderr
    assert noted == (name == "sft") and f"loss: {name}" in proc.stdout
    saved = load_config(str(run / "config.yaml"))
    assert saved.loss.name == name and saved.loss.beta == (0.1 if name == "dpo" else None)
    assert saved.total_batch_size == 32 and saved.lr == 2e-5 and saved.model.policy_dtype == "float16"
    assert saved.gradient_accumulation_steps == 4 and saved.n_epochs == 100
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["examples_seen"] for r in rows if "examples_seen" in r][-1] == 64
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows if "loss" in r)
    model = AutoModelForCausalLM.from_pretrained(run / "final", dtype="auto")
    assert next(model.parameters()).dtype == torch.float16  # exported in policy_dtype


def test_activation_checkpointing_gives_the_same_update(tiny_model_dir):
    plain, m1 = one_sgd_step("dpo", tiny_model_dir)
    checkpointed, m2 = one_sgd_step("dpo", tiny_model_dir, "activation_checkpointing=true")
    assert m2["saved_elements"] < 0.8 * m1["saved_elements"]  # the rest is mostly the logits
    assert m1["loss"] == pytest.approx(m2["loss"], rel=1e-6)
    for k in plain:
        torch.testing.assert_close(checkpointed[k], plain[k], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_mixed_precision_keeps_float32_masters_and_tracks_float32(dtype, tiny_model_dir):
    full, m_full = one_sgd_step("sft", tiny_model_dir)
    mixed, m_mixed = one_sgd_step("sft", tiny_model_dir, f"model.policy_dtype={dtype}")
    assert m_mixed["loss"] == pytest.approx(m_full["loss"], rel=2e-2)   # same maths at lower precision
    assert any(not torch.equal(mixed[k], full[k]) for k in full)         # ... and autocast really ran
    cos = torch.nn.functional.cosine_similarity(torch.cat([v.flatten() for v in mixed.values()]),
                                                torch.cat([v.flatten() for v in full.values()]), dim=0)
    assert cos > 0.99


def test_lr_schedule_hand_values():
    from trainers import build_scheduler
    param = torch.nn.Parameter(torch.zeros(1))
    expected = {  # warmup 3 steps: (s+1)/4; then over the remaining 4 steps
        "constant": [0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0],
        "linear": [0.25, 0.5, 0.75, 1.0, 0.75, 0.5, 0.25],
        "cosine": [0.25, 0.5, 0.75, 1.0, 0.8535534, 0.5, 0.1464466],
    }
    for kind, values in expected.items():
        opt = torch.optim.SGD([param], lr=2.0)
        sched = build_scheduler(opt, kind, warmup_steps=3, total_steps=7)
        seen = []
        for _ in range(7):
            seen.append(opt.param_groups[0]["lr"] / 2.0)
            opt.step()
            sched.step()
        assert seen == pytest.approx(values, abs=1e-6), kind


@pytest.mark.parametrize("overrides, expected_loss", [
    (["loss.name=dpo"], 0.6931472),                              # policy == reference: h = 0, -log sigmoid(0) = log 2
    (["loss.name=dpo", "loss.label_smoothing=0.2"], 0.6931472),  # cDPO: 0.8 log 2 + 0.2 log 2
    (["loss.name=ipo", "loss.beta=0.1"], 25.0),                   # (0 - 1 / (2 * 0.1))^2
    (["loss.name=ipo", "loss.beta=0.5"], 1.0),                    # (0 - 1 / (2 * 0.5))^2
])
def test_first_step_loss_of_each_preference_loss(overrides, expected_loss, tiny_model_dir):
    """At step 0 the policy equals the reference, so every pair's log-ratio difference h is 0: known losses."""
    _, metrics = one_sgd_step("dpo", tiny_model_dir, *overrides)
    assert metrics["loss"] == pytest.approx(expected_loss, rel=1e-5)
    assert metrics["rewards/chosen"] == 0 and metrics["rewards/rejected"] == 0 and metrics["rewards/accuracies"] == 0


def test_reference_free_has_no_reference_model(tiny_model_dir):
    trainer = build("dpo", tiny_model_dir, "loss.reference_free=true")
    assert trainer.reference.model is None
    metrics, *_ = trainer.train_step(next(trainer.global_batches()))
    # rewards are beta * policy log-probs when the reference is taken as 0
    assert metrics["rewards/chosen"] == pytest.approx(0.1 * metrics["logps/chosen"], rel=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_reference_equals_the_initial_policy_in_every_dtype(dtype, tmp_path):
    """Before any update, policy and reference compute the same log-probs: rewards exactly 0, loss exactly ln 2.
    A half-precision reference (reference_dtype, the memory-saving option) does not: the control."""
    def first_eval(reference_dtype):
        cfg = load_config(TINY["dpo"], [f"model.policy_dtype={dtype}", f"model.reference_dtype={reference_dtype}",
                                              "n_eval_examples=16", f"output_dirs={tmp_path}"])
        return train.build_trainer(cfg).evaluate()
    metrics = first_eval("null")
    assert metrics["eval/rewards/chosen"] == 0 and metrics["eval/rewards/rejected"] == 0
    assert metrics["eval/rewards/margins"] == 0 and metrics["eval/rewards/accuracies"] == 0
    assert metrics["eval/loss"] == pytest.approx(0.6931471805599453, abs=1e-7)
    if dtype == "float32":
        half = first_eval("bfloat16")
        assert half["eval/rewards/margins"] != 0 and half["eval/loss"] != metrics["eval/loss"]


def test_samples_show_how_a_reply_ended_and_greedy_is_repeatable(tiny_model_dir, tmp_path):
    import trainers
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    hello = tok("hello", add_special_tokens=False)["input_ids"]
    assert trainers.sample_text(tok, hello + [tok.eos_token_id, tok.eos_token_id], 8) == "hello" + tok.eos_token
    assert trainers.sample_text(tok, hello, 8) == "hello [truncated at max_new_tokens=8]"
    trainer = build("sft", tiny_model_dir, "n_eval_examples=2", "sample_temperature=0", "n_eval_model_samples=2",
                    "max_new_tokens=6", f"output_dirs={tmp_path}")
    texts = []
    for step in (1, 2):
        trainer.step = step
        trainer.sample(metrics.MetricsWriter(tmp_path, trainer.cfg, enabled=False))
        texts.append(open(tmp_path / "samples" / f"step-{step:06d}.txt").read())
    assert texts[0] == texts[1] and "[truncated at max_new_tokens=6]" in texts[0]


def test_progress_bar_rate_leaves_out_evaluation_time():
    """0.3 s of "evaluation" between two steps: the bar's clock (elapsed, hence rate and ETA) does not count it."""
    import time
    from tqdm import tqdm

    import trainers
    bar = tqdm(total=10, file=open(os.devnull, "w"), mininterval=0)
    bar.update(1)
    time.sleep(0.3)
    assert trainers.exclude_from_bar(bar, 0.3) == 0.3
    bar.update(1)
    assert bar.format_dict["elapsed"] < 0.2
    bar.close()


def test_warmup_longer_than_the_run_is_a_warning(tiny_model_dir, capsys):
    build("sft", tiny_model_dir, "warmup_steps=150", "total_batch_size=8", "n_examples=16", "n_epochs=null")
    err = capsys.readouterr().err
    assert "warning: warmup_steps=150 is longer than the run (2 steps)" in err


def test_curve_plot_of_a_run_stopped_before_any_metric_warns_nothing(tmp_path):
    """A run interrupted before its first log or eval still gets its PNG, without matplotlib's 'No artists with
    labels found to put in legend' warning."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        metrics.plot_curves([], str(tmp_path / "empty.png"))
        metrics.plot_curves([{"step": 1, "loss": 0.7}, {"step": 1, "eval/rewards/accuracies": 0.5}],
                            str(tmp_path / "some.png"))
    assert (tmp_path / "empty.png").stat().st_size > 0 and (tmp_path / "some.png").stat().st_size > 0


def test_run_header_states_the_loss_and_a_short_last_batch(tiny_model_dir, capsys):
    trainer = build("dpo", tiny_model_dir, "n_epochs=null", "n_examples=20", "total_batch_size=8", "loss.name=simpo",
                    "loss.beta=null", "loss.label_smoothing=null")
    capsys.readouterr()
    train.print_header(trainer, 1000, None, ["warning: a note"])
    out, err = capsys.readouterr()
    assert "| 3 steps of 8 examples (the last of 4)" in out and err == "warning: a note\n"
    assert "loss: simpo beta=2.0 simpo_gamma=1.0 label_smoothing=0.0 nll_weight=0.0 length_normalize=False" in out
    assert "batches: padded, attention sdpa\n" in out  # SDPA: prefix_sharing=null leaves it off
    packed = build("dpo", tiny_model_dir, "packing=true")
    capsys.readouterr()
    train.print_header(packed, 1000, None, [])
    assert "batches: packed, attention varlen_attn, each pair's prompt once (prefix_sharing)\n" in capsys.readouterr()[0]
    train.print_header(build("sft", tiny_model_dir, "packing=true"), 1000, None, [])
    assert "batches: packed, attention varlen_attn\n" in capsys.readouterr()[0]  # no pairs: nothing shared


def test_the_launcher_blames_the_killed_worker_not_the_peer_whose_collective_broke():
    """Rank 0 killed (-9), rank 1 then failed in a collective (exit 1) and was the first failure seen: rank 0 is
    named. A worker that the launcher itself stopped (SIGTERM) is not a cause."""
    import signal
    import types
    ctx = lambda *codes: types.SimpleNamespace(processes=[types.SimpleNamespace(exitcode=c, pid=100 + i)  # noqa: E731
                                                           for i, c in enumerate(codes)])
    assert train.killed_worker(ctx(-signal.SIGKILL, 1), first=1) == (0, 100, "SIGKILL")
    assert train.killed_worker(ctx(-signal.SIGTERM, -signal.SIGKILL), first=1) == (1, 101, "SIGKILL")
    assert train.killed_worker(ctx(-signal.SIGKILL, -signal.SIGKILL), first=1) == (1, 101, "SIGKILL")  # seen first
    assert train.killed_worker(ctx(-signal.SIGTERM, 1), first=1) is None
