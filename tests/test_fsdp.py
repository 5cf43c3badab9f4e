"""FSDPTrainer on CPU (gloo, 2 processes): the same weights as BasicTrainer under both launchers, for SFT and DPO;
the exported checkpoint loads in transformers; the sharded state reloads into one process; one-line errors."""
import functools
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

import checkpoints
import layouts
import utils
from config import load_config
from conftest import (OFFLINE_ENV, ROOT, TINY, assert_one_line_error, build, local_model_overrides, params_of,
                      read_jsonl, run_cli)

# 3 optimizer steps of 4 examples; SGD with lr=1 makes the update large enough to compare tightly
COMMON = ["optimizer=SGD", "lr=1.0", "warmup_steps=0", "total_batch_size=4", "n_examples=12", "n_epochs=null",
          "n_eval_examples=0", "print_log_step=1", "report_to_tensorboard=false"]
RUNS = {  # kind -> extra overrides; DPO also covers gradient accumulation, clipping and optimizer state (momentum)
    "sft": ["max_grad_norm=0"],
    "dpo": ["max_grad_norm=1.0", "gradient_accumulation_steps=2", "optimizer_kwargs={momentum: 0.9}"],
}
TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


@pytest.fixture(scope="module")
def basic_runs(tiny_model_dir):
    """BasicTrainer in this process: initial weights, final trainer and per-step metrics, for each kind."""
    runs = {}
    for kind, extra in RUNS.items():
        trainer = build(kind, tiny_model_dir, *COMMON, *extra)
        initial = params_of(trainer.policy)
        metrics = [trainer.train_step(examples)[0] for examples in trainer.global_batches()]
        runs[kind] = initial, trainer, metrics
    return runs


def fsdp_run(launcher, kind, model_dir, out, *extra):
    args = [*(TORCHRUN if launcher == "torchrun" else []), "train.py", TINY[kind], "--overrides", "trainer=FSDPTrainer",
            f"output_dirs={out}", *COMMON, *RUNS[kind], *local_model_overrides(model_dir), *extra]
    return run_cli(*args)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # DCP read by one process: intended
@pytest.mark.parametrize("launcher, kind, extra", [
    ("torchrun", "sft", ["activation_checkpointing=true"]),   # recomputation does not change the update
    ("python", "sft", []),
    ("torchrun", "dpo", ["fsdp.shard_reference=false", "prefix_sharing=true"]),  # a replicated reference; the
    # prompts once (prefix.py): the same update as separate sequences
    ("python", "dpo", ["packing=true", "precompute_reference_logps=true",  # a sharded one (the default), used once
                       "model.attn_implementation=varlen_attn"]),
], ids=["torchrun-sft-checkpointing", "python-sft", "torchrun-dpo-replicated-ref-prefix-sharing",
        "python-dpo-sharded-ref-packed-varlen"])
