"""Peak host memory per process while FSDPTrainer loads a model (CPU, gloo, N processes).

    python bench/sharded_load.py                               # ~210M-param Llama, SFT and DPO, 2 processes
    python bench/sharded_load.py --model-dir /tmp/llama210m    # reuse (or create) the saved model there
    python bench/sharded_load.py --paths new,old --json /tmp/sharded_load.json

Saves a Llama-shaped model (random init, float32 safetensors, vocabulary 32000; `--size test`: 62M params, vocab
8000) to a local folder, then for each task (SFT: policy only; DPO: policy + sharded reference) starts N worker
processes (RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT set, as torchrun would; a worker can also be started by
`python -m torch.distributed.run --standalone --nproc_per_node 2 bench/sharded_load.py --worker --kind sft
--model-dir DIR`). Each worker loads example/tiny-<kind>.yml with trainer=FSDPTrainer and model.name_or_path=DIR,
makes the layout (FSDPRanks: the process group) and the tokenizer, reads its VmRSS (the baseline: imports,
process group, tokenizer), resets its peak (VmHWM, /proc/self/clear_refs), calls models.build_models, and reads
VmHWM and VmRSS again; rank 0 prints one JSON line per rank (prefix `SHARDED_LOAD `).

`--paths old` measures, in the same way, what the loading did before (every process reads the full float32 model,
deep-copies it as the reference, then shards both: models.load_policy + copy.deepcopy +
models.shard_policy_and_reference).

The bounds checked (and printed) per rank r of N, with F = the full float32 model's bytes, M = the number of models
(1 for SFT, 2 for DPO with the sharded reference), L = the largest single tensor (which the broadcast materialises
in full on every process, one tensor at a time), slack = SLACK_MB (64 MB, --slack-mb): glibc serves allocations
below its mmap threshold (which it raises, up to 32 MB, as large blocks are freed) from its heap, keeps freed ones
there for reuse and gives the heap's free top back only beyond its trim threshold (twice the mmap threshold: at most
64 MB), so some freed broadcast temporaries stay resident; blocks above 32 MB go back to the system when freed, so
this allowance does not grow with the model (measured excess: 5-40 MiB, for 50M- to 207M-parameter models):
    rank r > 0:  VmHWM - baseline  <  M * F / N + L + slack      (its shards; the issue's "half of the model" for N=2)
    rank 0:      VmHWM - baseline  <  F + F / N + L + slack      (the one full read, plus the policy's shards: a
                                                                  sharded reference copies them once the read is freed)
"""
import argparse
import copy
import gc
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled",
           "HF_HUB_DISABLE_TELEMETRY": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
SIZES = {  # Llama-shaped, untied embeddings (as Llama 2/3 7B/70B)
    "bench": dict(model_type="llama", vocab_size=32000, hidden_size=1024, intermediate_size=2816,
                  num_hidden_layers=12, num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=2048),
    # issue 19's model: 443.1M parameters, F = 1.65 GiB, embedding and head 0.074 F each
    "444m": dict(model_type="llama", vocab_size=32000, hidden_size=1024, intermediate_size=2816,
                 num_hidden_layers=32, num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=2048),
    "test": dict(model_type="llama", vocab_size=8000, hidden_size=768, intermediate_size=2048,
                 num_hidden_layers=8, num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=2048),
}
MB = 2 ** 20
SLACK_MB = 64  # glibc's largest trim threshold (2 x its largest dynamic mmap threshold, 32 MB): see the docstring


# ---- the parent: save the model, start the workers, check the bounds, print the table ----

def save_model(path, size):
    """A randomly initialised model of SIZES[size], float32 safetensors, in `path` (kept if already there)."""
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    arch = dict(SIZES[size])
    config = AutoConfig.for_model(arch.pop("model_type"), **arch)
    with torch.device("meta"):  # transformers' own init takes seconds per 50M params here: N(0, 0.02) instead
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.fill_(1.0) if "norm" in name else param.normal_(0.0, 0.02, generator=generator)
    model.save_pretrained(path)  # (non-persistent buffers such as inv_freq are not saved: the loader computes them)
    return path


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(model_dir, kind, world_size=2, path="new", timeout=900):
    """Start `world_size` worker processes (one process group); returns rank 0's records, one dict per rank."""
    return run_worker_processes([os.path.abspath(__file__), "--worker", "--kind", kind, "--model-dir", model_dir,
                                 "--path", path], world_size, "SHARDED_LOAD ", timeout)


