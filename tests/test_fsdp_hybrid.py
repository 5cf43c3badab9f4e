"""HSDP (fsdp.replicate > 1): a 2-D device mesh, replicas x shards. On CPU (gloo, 4 processes as 2 x 2) the same
weights as BasicTrainer; the sharded state reloads into one process; invalid layouts are one-line errors."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import checkpoints
import layouts
import utils
from config import load_config
from conftest import TINY, assert_one_line_error, build, local_model_overrides, params_of, read_jsonl, run_cli

# 3 optimizer steps of 8 DPO pairs, 2 micro-batches of 1 pair on each of 4 processes; SGD with lr=1 and momentum
# makes the update large. No clipping: BasicTrainer's own float32 norm (torch's CPU vector_norm of a whole tensor) is
# ~5e-6 off the exact one here, which clipping would carry into the weights; the sharded norm is checked as the
# grad_norm metric instead (a norm not reduced over a mesh dimension is off by far more than 1e-5)
DPO = ["optimizer=SGD", "lr=1.0", "warmup_steps=0", "total_batch_size=8", "gradient_accumulation_steps=2",
       "n_examples=24", "n_epochs=null", "n_eval_examples=0", "print_log_step=1", "report_to_tensorboard=false",
       "max_grad_norm=0", "optimizer_kwargs={momentum: 0.9}"]


# train.py under torchrun, counting FSDP's gradient collectives per process group (by its ranks)
COUNTING = """
import json, os, sys
sys.path.insert(0, os.getcwd())
import torch.distributed as dist
import train
counts = {}
def counted(name, real):
    def collective(*args, group=None, **kwargs):
        key = name + " " + (",".join(map(str, dist.get_process_group_ranks(group))) if group is not None else "world")
        counts[key] = counts.get(key, 0) + 1
        return real(*args, group=group, **kwargs)
    return collective
dist.all_reduce = counted("all_reduce", dist.all_reduce)
dist.reduce_scatter_single = counted("reduce_scatter", dist.reduce_scatter_single)
code = train.cli(sys.argv[2:])
with open(os.path.join(sys.argv[1], "collectives-" + os.environ["RANK"] + ".json"), "w") as f:
    json.dump(counts, f)