def test_fsdp_matches_basic_trainer(launcher, kind, extra, basic_runs, tiny_model_dir, tmp_path):
    """BasicTrainer (padded, reference in every step) vs FSDPTrainer, also packed with precomputed reference logps
    and varlen_attn."""
    proc = fsdp_run(launcher, kind, tiny_model_dir, tmp_path / "run", *extra, f"reference_cache_dir={tmp_path / 'cache'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    initial, basic, basic_metrics = basic_runs[kind]
    exported = params_of(AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final"))  # loads in transformers
    expected = params_of(basic.policy)
    assert exported.keys() == expected.keys()
    basic.policy.save_pretrained(tmp_path / "basic")  # the 2 processes' shards consolidate under save_pretrained's names
    assert written_names(tmp_path / "run" / "final") == written_names(tmp_path / "basic")
    # Float32 sums in another order already differ: two micro-batchings of BasicTrainer's own DPO run differ by up
    # to 1.6e-6 of the largest update (1e-5 of a tensor's own). So: 1e-5 of the largest update over the model, and
    # 1e-4 per tensor, which still catches any tensor whose gradient is averaged instead of summed (a 50% error).
    largest = max((want - initial[k]).abs().max().item() for k, want in expected.items())
    assert (max((exported[k] - want).abs().max().item() for k, want in expected.items()) <= 1e-5 * largest)
    for k, want in expected.items():
        update = (want - initial[k]).abs().max().item()
        assert update > 0 or "rotary" in k, k
        assert (exported[k] - want).abs().max().item() <= 1e-4 * update + 1e-8, k
    # metrics are all-reduced over both ranks and written once (rank 0 only)
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    for row, want in zip(rows, basic_metrics):
        for key in ("loss", "grad_norm", "examples_seen") + (("rewards/accuracies", "logps/chosen") if kind == "dpo" else ()):
            assert row[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), key
    assert proc.stdout.count("run folder:") == 1 and proc.stdout.count("saved final checkpoint") == 1
    assert sorted(os.listdir(tmp_path / "run" / "final" / "dcp")) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    if launcher == "python" and kind == "dpo":
        check_sharded_state_loads_into_one_process(tmp_path / "run" / "final", basic, tiny_model_dir)


def written_names(folder):
    """The tensor names in a folder's safetensors files, as a reader of the files (vLLM, a converter) sees them."""
    from safetensors import safe_open
    names = []
    for file in sorted(f for f in os.listdir(folder) if f.endswith(".safetensors")):
        with safe_open(os.path.join(folder, file), "pt") as f:
            names += f.keys()
    return sorted(names)


def check_sharded_state_loads_into_one_process(checkpoint, basic, model_dir):
    """Written by 2 processes, read by 1 (DCP reshards): the policy and the SGD momentum of 3 BasicTrainer steps."""
    fresh = build("dpo", model_dir, *COMMON, *RUNS["dpo"])
    state = checkpoints.load_sharded_state(fresh, str(checkpoint))
    assert (state["step"], state["examples_seen"]) == (3, 12)
    for k, want in params_of(basic.policy).items():
        torch.testing.assert_close(params_of(fresh.policy)[k], want, rtol=0, atol=1e-5 * max(1.0, want.abs().max().item()))
    names = {p: n for n, p in basic.policy.named_parameters()}
    loaded = dict(zip((n for n, _ in fresh.policy.named_parameters()), fresh.policy.parameters()))
    for p, s in basic.optimizer.state.items():
        got = fresh.optimizer.state[loaded[names[p]]]["momentum_buffer"]
        torch.testing.assert_close(got, s["momentum_buffer"], rtol=1e-4, atol=1e-6)


def test_bf16_mixed_precision_policy_in_one_process(tiny_model_dir, basic_runs, monkeypatch):
    """model.fsdp_policy_mp=bfloat16: bf16 compute, float32 master shards and reduction; world size 1, in process."""
    from train import free_port
    for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT=str(free_port())).items():
        monkeypatch.setenv(key, value)
    try:
        trainer = build("sft", tiny_model_dir, *COMMON, *RUNS["sft"], "trainer=FSDPTrainer", "model.fsdp_policy_mp=bfloat16",
                        "activation_checkpointing=true")
        assert isinstance(trainer.layout, layouts.FSDPRanks)
        assert all(p.dtype == torch.float32 for p in trainer.policy.parameters())
        metrics, *_ = trainer.train_step(next(trainer.global_batches()))
        mixed = {k: v.float() for k, v in trainer.layout.full_state_dict(trainer.policy).items()}
    finally:
        torch.distributed.destroy_process_group()
    initial, _, basic_metrics = basic_runs["sft"]
    assert metrics["loss"] == pytest.approx(basic_metrics[0]["loss"], rel=2e-2) and metrics["loss"] != basic_metrics[0]["loss"]
    full = build("sft", tiny_model_dir, *COMMON, *RUNS["sft"])
    full.train_step(next(full.global_batches()))
    delta = {k: v - initial[k] for k, v in params_of(full.policy).items()}
    cos = torch.nn.functional.cosine_similarity(torch.cat([(mixed[k] - initial[k]).flatten() for k in delta]),
                                                torch.cat([d.flatten() for d in delta.values()]), dim=0)
    assert cos > 0.99


def test_batch_not_divisible_by_world_size_is_one_line_error(tmp_path):
    proc = run_cli("train.py", TINY["sft"], "--overrides", "trainer=FSDPTrainer", "total_batch_size=6",
                   "gradient_accumulation_steps=2", f"output_dirs={tmp_path}/r")
    assert_one_line_error(proc, "total_batch_size=6", "2 x 2")
    assert not (tmp_path / "r").exists()


def worker_pids(parent):
    """The spawned training workers of `parent` (not multiprocessing's resource tracker)."""
    with open(f"/proc/{parent}/task/{parent}/children") as f:
        children = [int(p) for p in f.read().split()]
    pids = []
    for pid in children:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"spawn_main" in f.read():
                    pids.append(pid)
        except FileNotFoundError:
            pass
    return pids


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="reads child processes from /proc (Linux)")
@pytest.mark.parametrize("rank", [0, 1])
def test_a_dying_worker_stops_every_worker(rank, tiny_model_dir, tmp_path):
    """A rank killed mid-training (as when its node dies): the launcher stops the other one, exits non-zero and
    names the rank and pid that died, also when it is rank 0 (whose death the other rank reports as a failed
    collective, sometimes first)."""
    run = tmp_path / "run"
    args = ["train.py", TINY["sft"], "--overrides", "trainer=FSDPTrainer", f"output_dirs={run}", "n_epochs=50",
            "n_eval_examples=0", "print_log_step=1", *local_model_overrides(tiny_model_dir)]
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env={**os.environ, **OFFLINE_ENV},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (run / "metrics.jsonl").exists() or not (run / "metrics.jsonl").read_text():  # training has begun
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            time.sleep(0.2)
        workers = worker_pids(proc.pid)
        assert len(workers) == 2
        first = int((run / ".lock").read_text())  # rank 0 holds the run folder's lock
        workers = sorted(workers, key=lambda pid: pid != first)  # by rank
        os.kill(workers[rank], signal.SIGKILL)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 1, stderr[-2000:]
    assert f"worker rank {rank} (pid {workers[rank]}) was killed by SIGKILL" in stderr, stderr[-2000:]
    assert "all 2 workers were stopped" in stderr
    assert not any(os.path.exists(f"/proc/{pid}") and open(f"/proc/{pid}/stat").read().split()[2] != "Z"
                   for pid in workers)


