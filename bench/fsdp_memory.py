"""Host memory per process, phase by phase, while FSDPTrainer trains DPO (CPU, gloo, N processes).

    python bench/fsdp_memory.py                                # 207M-param Llama (F = 790 MiB), 2 processes: ~2 min
    python bench/fsdp_memory.py --size test                    # the 62.6M test model (F = 239 MiB)
    python bench/fsdp_memory.py --size 444m                    # issue 19's 443M Llama (F = 1.65 GiB): ~6 min
    python bench/fsdp_memory.py --env MALLOC_MMAP_THRESHOLD_=1048576 --json /tmp/fsdp_memory.json

Saves a Llama-shaped model (bench/sharded_load.py's SIZES, float32 safetensors) to a local folder, then starts N
worker processes (as torchrun would). Each runs example/tiny-dpo.yml with trainer=FSDPTrainer, that folder, SGD
(no optimizer state: what is left is weights, gradients and transients), 2 examples per step (one per process: a
chosen and a rejected sequence of up to 64 tokens), `--steps` steps, then the final save (HF export + dcp/). The
process group is made and the code imported first; VmRSS then is the baseline. Each phase resets the peak
(/proc/self/clear_refs) when it starts and reads VmHWM (its peak) and VmRSS when it ends, plus glibc's view
(mallinfo2: bytes free inside its heap, which it keeps instead of returning them; bytes in mmapped blocks):

    load              train.build_trainer: data, models.build_models (rank 0 reads the file, the shards are filled)
    policy forward    from the policy's forward pre-hook (before FSDP's own all-gather) to the reference's
    reference forward the reference's forward (no grad)
    backward          from the reference's output to the optimizer's step pre-hook: loss, backward (FSDP
                      all-gathers again and reduce-scatters the gradients), the metrics' all-reduce, clipping
    optimizer step    SGD's step, from its pre- to its post-hook
    after step        scheduler and zero_grad, to the end of train_step
    export            checkpoints.save(trainer, "final")

Rank 0 prints one JSON line per rank (prefix `FSDP_MEMORY `); the parent prints a table in units of F (the full
float32 model's bytes) and MiB, the peak of each rank during training (the phases between load and export) and
during the whole run, and exits 1 if a rank's whole-run peak exceeds `--bound` x F above its baseline (default 1.75:
the policy's, its gradients' and the reference's shards are 1.5 F per process with N = 2).
"""
import argparse
import ctypes
import gc
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sharded_load import MB, ROOT, OFFLINE, SIZES, proc_status, reset_peak, run_worker_processes, save_model  # noqa: E402

TRAINING = ("policy forward", "reference forward", "backward", "optimizer step", "after step")
PREFIX = "FSDP_MEMORY "


class MallInfo2(ctypes.Structure):
    """glibc's struct mallinfo2 (glibc >= 2.33): all size_t."""
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