train.end_process(code)
"""


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # DCP read by one process: intended
def test_hybrid_2x2_matches_basic_trainer(tiny_model_dir, tmp_path):
    """4 gloo processes under torchrun as 2 replicas x 2 shards (sharded reference) vs BasicTrainer in this process:
    weights to 1e-5 of the largest update (gradients summed within AND across replicas), per-step metrics (grad_norm:
    the DTensor norm over the 2-D mesh), the export, and the DCP state read back by one process. Gradients cross
    between replicas once per step: FSDP's all-reduces over the replica group are half its reduce-scatters within
    the shard group (2 micro-batches a step; on CPUs these run as all-reduces, sharding.AllReduceScatter)."""
    run, script = tmp_path / "run", tmp_path / "counting.py"
    script.write_text(COUNTING)
    proc = run_cli("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4", str(script), str(tmp_path),
                   TINY["dpo"], "--overrides", "trainer=FSDPTrainer", "fsdp.replicate=2", f"output_dirs={run}", *DPO,
                   *local_model_overrides(tiny_model_dir), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in range(4):  # mesh [[0, 1], [2, 3]]: shards within a row, replicas down a column
        counts = json.loads((tmp_path / f"collectives-{rank}.json").read_text())
        replicas, shards = f"{rank % 2},{rank % 2 + 2}", f"{rank // 2 * 2},{rank // 2 * 2 + 1}"
        # within the shard group: sharding.AllReduceScatter, FSDP's reduce-scatter on CPUs as an in-place all-reduce
        across, within = counts.get(f"all_reduce {replicas}", 0), counts.get(f"all_reduce {shards}", 0)
        assert not counts.get(f"reduce_scatter {shards}"), counts
        assert across > 0 and within == 2 * across and across % 3 == 0, counts  # 3 steps x the FSDP groups
    basic = build("dpo", tiny_model_dir, *DPO)
    initial = params_of(basic.policy)
    basic_metrics = [basic.train_step(examples)[0] for examples in basic.global_batches()]
    expected = params_of(basic.policy)
    exported = params_of(AutoModelForCausalLM.from_pretrained(run / "final"))  # full_state_dict over the 2-D mesh
    assert exported.keys() == expected.keys()
    largest = max((want - initial[k]).abs().max().item() for k, want in expected.items())
    worst = max((exported[k] - want).abs().max().item() for k, want in expected.items())
    assert worst <= 1e-5 * largest, (worst, largest)
    for k, want in expected.items():  # per tensor too: an average over replicas instead of a sum is off by 50%
        update = (want - initial[k]).abs().max().item()
        assert update > 0 or "rotary" in k, k
        assert (exported[k] - want).abs().max().item() <= 1e-4 * update + 1e-8, k
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    for row, want in zip(rows, basic_metrics):
        for key in ("loss", "grad_norm", "examples_seen", "rewards/accuracies", "logps/chosen"):
            assert row[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), key
    assert proc.stdout.count("run folder:") == 1 and "x 4" in proc.stdout
    # DCP over the 2-D mesh: each shard written once (replicas hold the same), readable at another layout
    fresh = build("dpo", tiny_model_dir, *DPO)
    state = checkpoints.load_sharded_state(fresh, str(run / "final"))
    assert (state["step"], state["examples_seen"]) == (3, 24)
    for k, want in expected.items():
        torch.testing.assert_close(params_of(fresh.policy)[k], want, rtol=0,
                                   atol=1e-5 * max(1.0, want.abs().max().item()))
    names = {p: n for n, p in basic.policy.named_parameters()}
    loaded = dict(fresh.policy.named_parameters())
    for p, s in basic.optimizer.state.items():
        torch.testing.assert_close(fresh.optimizer.state[loaded[names[p]]]["momentum_buffer"], s["momentum_buffer"],
                                   rtol=1e-4, atol=1e-6)


def test_replicate_not_dividing_the_world_size_is_one_line_error(tmp_path):
    """The own launcher on CPU: refused from the config (fsdp.world_size), before any worker is started."""
    proc = run_cli("train.py", TINY["sft"], "--overrides", "trainer=FSDPTrainer", "fsdp.world_size=4",
                   "fsdp.replicate=3", f"output_dirs={tmp_path}/r")
    assert_one_line_error(proc, "fsdp.replicate=3", "does not divide the world size 4")
    assert not (tmp_path / "r").exists()
    with pytest.raises(utils.UserError, match=r"fsdp.replicate=8 is larger than the world size 4"):
        load_config(TINY["sft"], ["trainer=FSDPTrainer", "fsdp.world_size=4", "fsdp.replicate=8"])
    load_config(TINY["sft"], ["fsdp.world_size=4", "fsdp.replicate=8"])  # BasicTrainer: fsdp.* do not apply


def test_replicate_checked_against_torchrun_world_size(monkeypatch):
    """Under torchrun the world size is WORLD_SIZE (fsdp.world_size does not apply): checked from the config in every
    rank, and again by the layout itself (layouts.FSDPRanks: the own launcher on GPUs, one worker per GPU)."""
    three = ["trainer=FSDPTrainer", "fsdp.world_size=3", "fsdp.replicate=3", "total_batch_size=24"]
    cfg = load_config(TINY["sft"], three)  # passes
    for key, value in {"WORLD_SIZE": "8", "RANK": "0", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(utils.UserError, match=r"fsdp.replicate=3 does not divide the world size 8"):
        load_config(TINY["sft"], three)
    with pytest.raises(utils.UserError, match=r"fsdp.replicate=3 does not divide the world size 8"):
        layouts.FSDPRanks(cfg)  # before any process group is started
    assert not torch.distributed.is_initialized()