def test_fsdp_preempted_run_resumes_exactly(tiny_model_dir, tmp_path):
    """Plain-python FSDP run (packed, reference log-probs precomputed), SIGTERM to the launcher after the step-2
    checkpoint: the workers finish the step, save (HF export + dcp/ shards) and exit 143; resume=auto (reference
    log-probs now from the cache) then ends bit-identical to an uninterrupted FSDP run. Step checkpoints are written
    in the background (fsdp.async_checkpoint): each is complete (trainer_state.json, every file's size) when it
    appears under its name."""
    extra = ["n_examples=24", "save_model_step=2", "optimizer=AdamW", "lr=1e-3", "sample_during_eval=false",
             "trainer=FSDPTrainer", "packing=true", "precompute_reference_logps=true", "fsdp.async_checkpoint=true",
             f"reference_cache_dir={tmp_path / 'cache'}", *local_model_overrides(tiny_model_dir)]
    base = ["train.py", TINY["dpo"], "--overrides", *COMMON, *extra]
    assert run_cli(*base, f"output_dirs={tmp_path / 'whole'}").returncode == 0
    run_dir = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, *base, f"output_dirs={run_dir}"], cwd=ROOT, env={**os.environ, **OFFLINE_ENV},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (run_dir / "step-000002" / "trainer_state.json").exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "resume=auto" in out
    assert os.path.isdir(run_dir / "step-000002" / "dcp")
    assert checkpoints.checkpoint_problem(str(run_dir / "step-000002")) is None  # every file there, at its recorded size
    resumed = run_cli(*base, f"output_dirs={run_dir}", "resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "reference log-probs: 24 from the cache, 0 computed" in resumed.stdout
    whole = params_of(AutoModelForCausalLM.from_pretrained(tmp_path / "whole" / "final"))
    cut = params_of(AutoModelForCausalLM.from_pretrained(run_dir / "final"))
    assert all(torch.equal(whole[k], cut[k]) for k in whole)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "tokens_per_second"} for r in rows]  # noqa: E731
    assert strip(read_jsonl(run_dir / "metrics.jsonl")) == strip(read_jsonl(tmp_path / "whole" / "metrics.jsonl"))


NEOX = "{model_type: gpt_neox, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, num_attention_heads: 4}"
LLAMA = "{model_type: llama, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, num_attention_heads: 4}"
QWEN2_TIED = "{model_type: qwen2, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, num_attention_heads: 4, " \
             "num_key_value_heads: 2, tie_word_embeddings: true}"


