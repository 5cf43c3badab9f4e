"""Exact resume after SIGKILL / SIGTERM, atomic checkpoints, run-folder protection, faults, reproducibility."""
import json
import os
import signal
import subprocess
import sys
import time
import warnings

import pytest
import torch
from safetensors.torch import load_file

import checkpoints
import train
import utils
from config import load_config
from conftest import OFFLINE_ENV, ROOT, assert_one_line_error, run_cli

# 12 steps of 8 pairs; checkpoints every 2 steps; log every step so the metrics are compared step by step
RUN = ["n_epochs=null", "n_examples=96", "total_batch_size=8", "save_model_step=2", "print_log_step=1",
       "eval_every_steps=5", "n_eval_examples=16", "save_total_limit=2", "sample_during_eval=true",
       "n_eval_model_samples=1", "max_new_tokens=4"]
SECRET = "sk-not-a-real-key-0123456789"


def start(run_dir, *extra):
    env = {**os.environ, **OFFLINE_ENV, "WANDB_API_KEY": SECRET}
    return subprocess.Popen([sys.executable, "train.py", "example/tiny-dpo.yml", "--overrides", f"output_dirs={run_dir}",
                             *RUN, *extra], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path, proc, timeout=120):
    deadline = time.time() + timeout
    while not os.path.exists(path):
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def metrics_without_timing(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_second"} for line in f]


def final_weights(run_dir):
    return load_file(os.path.join(run_dir, "final", "model.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("baseline") / "run"
    proc = start(run_dir)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return run_dir


def test_killed_and_preempted_runs_resume_exactly(tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    # 1. SIGKILL right after the first checkpoint
    proc = start(run_dir)
    wait_for(run_dir / "step-000002" / "trainer_state.json", proc)
    proc.kill()
    proc.wait()
    # 2. resume, then SIGTERM (preemption) once step 6 is checkpointed: finish the step, save, exit 143
    proc = start(run_dir, "resume=auto")
    wait_for(run_dir / "step-000006" / "trainer_state.json", proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "resume=auto" in out and "Traceback" not in err
    # 3. resume, SIGKILL somewhere after step 8's checkpoint (mid-step, mid-eval or mid-save)
    proc = start(run_dir, "resume=auto")
    wait_for(run_dir / "step-000008" / "trainer_state.json", proc)
    time.sleep(0.3)
    proc.kill()
    proc.wait()
    # 4. resume to the end
    proc = start(run_dir, "resume=auto")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "resuming from" in out

    expected, got = final_weights(uninterrupted), final_weights(run_dir)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    # the metrics continue without duplicates or gaps and equal the uninterrupted run's
    assert metrics_without_timing(run_dir) == metrics_without_timing(uninterrupted)
    # save_total_limit=2: only the two newest step checkpoints are kept (final always), nothing half-written
    kept = sorted(n for n in os.listdir(run_dir) if n.startswith("step-") or n == "final" or n.endswith(".tmp"))
    assert kept == ["final", "step-000008", "step-000010"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == list(range(1, 13))  # purged and continued, no duplicates


def test_no_secret_in_run_folder(uninterrupted):
    for root, _, files in os.walk(uninterrupted):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                assert SECRET.encode() not in f.read(), os.path.join(root, name)


def test_half_written_checkpoint_is_ignored_and_removed(tmp_path):
    run_dir = tmp_path / "run"
    for name, step in (("step-000004", 4), ("step-000006.tmp", 6)):
        (run_dir / name).mkdir(parents=True)
        (run_dir / name / "trainer_state.json").write_text(json.dumps({"step": step, "examples_seen": 8 * step}))
        (run_dir / name / "training_state.pt").write_bytes(b"")
    assert [s for s, _ in checkpoints.list_checkpoints(run_dir, resumable=True)] == [4]
    checkpoints.remove_partial_checkpoints(run_dir)
    assert sorted(os.listdir(run_dir)) == ["step-000004"]


def test_start_prunes_what_a_killed_run_left_beyond_save_total_limit(tmp_path):
    """Killed after a checkpoint's rename but before the pruning that follows it: the next start prunes."""
    run_dir = tmp_path / "run"
    for step in (7, 8, 10):
        (run_dir / f"step-{step:06d}").mkdir(parents=True)
        (run_dir / f"step-{step:06d}" / "trainer_state.json").write_text(json.dumps({"step": step}))
    cfg = load_config(os.path.join(ROOT, "example", "tiny-sft.yml"),
                            [f"output_dirs={run_dir}", "save_total_limit=2", "resume=auto"])
    _, lock = train.prepare_run_dir(cfg, fresh=False)
    os.close(lock)
    assert sorted(n for n in os.listdir(run_dir) if n.startswith("step-")) == ["step-000008", "step-000010"]


def test_existing_run_folder_needs_resume_or_overwrite(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("exp_name: other\n")
    code = train.cli([os.path.join(ROOT, "example", "tiny-dpo.yml"), "--overrides", f"output_dirs={run_dir}"])
    err = capsys.readouterr().err
    assert code == 2 and "already holds a run" in err and "resume=auto" in err and "overwrite=true" in err
    assert "exp_name=NAME or output_dirs=PATH" in err  # how to pick another folder
    assert (run_dir / "config.yaml").read_text() == "exp_name: other\n"
    code = train.cli([os.path.join(ROOT, "example", "tiny-dpo.yml"), "--overrides", f"output_dirs={run_dir}",
                      "resume=" + str(run_dir / "nope")])
    assert code == 2 and "not a complete checkpoint folder" in capsys.readouterr().err


def test_overwrite_and_resume_auto_without_checkpoint_start_afresh(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 99, "loss": 1.0}\n')
    (run_dir / "stale.txt").write_text("old")
    short = [f"output_dirs={run_dir}", "n_epochs=null", "n_examples=16", "n_eval_examples=0", "debug=true"]
    assert train.main(os.path.join(ROOT, "example", "tiny-dpo.yml"), [*short, "resume=auto"]) == 0
    assert [r["step"] for r in map(json.loads, open(run_dir / "metrics.jsonl"))] == [1]  # the old line is dropped
    assert train.main(os.path.join(ROOT, "example", "tiny-dpo.yml"), [*short, "overwrite=true"]) == 0
    assert not (run_dir / "stale.txt").exists()


def test_nonfinite_steps_are_skipped_then_stop(tmp_path):
    cfg = load_config(os.path.join(ROOT, "example", "tiny-sft.yml"),
                            ["n_eval_examples=0", "max_nonfinite_steps=2", "total_batch_size=4", f"output_dirs={tmp_path}"])
    trainer = train.build_trainer(cfg)
    with torch.no_grad():
        trainer.policy.model.norm.weight.fill_(float("nan"))
    before = {k: v.clone() for k, v in trainer.policy.state_dict().items()}
    batches = trainer.global_batches()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train_step(next(batches))                 # skipped with a warning: no update
    assert not [w for w in caught if "lr_scheduler" in str(w.message)]  # torch's scheduler-order warning is silenced
    lr = trainer.optimizer.param_groups[0]["lr"]
    assert cfg.warmup_steps > 1 and lr == pytest.approx(cfg.lr * 2 / (cfg.warmup_steps + 1))  # the schedule moved on
    after = trainer.policy.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if "norm.weight" not in k or "layers" in k)
    assert trainer.step == 1 and trainer.nonfinite_streak == 1
    with pytest.raises(utils.TrainingError, match="2 steps in a row"):
        trainer.train_step(next(batches))


def test_out_of_memory_names_the_knobs(tmp_path, capsys, monkeypatch):
    import trainers

    def oom(self, examples):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    monkeypatch.setattr(trainers.Trainer, "train_step", oom)  # a test-only fault injection
    code = train.cli([os.path.join(ROOT, "example", "tiny-sft.yml"), "--overrides", f"output_dirs={tmp_path}/run",
                      "do_first_eval=false"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    last = err.strip().splitlines()[-1]  # after the progress bar, on a line of its own
    assert last.startswith("error: out of GPU memory")
    for knob in ("gradient_accumulation_steps", "activation_checkpointing", "max_length", "FSDPTrainer"):
        assert knob in last


def test_unwritable_output_folder_is_refused_before_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    proc = run_cli("train.py", "example/tiny-sft.yml", "--overrides", f"output_dirs={blocker}/run")
    assert_one_line_error(proc, "output_dirs", "cannot write")


def test_same_config_twice_gives_identical_metrics(tmp_path):
    runs = []
    for i in range(2):
        run_dir = tmp_path / f"run{i}"
        overrides = [f"output_dirs={run_dir}", "n_epochs=null", "n_examples=48", "print_log_step=1", "eval_every_steps=2",
                     "n_eval_examples=16", "debug=true"]
        assert train.main(os.path.join(ROOT, "example", "tiny-dpo.yml"), overrides) == 0
        runs.append(metrics_without_timing(run_dir))
    assert runs[0] == runs[1] and len(runs[0]) == 3 + 3  # 3 train rows, evals at steps 0, 2, 3


def test_second_ctrl_c_aborts_at_once(tmp_path):
    run_dir = tmp_path / "run"
    proc = start(run_dir, "n_examples=4000")
    wait_for(run_dir / "metrics.jsonl", proc)
    while not open(run_dir / "metrics.jsonl").read().strip():
        time.sleep(0.05)
    while proc.poll() is None:  # Ctrl-C, then Ctrl-C again (two signals sent at once would arrive as one)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.1)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "aborted" in err and "Traceback" not in err, err[-2000:]


def test_ctrl_c_with_the_output_pipe_gone_still_saves(tmp_path):
    """`python train.py ... | tee log` and Ctrl-C: the terminal's SIGINT ends `tee` too. The handler's message, the
    eval lines and the resume hint then write to a closed pipe: the checkpoint is saved all the same (exit 130)."""
    run_dir = tmp_path / "run"
    proc = start(run_dir, "n_examples=4000", "save_model_step=1000")
    wait_for(run_dir / "metrics.jsonl", proc)
    while not open(run_dir / "metrics.jsonl").read().strip():
        time.sleep(0.05)
    proc.stdout.close()  # tee is gone
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err and "BrokenPipe" not in err, err[-2000:]
    assert any(name.startswith("step-") for name in os.listdir(run_dir)), os.listdir(run_dir)


def test_failed_save_keeps_earlier_checkpoints(tmp_path, monkeypatch):
    import errno
    cfg = load_config(os.path.join(ROOT, "example", "tiny-sft.yml"),
                            ["n_eval_examples=0", "total_batch_size=4", f"output_dirs={tmp_path}"])
    trainer = train.build_trainer(cfg)
    trainer.train_step(next(trainer.global_batches()))
    good = checkpoints.save(trainer, "step-000001")
    before = {name: open(os.path.join(good, name), "rb").read() for name in os.listdir(good)}

    def disk_full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(checkpoints, "write_files", disk_full)  # a test-only fault injection
    with pytest.raises(utils.TrainingError, match="No space left on device.*earlier checkpoints are kept"):
        checkpoints.save(trainer, "step-000002")
    assert sorted(os.listdir(tmp_path)) == ["step-000001"]  # no half-written folder left behind
    assert {name: open(os.path.join(good, name), "rb").read() for name in os.listdir(good)} == before
    monkeypatch.undo()

    def zip_writer_full(*args, **kwargs):  # what torch.save raises when the disk fills up mid-file
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4544 vs 4432\nframe #0: ...")
    monkeypatch.setattr(torch, "save", zip_writer_full)
    with pytest.raises(utils.TrainingError) as failed:
        checkpoints.save(trainer, "step-000002")
    assert "write failed (RuntimeError)" in str(failed.value) and "\n" not in str(failed.value)
    assert sorted(os.listdir(tmp_path)) == ["step-000001"]


# ---- model families, damaged checkpoints, faults during a save --------------------------------------------------
FAMILIES = {  # transformers treats them differently: GPT-NeoX saves its head as embed_out, qwen2 here ties it
    "gpt_neox": "{model_type: gpt_neox, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, "
                "num_attention_heads: 4, max_position_embeddings: 256}",
    "llama": "{model_type: llama, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, num_attention_heads: 4, "
             "num_key_value_heads: 2, max_position_embeddings: 256}",
    "qwen2-tied": "{model_type: qwen2, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, "
                  "num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 256, tie_word_embeddings: true}",
}
SHORT = ["n_epochs=null", "n_examples=32", "total_batch_size=8", "save_model_step=2", "n_eval_examples=0",
         "print_log_step=1", "save_total_limit=null"]


def family_config(tmp_path, family):
    """tiny-dpo.yml with another architecture (a whole from_config, not merged into the llama one)."""
    text = open(os.path.join(ROOT, "example", "tiny-dpo.yml")).read()
    start, end = text.index("  from_config:"), text.index("  policy_dtype:")
    path = tmp_path / f"{family}.yml"
    path.write_text(text[:start] + f"  from_config: {FAMILIES[family]}\n" + text[end:])
    return str(path)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_resume_is_exact_on_every_model_family(family, tmp_path):
    """Continue from step 2 of a 4-step run: the same final weights, bit for bit (the head included: GPT-NeoX's
    export names it embed_out, the live model lm_head), and the same metrics for steps 3 and 4."""
    config = family_config(tmp_path, family)
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert train.main(config, [*SHORT, f"output_dirs={whole}"]) == 0
    checkpoint = whole / "step-000002"
    if family == "gpt_neox":  # a checkpoint of an earlier version, without the masters: read through transformers
        state = torch.load(checkpoint / "training_state.pt", weights_only=True)
        state["master_weights"] = None
        torch.save(state, checkpoint / "training_state.pt")
        files = json.loads((checkpoint / "trainer_state.json").read_text())
        (checkpoint / "trainer_state.json").write_text(json.dumps({k: v for k, v in files.items() if k != "files"}))
    assert train.main(config, [*SHORT, f"output_dirs={resumed}", f"resume={checkpoint}"]) == 0
    expected, got = final_weights(whole), final_weights(resumed)
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    assert metrics_without_timing(resumed) == metrics_without_timing(whole)[2:]


def test_damaged_newest_checkpoints_are_skipped(uninterrupted, tmp_path, capsys):
    """final's training_state.pt cut short (its size says so) and step-10's overwritten with junk of the same size
    (it fails to load): resume=auto warns about both, continues from step 8 and ends where the whole run ended."""
    import shutil
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted, run_dir)
    final_state = run_dir / "final" / "training_state.pt"
    final_state.write_bytes(final_state.read_bytes()[:1000])
    junk = run_dir / "step-000010" / "training_state.pt"
    junk.write_bytes(b"\0" * junk.stat().st_size)
    code = train.main(os.path.join(ROOT, "example", "tiny-dpo.yml"), [f"output_dirs={run_dir}", *RUN, "resume=auto"])
    out, err = capsys.readouterr()
    assert code == 0 and "resuming from" in out and "step-000008" in out
    assert "final is damaged (training_state.pt has 1000 bytes" in err and "step-000010 cannot be read" in err
    expected, got = final_weights(uninterrupted), final_weights(run_dir)
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_changed_architecture_on_resume_is_one_line(uninterrupted, tmp_path, capsys):
    import shutil
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted, run_dir)
    code = train.cli([os.path.join(ROOT, "example", "tiny-dpo.yml"), "--overrides", f"output_dirs={run_dir}", *RUN,
                      "resume=auto", "model.from_config.intermediate_size=96"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "model.from_config.intermediate_size: 128 -> 96" in err[0], err
    # continued anyway: the weights do not fit the new shape, said in one line too
    code = train.cli([os.path.join(ROOT, "example", "tiny-dpo.yml"), "--overrides", f"output_dirs={run_dir}", *RUN,
                      "resume=auto", "model.from_config.intermediate_size=96", "resume_allow_changes=true"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "does not match the model" in err[0] and "final" in err[0] and "mlp" in err[0] and "[96, 64]" in err[0], err


def test_second_run_on_a_busy_folder_is_refused(tmp_path):
    """A lock on the run folder: a second run on it is refused while the first lives; a dead run's lock is not."""
    run_dir = tmp_path / "run"
    proc = start(run_dir, "n_examples=4000")
    wait_for(run_dir / "metrics.jsonl", proc)
    other = run_cli("train.py", "example/tiny-dpo.yml", "--overrides", f"output_dirs={run_dir}", *RUN, "resume=auto")
    assert_one_line_error(other, "output_dirs", "in use by another run", f"pid {proc.pid}")
    proc.kill()
    proc.wait()
    again = run_cli("train.py", "example/tiny-dpo.yml", "--overrides", f"output_dirs={run_dir}", *RUN, "overwrite=true",
                    "debug=true", "n_examples=8", "n_eval_examples=0")
    assert again.returncode == 0, again.stderr[-2000:]


SIGTERM_IN_FINAL_SAVE = """
import os, signal, sys
import checkpoints, train
write = checkpoints.write_files
def write_and_get_a_signal(trainer, folder, *args):
    if folder.endswith("final.tmp"):
        os.kill(os.getpid(), signal.SIGTERM)  # a scheduler's preemption, in the middle of the final save
    write(trainer, folder, *args)
checkpoints.write_files = write_and_get_a_signal
sys.exit(train.cli(["example/tiny-sft.yml", "--overrides", "output_dirs=" + sys.argv[1], "n_eval_examples=0",
                    "n_examples=8", "n_epochs=null", "total_batch_size=4"]))
"""


def test_sigterm_during_the_final_save_lets_it_finish(tmp_path):
    proc = run_cli("-c", SIGTERM_IN_FINAL_SAVE, str(tmp_path / "run"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "SIGTERM" in proc.stdout + proc.stderr and "saved final checkpoint" in proc.stdout
    assert [s for s, _ in checkpoints.list_checkpoints(tmp_path / "run", resumable=True)] == [2]
    assert not [n for n in os.listdir(tmp_path / "run") if n.endswith(".tmp")]


def test_crash_while_replacing_a_checkpoint_keeps_the_old_one(tmp_path):
    """Killed between the two renames of replace_checkpoint: `final` is gone, `final.old` holds it; the next start
    puts it back."""
    run_dir = tmp_path / "run"
    (run_dir / "final.old").mkdir(parents=True)
    (run_dir / "final.old" / "trainer_state.json").write_text(json.dumps({"step": 3, "examples_seen": 24}))
    (run_dir / "final.tmp").mkdir()
    assert checkpoints.list_checkpoints(run_dir) == []
    checkpoints.remove_partial_checkpoints(run_dir)
    assert sorted(os.listdir(run_dir)) == ["final"] and checkpoints.list_checkpoints(run_dir)[0][0] == 3


def test_disk_space_check_speaks_mib_and_writes_nothing(tmp_path, monkeypatch):
    import collections
    cfg = load_config(os.path.join(ROOT, "example", "tiny-sft.yml"), [f"output_dirs={tmp_path}/run"])
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(train.shutil, "disk_usage", lambda path: usage(2**30, 2**30 - 6 * 2**20, 6 * 2**20))
    with pytest.raises(utils.UserError, match=r"has 6\.0 MiB free but one checkpoint needs about 16\.0 MiB"):
        train.prepare_run_dir(cfg, n_params=2**20)
    assert not os.path.exists(tmp_path / "run")
    assert [utils.human_bytes(n) for n in (512, 3 * 2**10, 2**31)] == ["512 bytes", "3.0 KiB", "2.0 GiB"]


def test_resume_refuses_a_config_that_changes_the_maths(tmp_path, capsys):
    """`resume=auto loss.name=apo_zero` on a finished DPO run once trained 0 steps and relabelled the DPO weights as
    apo_zero in config.yaml. A change that changes the maths is refused (the saved config stays), a longer run is
    accepted and noted, and resume_allow_changes=true continues while keeping the old config beside the new one."""
    config, run_dir = os.path.join(ROOT, "example", "tiny-dpo.yml"), tmp_path / "run"
    short = [f"output_dirs={run_dir}", "n_epochs=null", "n_examples=16", "total_batch_size=8", "n_eval_examples=0"]
    assert train.main(config, short) == 0
    capsys.readouterr()
    saved = (run_dir / "config.yaml").read_text()
    for change, key in (("loss.name=apo_zero", "loss.name: dpo -> apo_zero"), ("lr=0.5", "lr: 0.001 -> 0.5"),
                        ("max_length=112", "max_length: 128 -> 112"), ("seed=3", "seed: 0 -> 3")):
        code = train.cli([config, "--overrides", *short, change, "resume=auto"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and key in err[0] and "resume_allow_changes=true" in err[0], err
        assert (run_dir / "config.yaml").read_text() == saved
    code = train.cli([config, "--overrides", *short[:-3], "n_examples=24", "total_batch_size=8", "n_eval_examples=0",
                      "print_log_step=2", "resume=auto"])
    out = capsys.readouterr()
    assert code == 0 and "resume: n_examples: 16 -> 24 (accepted)" in out.err and "resume: print_log_step" in out.err
    assert "resuming from" in out.out and json.load(open(run_dir / "final" / "trainer_state.json"))["step"] == 3
    assert load_config(str(run_dir / "config.yaml")).n_examples == 24
    code = train.cli([config, "--overrides", *short[:-3], "n_examples=32", "total_batch_size=8", "n_eval_examples=0",
                      "loss.beta=0.2", "resume=auto", "resume_allow_changes=true"])
    assert code == 0 and "warning: resume: loss.beta: 0.1 -> 0.2" in capsys.readouterr().err
    assert load_config(str(run_dir / "config.yaml")).loss.beta == 0.2
    assert load_config(str(run_dir / "config.before-step-3.yaml")).loss.beta == 0.1