def run_worker_processes(argv, world_size, prefix, timeout=900, env=None):
    """`python argv` as `world_size` processes of one process group (RANK / WORLD_SIZE / MASTER_* set, as torchrun
    would, plus `env`); returns the JSON records that rank 0 printed on lines starting with `prefix`, one per rank."""
    port, procs = str(free_port()), []
    for rank in range(world_size):
        rank_env = {**os.environ, **OFFLINE, **(env or {}), "RANK": str(rank), "LOCAL_RANK": str(rank),
                    "WORLD_SIZE": str(world_size), "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1",
                    "MASTER_PORT": port}
        procs.append(subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=rank_env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=timeout))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    failed = [(i, p.returncode, err[-3000:]) for i, (p, (_, err)) in enumerate(zip(procs, outputs)) if p.returncode]
    if failed:
        raise RuntimeError(f"worker(s) failed: {failed}")
    records = [json.loads(line[len(prefix):]) for line in outputs[0][0].splitlines() if line.startswith(prefix)]
    if len(records) != world_size:
        raise RuntimeError(f"expected {world_size} records from rank 0, got: {outputs[0][0][-2000:]}")
    return records


def bounds(record, slack_bytes):
    """(bound in bytes on VmHWM - baseline, its formula) for this record's rank (see the module docstring)."""
    full, n, models_, largest = record["full_bytes"], record["world_size"], record["n_models"], record["largest_bytes"]
    shards = models_ * full / n
    if record["rank"] == 0 and record.get("path", "new") == "new":  # the reference's shards come after the read
        return full + full / n + largest + slack_bytes, f"F + F/{n} + L + slack"
    if record["rank"] == 0:
        return full + shards + largest + slack_bytes, f"F + {models_}F/{n} + L + slack"
    return shards + largest + slack_bytes, f"{models_}F/{n} + L + slack"


def check(records, slack_bytes):
    """Adds bound_bytes / bound / within to each record; True if every rank is within its bound."""
    for r in records:
        r["bound_bytes"], r["bound"] = bounds(r, slack_bytes)
        r["within"] = r["hwm_bytes"] - r["baseline_rss_bytes"] < r["bound_bytes"]
    return all(r["within"] for r in records)