@pytest.mark.parametrize("arch", [NEOX, LLAMA, QWEN2_TIED], ids=["gpt_neox", "llama", "qwen2-tied"])
def test_sharded_reference_and_sharded_export_in_one_process(arch, tmp_path, monkeypatch):
    """FSDPTrainer (world size 1, bf16 mixed precision; built on the meta device and filled from one read): the
    sharded reference computes exactly what the initial policy does (step-0 rewards 0); the export, written shard by
    shard (no gather), holds the same tensors under the same names as BasicTrainer's export (save_pretrained) of the
    same initial model (here in several files: files of a quarter of the model, without the 256 MiB floor),
    GPT-NeoX's head as embed_out (transformers finds that renaming by the model's class name,
    which fully_shard changes), a tied head once; it loads in transformers; nothing of the per-process files is left."""
    from safetensors.torch import load_file

    import train
    for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT=str(train.free_port())).items():
        monkeypatch.setenv(key, value)
    common = ["model.policy_dtype=bfloat16", "model.reference_dtype=null", f"model.from_config={arch}", "n_eval_examples=8"]
    cfg = load_config(TINY["dpo"], [*common, "trainer=FSDPTrainer", f"output_dirs={tmp_path}/run"])
    # files of a quarter of the model, without the 256 MiB floor: this small model is written as several files
    monkeypatch.setattr(layouts, "export_files", functools.partial(layouts.export_files, smallest=1))
    try:
        trainer = train.build_trainer(cfg)
        metrics = trainer.evaluate()
        exported = checkpoints.save(trainer, "final")
        live = {k: v.to(torch.bfloat16) for k, v in trainer.layout.full_state_dict(trainer.policy).items()}
    finally:
        torch.distributed.destroy_process_group()
    assert metrics["eval/rewards/margins"] == 0 and metrics["eval/rewards/chosen"] == 0
    files = sorted(f for f in os.listdir(exported) if f.endswith(".safetensors"))
    assert len(files) >= 2 and files[-1] == f"model-{len(files):05d}-of-{len(files):05d}.safetensors"
    assert not os.path.exists(os.path.join(exported, "sharded"))
    with open(os.path.join(exported, "model.safetensors.index.json")) as f:
        assert sorted(set(json.load(f)["weight_map"].values())) == files
    written = {k: v for file in files for k, v in load_file(os.path.join(exported, file)).items()}
    basic = train.build_trainer(load_config(TINY["dpo"], [*common, f"output_dirs={tmp_path}/basic"]))
    want = load_file(os.path.join(checkpoints.save(basic, "final"), "model.safetensors"))
    assert sorted(written) == sorted(want) and all(torch.equal(written[k], want[k]) for k in want)
    head = "embed_out.weight" if "gpt_neox" in arch else "lm_head.weight"
    assert (head in written) == ("tie_word_embeddings: true" not in arch)  # a tied head: only the embedding is written
    reloaded = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.bfloat16)
    assert all(torch.equal(reloaded.state_dict()[k], v) for k, v in live.items())