def malloc_info() -> dict:
    """glibc's heap: bytes free inside it (kept, not returned: fordblks) and bytes in mmapped blocks (hblkhd);
    {} where there is no mallinfo2 (another libc)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = MallInfo2
    except (OSError, AttributeError):
        return {}
    info = libc.mallinfo2()
    return {"heap_free_bytes": info.fordblks, "mmapped_bytes": info.hblkhd}


class PhaseMeter:
    """Phases one after the other: `mark(name)` ends the current one (its VmHWM, VmRSS, glibc heap) and starts the
    next (the peak reset to the current RSS)."""

    def __init__(self):
        self.records, self.current, self.step = [], None, 0

    def mark(self, name):
        self.stop()
        reset_peak()
        self.current, self.started, self.cpu_started = name, time.time(), time.process_time()

    def stop(self):
        if self.current is None:
            return
        status = proc_status()
        self.records.append(dict(phase=self.current, step=self.step, hwm_bytes=status["VmHWM"],
                                 rss_bytes=status["VmRSS"], seconds=time.time() - self.started,
                                 cpu_seconds=time.process_time() - self.cpu_started, **malloc_info()))
        self.current = None


def watch_step(trainer, meter) -> list:
    """Hooks that mark the phases of a train_step (module docstring): the policy's forward pre-hook goes first
    (prepend), before FSDP's, which all-gathers the root's weights. Returns their handles: the export's optimizer
    state dict takes a step of its own (DCP initialises an empty optimizer state so), which is not a phase."""
    reference = trainer.reference.model
    return [trainer.policy.register_forward_pre_hook(lambda *_: meter.mark("policy forward"), prepend=True),
            reference.register_forward_pre_hook(lambda *_: meter.mark("reference forward"), prepend=True),
            reference.register_forward_hook(lambda *_: meter.mark("backward")),
            trainer.optimizer.register_step_pre_hook(lambda *_: meter.mark("optimizer step")),
            trainer.optimizer.register_step_post_hook(lambda *_: meter.mark("after step"))]


def sharded_bytes(model) -> tuple:
    """(bytes of this process's shards, bytes of the full float32 model, of its largest float32 tensor L) of a
    model's parameters and buffers."""
    from torch.distributed.tensor import DTensor
    local = full = largest = 0
    for t in {id(t): t for t in [*model.parameters(), *model.buffers()]}.values():
        part = t.to_local() if isinstance(t, DTensor) else t
        local += part.numel() * part.element_size()
        full, largest = full + t.numel() * 4, max(largest, t.numel() * 4)
    return local, full, largest


def worker(model_dir, steps, out):
    os.environ.update(OFFLINE)
    sys.path.insert(0, ROOT)
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    import checkpoints
    import train
    from config import load_config
    overrides = ["trainer=FSDPTrainer", f"model.name_or_path={model_dir}", "model.from_config=null", "device=cpu",
                 f"model.tokenizer_name_or_path={os.path.join(ROOT, 'example', 'tokenizer')}", "n_eval_examples=0",
                 "wandb.enabled=false", "report_to_tensorboard=false", "optimizer=SGD", "lr=1e-4", "warmup_steps=0",
                 "total_batch_size=2", "gradient_accumulation_steps=1", "max_length=64", "max_prompt_length=32",
                 f"n_examples={2 * steps}", "n_epochs=null", f"output_dirs={out}", "do_first_eval=false"]
    cfg = load_config(os.path.join(ROOT, "example", "tiny-dpo.yml"), overrides)
    dist.init_process_group("gloo")  # a fixed cost, like the imports: before the baseline (FSDPRanks reuses it)
    import torch.distributed.checkpoint.state_dict  # noqa: F401  (build_models' first imports)
    from transformers import AutoConfig, AutoModelForCausalLM
    AutoModelForCausalLM._model_mapping[type(AutoConfig.from_pretrained(model_dir))]
    gc.collect()
    baseline, meter = proc_status(), PhaseMeter()
    meter.mark("load")
    trainer = train.build_trainer(cfg)
    meter.stop()
    local_policy, full, largest = sharded_bytes(trainer.policy)
    local_reference, *_ = sharded_bytes(trainer.reference.model)
    hooks = watch_step(trainer, meter)
    for step, examples in zip(range(1, steps + 1), trainer.global_batches()):
        meter.step = step
        trainer.train_step(examples)
        meter.stop()
    for hook in hooks:
        hook.remove()
    meter.mark("export")
    checkpoints.save(trainer, "final")
    meter.stop()
    record = dict(rank=trainer.rank, world_size=trainer.world_size, full_bytes=full, largest_bytes=largest,
                  local_policy_bytes=local_policy,
                  local_reference_bytes=local_reference, baseline_rss_bytes=baseline["VmRSS"], phases=meter.records,
                  env={k: v for k, v in os.environ.items() if k.startswith("MALLOC_")})
    records = [None] * trainer.world_size
    dist.all_gather_object(records, record)
    if trainer.rank == 0:
        for r in records:
            print(PREFIX + json.dumps(r), flush=True)
    trainer.layout.close()
    return 0


def run(model_dir, steps, world_size=2, env=None) -> list:
    """The workers' records (one per rank) for `steps` steps and the export of the model in `model_dir`."""
    with tempfile.TemporaryDirectory() as out:
        return run_worker_processes([os.path.abspath(__file__), "--worker", "--model-dir", model_dir, "--steps",
                                     str(steps), "--out", out], world_size, PREFIX, env=env)


def table(records) -> str:
    """One row per phase and step, per rank: peak and end RSS above the baseline, in F and MiB."""
    head = ["phase", "step"] + [f"rank {r['rank']} {what}" for r in records for what in ("peak / F", "RSS / F")] + \
           [f"rank {r['rank']} heap free MiB" for r in records]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for i, phase in enumerate(records[0]["phases"]):
        cells = [phase["phase"], str(phase["step"])]
        rows = [r["phases"][i] for r in records]
        for r, p in zip(records, rows):
            base, full = r["baseline_rss_bytes"], r["full_bytes"]
            cells += [f"{(p['hwm_bytes'] - base) / full:.2f}", f"{(p['rss_bytes'] - base) / full:.2f}"]
        cells += [f"{p.get('heap_free_bytes', 0) / MB:.0f}" for p in rows]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def peaks(records, phases=TRAINING) -> dict:
    """rank -> its highest VmHWM - baseline over `phases` (the training ones; None: the whole run), in units of F."""
    return {r["rank"]: max((p["hwm_bytes"] - r["baseline_rss_bytes"]) / r["full_bytes"]
                           for p in r["phases"] if phases is None or p["phase"] in phases) for r in records}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", action="store_true", help="one worker process (RANK / WORLD_SIZE / MASTER_* set)")
    parser.add_argument("--model-dir", default=None, help="the saved model (created there if missing)")
    parser.add_argument("--size", default="bench", choices=sorted(SIZES), help="architecture of a model to create")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--out", default=None, help="(--worker) the run folder")
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE for the workers (glibc's MALLOC_...)")
    parser.add_argument("--bound", type=float, default=1.75, help="allowed peak above the baseline, in F")
    parser.add_argument("--json", default=None, help="write the records here")
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args.model_dir, args.steps, args.out)
    model_dir = save_model(args.model_dir or os.path.join("/tmp", f"sharded-load-{args.size}"), args.size)
    records = run(model_dir, args.steps, args.world_size, dict(kv.split("=", 1) for kv in args.env))
    full = records[0]["full_bytes"]
    print(f"F = {full / MB:.0f} MiB; baseline RSS (MiB): {[round(r['baseline_rss_bytes'] / MB) for r in records]}; "
          f"shards (policy + reference, MiB): {[round((r['local_policy_bytes'] + r['local_reference_bytes']) / MB) for r in records]}")
    print(table(records))
    for what, phases in (("training", TRAINING), ("whole run (load, training, export)", None)):
        print(f"{what} peak above baseline, in F: " +
              ", ".join(f"rank {k} {v:.2f}" for k, v in peaks(records, phases).items()) + f" (bound {args.bound})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
    return 0 if all(v <= args.bound for v in peaks(records, None).values()) else 1


if __name__ == "__main__":
    code = main()
    if "--worker" in sys.argv:  # like train.py's torchrun processes: no interpreter teardown (train.end_process)
        sys.path.insert(0, ROOT)
        from train import end_process
        end_process(code)
    sys.exit(code)