def table(rows):
    head = ("task", "path", "rank", "full F (MiB)", "baseline RSS", "VmHWM", "VmHWM - baseline", "/ F", "RSS after",
            "bound", "bound (MiB)", "within", "load s")
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        delta = r["hwm_bytes"] - r["baseline_rss_bytes"]
        lines.append("| " + " | ".join(str(x) for x in (
            r["kind"], r["path"], r["rank"], f"{r['full_bytes'] / MB:.0f}", f"{r['baseline_rss_bytes'] / MB:.0f}",
            f"{r['hwm_bytes'] / MB:.0f}", f"{delta / MB:.0f}", f"{delta / r['full_bytes']:.2f}",
            f"{r['rss_after_bytes'] / MB:.0f}", r["bound"], f"{r['bound_bytes'] / MB:.0f}",
            "yes" if r["within"] else "NO", f"{r['seconds']:.1f}")) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", action="store_true", help="one worker process (RANK / WORLD_SIZE / MASTER_* set)")
    parser.add_argument("--kind", default="sft", choices=["sft", "dpo"], help="(--worker) the task")
    parser.add_argument("--path", default="new", choices=["new", "old"], help="(--worker) how the model is built")
    parser.add_argument("--model-dir", default=None, help="the saved model (created there if missing)")
    parser.add_argument("--size", default="bench", choices=sorted(SIZES), help="architecture of a model to create")
    parser.add_argument("--kinds", default="sft,dpo")
    parser.add_argument("--paths", default="new", help="new, old or new,old")
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--slack-mb", type=float, default=SLACK_MB)
    parser.add_argument("--json", default=None, help="write all records here")
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args.kind, args.model_dir, args.path)
    model_dir = args.model_dir or os.path.join("/tmp", f"sharded-load-{args.size}")
    started = time.time()
    save_model(model_dir, args.size)
    print(f"model: {model_dir} (saved/checked in {time.time() - started:.0f} s)", flush=True)
    rows, ok = [], True
    for kind in args.kinds.split(","):
        for path in args.paths.split(","):
            records = run_workers(model_dir, kind, args.world_size, path)
            within = check(records, args.slack_mb * MB)
            ok = ok and (within or path == "old")  # the old path is a comparison, not expected to pass
            rows += records
            print(table(records), flush=True)
    print("\n" + table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0 if ok else 1


# ---- the worker ----

def proc_status() -> dict:
    """VmRSS, VmHWM, RssAnon, RssFile of this process, in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(value.split()[0]) * 1024
    return out


def reset_peak() -> bool:
    """VmHWM := VmRSS (Linux >= 4.0), so that the peak measured is the loading's, not the imports'."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def local_and_full(models_):
    """(bytes this process holds of the models' parameters and buffers, full float32 bytes, largest tensor bytes)."""
    from torch.distributed.tensor import DTensor
    local = full = largest = 0
    for model in models_:
        seen = set()
        for _, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
            if id(t) in seen:
                continue
            seen.add(id(t))
            whole = t.numel() * t.element_size()
            part = t.to_local() if isinstance(t, DTensor) else t
            local += part.numel() * part.element_size()
            if model is models_[0]:
                full, largest = full + whole, max(largest, whole)
    return local, full, largest


def old_build(cfg, tokenizer, layout):
    """The loading before build_models shared one read: every process reads the full float32 model, deep-copies it
    as the reference, and shards both (fully_shard keeps each process's chunk of the full tensors)."""
    import losses
    import models
    policy = models.load_policy(cfg, tokenizer)
    reference = copy.deepcopy(policy).eval().requires_grad_(False) if losses.needs_reference(cfg.loss) else None
    models.shard_policy_and_reference(cfg, layout, policy, reference)
    return policy, reference


def worker(kind, model_dir, path):
    os.environ.update(OFFLINE)
    sys.path.insert(0, ROOT)
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    import models
    import utils
    from config import load_config
    from layouts import FSDPRanks
    overrides = ["trainer=FSDPTrainer", f"model.name_or_path={model_dir}", "model.from_config=null",
                 f"model.tokenizer_name_or_path={os.path.join(ROOT, 'example', 'tokenizer')}", "device=cpu",
                 "n_eval_examples=0", "wandb.enabled=false"]
    cfg = load_config(os.path.join(ROOT, "example", f"tiny-{kind}.yml"), overrides)
    utils.set_seed(cfg.seed)
    layout = FSDPRanks(cfg)
    tokenizer = models.build_tokenizer(cfg)
    # code is a fixed overhead too: import the model's modeling module (and the state-dict helpers) before the
    # baseline, so that the difference measured is the weights (build_models would import them first thing)
    import torch.distributed.checkpoint.state_dict  # noqa: F401
    from transformers import AutoConfig, AutoModelForCausalLM
    AutoModelForCausalLM._model_mapping[type(AutoConfig.from_pretrained(model_dir))]
    gc.collect()
    before = proc_status()
    reset = reset_peak()
    started = time.time()
    if path == "new":
        policy, reference, _ = models.build_models(cfg, tokenizer, layout)
        reference = getattr(reference, "model", None)
    else:
        policy, reference = old_build(cfg, tokenizer, layout)
    dist.barrier()
    seconds = time.time() - started
    after = proc_status()
    models_ = [policy] + ([reference] if reference is not None else [])
    local, full, largest = local_and_full(models_)
    record = dict(kind=kind, path=path, rank=layout.rank, world_size=layout.world_size, n_models=len(models_),
                  full_bytes=full, largest_bytes=largest, local_bytes=local, peak_reset=reset,
                  baseline_rss_bytes=before["VmRSS"], baseline_hwm_bytes=before["VmHWM"],
                  baseline_rss_anon_bytes=before["RssAnon"], baseline_rss_file_bytes=before["RssFile"],
                  hwm_bytes=after["VmHWM"],
                  rss_after_bytes=after["VmRSS"], rss_anon_after_bytes=after["RssAnon"],
                  rss_file_after_bytes=after["RssFile"], seconds=seconds,
                  shard_reference=bool(cfg.fsdp.shard_reference))
    records = [None] * layout.world_size
    dist.all_gather_object(records, record)
    if layout.rank == 0:
        for r in records:
            print("SHARDED_LOAD " + json.dumps(r), flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    code = main()
    if "--worker" in sys.argv:  # like train.py's torchrun processes: no interpreter teardown (train.end_process)
        sys.path.insert(0, ROOT)
        from train import end_process
        end_process(code)
    sys.exit(code)