def test_export_files_are_a_quarter_of_the_model_within_256_mib_and_5_gb():
    """layouts.export_files (meta tensors: sizes without memory): a 1690 MiB float32 model (issue 19's 443M Llama:
    embedding, 32 blocks of 45 MiB, head) goes into files of at most F / 4 = 422 MiB, in key order; a model under
    1 GiB into files of 256 MiB; one under 256 MiB into one file; a 70B-sized one into files of 5 GB; a tensor larger
    than the limit alone in its file."""
    def state(*mib):
        return {f"t{i}": torch.empty(int(m * 2**20) // 4, device="meta") for i, m in enumerate(mib)}

    def files(sizes, mapping):
        out = {}
        for (name, value) in sizes.items():
            out[mapping[name]] = out.get(mapping[name], 0) + value.numel() * 4
        return [out[i] for i in sorted(out)]

    llama = state(125, *[45] * 32, 125)
    mapping = layouts.export_files(llama)
    assert list(mapping.values()) == sorted(mapping.values())  # in key order
    sizes = files(llama, mapping)
    assert len(sizes) == 5 and max(sizes) <= sum(sizes) // 4 and sum(sizes) == 1690 * 2**20
    assert files(state(100, 100, 100), layouts.export_files(state(100, 100, 100))) == [200 * 2**20, 100 * 2**20]
    assert set(layouts.export_files(state(60, 60, 60)).values()) == {1}
    assert len(set(layouts.export_files(state(*[1000] * 280)).values())) == 56  # 273 GiB: 5 GiB files of 5 tensors
    assert layouts.export_files(state(10, 600, 10, 10, 10)) == {"t0": 1, "t1": 2, "t2": 3, "t3": 3, "t4": 3}


LORA = ["model.lora={r: 4, alpha: 8}", "model.reference_dtype=null"]  # on every linear layer but the head


def test_fsdp_lora_matches_basic_trainer(tiny_model_dir, tmp_path):
    """LoRA under FSDPTrainer (2 processes; the base sharded and frozen, the adapter trained; reference = adapter off):
    the adapter after 3 SGD steps equals BasicTrainer's to 1e-5 of the update; the base is untouched; final/ holds
    the adapter (gathered, loadable by peft) and the merged model (loadable by transformers) equal to BasicTrainer's;
    the sharded training state (the adapter only) reloads into one process. The reference log-probs are precomputed
    there (adapter off, sharded), BasicTrainer's come online in every step."""
    from peft import PeftModel

    import adapters
    extra = [*RUNS["dpo"], *LORA]
    proc = fsdp_run("python", "dpo", tiny_model_dir, tmp_path / "run", *LORA, f"reference_cache_dir={tmp_path}/c",
                    "precompute_reference_logps=true")  # the base's log-probs, adapter off, computed sharded
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "reference log-probs: 0 from the cache, 12 computed" in proc.stdout
    basic = build("dpo", tiny_model_dir, *COMMON, *extra)
    initial = {k: v.clone() for k, v in adapters.adapter_state(basic.policy).items()}
    base = params_of(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    for examples in basic.global_batches():
        basic.train_step(examples)
    want = adapters.adapter_state(basic.policy)
    final = tmp_path / "run" / "final"
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), final / "adapter")
    got = adapters.adapter_state(loaded)
    assert got.keys() == want.keys() and len(want) == 2 * 7 * 2  # A and B of 7 linear layers in 2 blocks
    largest = max((want[k] - initial[k]).abs().max().item() for k in want)
    assert largest > 0 and max((got[k] - want[k]).abs().max().item() for k in want) <= 1e-5 * largest
    merged = params_of(AutoModelForCausalLM.from_pretrained(final))
    expected = adapters.merged_state(basic.policy, basic.policy.state_dict())
    assert merged.keys() == base.keys()
    assert max((merged[k] - expected[k]).abs().max().item() for k in expected) <= 1e-5 * largest
    assert any(not torch.equal(merged[k], base[k]) for k in base)  # the adapter is merged in
    fresh = build("dpo", tiny_model_dir, *COMMON, *extra)
    assert checkpoints.load_sharded_state(fresh, str(final))["step"] == 3
    assert all(torch.equal(fresh.policy.state_dict()[k], v) for k, v in adapters.adapter_state(fresh.policy).items())
    for k, v in adapters.adapter_state(fresh.policy).items():
        assert (v - want[k]).abs().max().item() <= 1e-5 * largest, k
    assert adapters.base_state(fresh.policy.state_dict()).keys() == base.keys()
    assert all(torch.equal(v, base[k]) for k, v in adapters.base_state(fresh.policy.state_dict()).items())


def test_async_checkpoint_holds_the_state_of_its_step(tiny_model_dir, tmp_path, monkeypatch):
    """fsdp.async_checkpoint (world size 1, in process): save() returns while dcp/ is written in the background; the
    folder appears only when complete; what it holds is the state at the save, not after the steps taken since."""
    from train import free_port
    for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT=str(free_port())).items():
        monkeypatch.setenv(key, value)
    try:
        trainer = build("dpo", tiny_model_dir, *COMMON, *RUNS["dpo"], "trainer=FSDPTrainer", "fsdp.async_checkpoint=true",
                        f"output_dirs={tmp_path}/run")
        batches = trainer.global_batches()
        trainer.train_step(next(batches))
        at_save = {k: v.clone() for k, v in trainer.layout.full_state_dict(trainer.policy).items()}
        path = checkpoints.save(trainer, "step-000001")
        assert trainer.pending_save is not None and trainer.pending_save[0] is not None  # in flight (or just done)
        trainer.train_step(next(batches))  # training goes on meanwhile
        checkpoints.finish_save(trainer)
        assert trainer.pending_save is None and checkpoints.checkpoint_problem(path) is None
        fresh = build("dpo", tiny_model_dir, *COMMON, *RUNS["dpo"])
        assert checkpoints.load_sharded_state(fresh, path)["step"] == 1
    finally:
        torch.distributed.destroy_process_group()
    assert all(torch.equal(fresh.policy.state_dict()[k], v) for k, v in at_save.items())


@pytest.mark.parametrize("what", ["export", "dcp", "dcp-async"])
def test_a_failed_sharded_write_fails_the_save_and_keeps_the_earlier_checkpoint(what, tiny_model_dir, tmp_path,
                                                                                monkeypatch):
    """A disk full while every process writes: the HF export's shards, or dcp/ (synchronously, or in the background
    with fsdp.async_checkpoint). DCP reports it as a CheckpointException (a BaseException); the save fails with one
    line naming the OS's reason, the half-written folder is gone and the earlier checkpoint is untouched (world size
    1, in process)."""
    import errno

    from torch.distributed.checkpoint import FileSystemWriter, HuggingFaceStorageWriter

    from train import free_port
    for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT=str(free_port())).items():
        monkeypatch.setenv(key, value)
    try:
        trainer = build("sft", tiny_model_dir, *COMMON, "trainer=FSDPTrainer",
                        f"fsdp.async_checkpoint={what == 'dcp-async'}", f"output_dirs={tmp_path}/run")
        batches = trainer.global_batches()
        trainer.train_step(next(batches))
        good = checkpoints.save(trainer, "step-000001")
        checkpoints.finish_save(trainer)
        before = checkpoints.checkpoint_files(good)

        def disk_full(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")
        writer = HuggingFaceStorageWriter if what == "export" else FileSystemWriter  # the HF writer has its own
        monkeypatch.setattr(writer, "write_data", disk_full)  # a test-only fault injection
        trainer.train_step(next(batches))
        with pytest.raises(utils.TrainingError) as failed:
            checkpoints.save(trainer, "step-000002")
            checkpoints.finish_save(trainer)
    finally:
        torch.distributed.destroy_process_group()
    assert "could not save checkpoint" in str(failed.value) and "No space left on device" in str(failed.value)
    assert "earlier checkpoints are kept" in str(failed.value) and "\n" not in str(failed.value)
    assert sorted(os.listdir(tmp_path / "run")) == ["step-000001"] and checkpoints.checkpoint_files(good) == before


def test_a_damaged_sharded_state_is_one_line_or_skipped(tiny_model_dir, tmp_path, monkeypatch):
    """dcp/ damaged in a way its file sizes do not show (the bytes overwritten): DCP's CheckpointException becomes a
    one-line resume error naming the checkpoint; with resume=auto the checkpoint is skipped for an earlier one."""
    import train
    for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT=str(train.free_port())).items():
        monkeypatch.setenv(key, value)
    try:
        trainer = build("sft", tiny_model_dir, *COMMON, "trainer=FSDPTrainer", f"output_dirs={tmp_path}/run")
        batches = trainer.global_batches()
        for step in (1, 2):
            trainer.train_step(next(batches))
            checkpoints.save(trainer, f"step-00000{step}")
        shard = tmp_path / "run" / "step-000002" / "dcp" / "__0_0.distcp"
        shard.write_bytes(b"\0" * shard.stat().st_size)  # same size: checkpoint_problem cannot tell
        assert checkpoints.checkpoint_problem(str(shard.parent.parent)) is None
        with pytest.raises(utils.UserError) as refused:
            train.load_newest(trainer, [str(shard.parent.parent)])
        trainer.cfg.resume = "auto"
        earlier = train.load_newest(trainer, [str(shard.parent.parent), str(tmp_path / "run" / "step-000001")])
    finally:
        torch.distributed.destroy_process_group()
    assert str(refused.value).startswith(f"resume: cannot read {shard.parent.parent}") and "\n" not in str(refused.value)
    assert earlier.endswith("step-000001") and trainer.step == 1
