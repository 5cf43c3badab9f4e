"""LoRA-DPO against full DPO on a ~100M-parameter Llama built from config: peak memory and time per optimizer step.

    python bench/lora.py [--out DIR] [--rounds 3] [--steps 3] [--tree DIR] [--train-overrides 'K=V ...']

Writes the synthetic DPO workload of bench/workload.py into DIR, then runs `python train.py DIR/dpo.yml --overrides
...` as child processes, full DPO and LoRA-DPO (r 16, alpha 32, all-linear) alternating for --rounds rounds, with the
same data, the same batches (8 pairs per step in 2 micro-batches), the same model and float32 everywhere; the only
difference is `model.lora` (and `model.reference_dtype=null`, which LoRA requires: its reference is the base).

Measured per child: its own peak RSS and CPU seconds (ru_maxrss, ru_utime + ru_stime from os.wait4) and its wall
time. Per optimizer step, two ways: the wall seconds train.py itself timed (with print_log_step=1 every logging window
is exactly one step, evaluation and saving excluded, so that step's non-pad tokens / its logged tokens_per_second is
its time), and the child's CPU seconds between two consecutive metrics.jsonl rows (polled every 0.1 s from
/proc/PID/stat). With one thread per child the CPU time is what the step costs; the wall time also holds whatever
other jobs on the machine took from it. Writes DIR/lora-results.json and prints a markdown table.

--tree runs train.py from another copy of the repository (e.g. `git archive HEAD | tar -x -C /tmp/head`, then
`--tree /tmp/head --tree-commit $(git rev-parse HEAD)`), so that uncommitted edits in this working tree are not what
gets measured.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import run as bench_run  # noqa: E402  (CHILD_ENV, meta, tail: shared with the main benchmark)
import workload  # noqa: E402
from config import load_config

# ~100M parameters, Llama-shaped (GPT-2 small's width); the untied 32k embedding and head are 49M of it.
MODEL = {"hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 8, "num_attention_heads": 12,
         "num_key_value_heads": 12, "max_position_embeddings": 1024, "vocab_size": 32000}
LORA = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}
BATCH, MICRO_BATCHES = 8, 2
# Shorter than the workload's 512 / 256 and packed, so that a step of the 100M model takes tens of seconds on one
# CPU thread instead of minutes (a padded micro-batch of 8 rows x 512 tokens: ~75 s for its reference forward, forward
# and backward, measured on a busy machine).
DATA = ["max_length=256", "max_prompt_length=128", "packing=true"]
VARIANTS = {"full": "full DPO", "lora": "LoRA-DPO (r 16, all-linear)"}


def overrides(variant, steps, run_dir, extra=()):
    """train.py overrides: the same model, data and batches for both variants; no eval, no checkpoints (debug=true,
    so saving a 400 MB model does not dominate), one metrics row per step; plus model.lora for the LoRA one."""
    common = [f"model.from_config.{k}={v}" for k, v in MODEL.items()] + DATA + [
        f"total_batch_size={BATCH}", f"gradient_accumulation_steps={MICRO_BATCHES}", f"n_examples={steps * BATCH}",
        "print_log_step=1", "n_eval_examples=0", "do_first_eval=false", "debug=true", "report_to_tensorboard=false",
        "model.policy_dtype=float32", "overwrite=true", f"output_dirs={run_dir}", *extra]
    if variant == "full":
        return common + ["model.reference_dtype=float32"]
    lora = ", ".join(f"{k}: {v}" for k, v in LORA.items())
    return common + ["model.reference_dtype=null", f"model.lora={{{lora}}}"]


def parameter_counts():
    """Exact parameter counts of the model and of its adapter (the trainable part), built on the meta device (no
    memory) from the same transformers config and peft LoraConfig that train.py builds."""
    import peft
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **MODEL))
    total = sum(p.numel() for p in model.parameters())
    config = peft.LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                             target_modules=LORA["target_modules"], task_type="CAUSAL_LM")
    adapter = sum(p.numel() for p in peft.get_peft_model(model, config).parameters() if p.requires_grad)
    return {"full": {"params": total, "trainable": total}, "lora": {"params": total + adapter, "trainable": adapter}}


def step_tokens(tree, config_path, cfg_overrides, steps):
    """Non-pad tokens (chosen + rejected: what train.py's tokens_per_second counts) of each optimizer step, in
    train.py's example order (the permutation seeded by `seed`; the first epoch holds all `steps` batches)."""
    sys.path.insert(0, tree)
    import torch
    from transformers import AutoTokenizer
    import data
    cfg = load_config(config_path, cfg_overrides)
    tok = data.prepare_tokenizer(AutoTokenizer.from_pretrained(cfg.model.tokenizer_name_or_path))
    train, _, _ = data.build_datasets([dict(s) for s in cfg.datasets], [], tok, "preference", cfg.max_length,
                                      cfg.max_prompt_length, 0, cfg.seed)
    assert steps * BATCH <= len(train) and not cfg.group_by_length, "one epoch, plain permutation"
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    batches = [order[i * BATCH:(i + 1) * BATCH] for i in range(steps)]
    return [sum(len(train[i]["chosen_input_ids"]) + len(train[i]["rejected_input_ids"]) for i in b) for b in batches]


def cpu_seconds(pid):
    """utime + stime of a live process (all its threads), from /proc/PID/stat; None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # after "(comm)", which may contain spaces
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # fields 14 and 15 of proc(5)


def run_child(cmd, cwd, log_base, cache_dir, env_extra, metrics_path):
    """Run cmd in cwd with one thread (bench/run.py's CHILD_ENV), output to files (a full pipe would stall it).
    While it runs, every 0.1 s: has metrics.jsonl got a new row (a step ended)? Then note the child's CPU seconds,
    which, unlike wall time, other jobs on the machine hardly change. -> (wall s, peak RSS MiB, CPU s, exit code,
    [CPU s of the child when each metrics row appeared]); rusage is the child's own, from os.wait4."""
    env = {**os.environ, **bench_run.CHILD_ENV, "XDG_CACHE_HOME": cache_dir, **env_extra,
           "MPLCONFIGDIR": os.path.join(os.path.dirname(cache_dir), "matplotlib")}  # one shared, warmed font cache
    marks = []
    with open(log_base + ".out", "w") as out, open(log_base + ".err", "w") as err:
        start = time.perf_counter()
        child = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=err)
        while True:
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)
            if pid:
                break
            rows = count_rows(metrics_path)
            if rows > len(marks):
                marks += [cpu_seconds(child.pid)] * (rows - len(marks))  # > 1 only if a step took < 0.1 s
            time.sleep(0.1)
        wall = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
    return wall, usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime, child.returncode, marks  # maxrss: KiB


def count_rows(path):
    try:
        with open(path) as f:
            return sum(1 for line in f if line.endswith("\n"))  # complete rows only
    except OSError:
        return 0


def step_seconds(run_dir, tokens):
    """Seconds of each optimizer step as train.py timed it (one metrics.jsonl row per step with print_log_step=1:
    tokens_per_second is that step's tokens over that step's time); -> (seconds per step, last step's loss)."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [r for r in map(json.loads, filter(str.strip, f)) if "tokens_per_second" in r]
    assert [r["step"] for r in rows] == list(range(1, len(tokens) + 1)), "expected one metrics row per step"
    return [n / r["tokens_per_second"] for n, r in zip(tokens, rows)], rows[-1]["loss"]


def run_variant(variant, round_, args, tokens):
    """One train.py child, in a fresh run folder; -> its record (command, wall, peak RSS, CPU seconds, per-step
    seconds: train.py's own wall timing and the child's CPU time between metrics rows, final loss)."""
    run_dir = os.path.join(args.out, "runs", variant)
    shutil.rmtree(run_dir, ignore_errors=True)  # an old metrics.jsonl would be taken for this run's rows
    cmd = [sys.executable, "train.py", args.config, "--overrides",
           *overrides(variant, args.steps, run_dir, args.train_overrides.split())]
    log_base = os.path.join(args.out, "logs", f"{variant}-{round_}")
    wall, rss, cpu, code, marks = run_child(cmd, args.tree, log_base, os.path.join(args.out, "cache",
                                            f"{variant}-{round_}"), dict(kv.split("=", 1) for kv in args.env),
                                            os.path.join(run_dir, "metrics.jsonl"))
    record = {"variant": variant, "round": round_, "cmd": cmd, "wall_s": wall, "cpu_s": cpu, "peak_rss_mib": rss,
              "returncode": code, "cpu_at_rows": marks}
    if code != 0:
        print(f"error: {' '.join(cmd)} exited {code}; stderr tail ({log_base}.err):\n"
              f"{bench_run.tail(log_base + '.err')}", file=sys.stderr)
        return record
    record["step_s"], record["final_loss"] = step_seconds(run_dir, tokens)
    # the CPU time of steps 2..N (step 1's start is not observable from outside; it is left out anyway)
    record["step_cpu_s"] = [b - a for a, b in zip(marks, marks[1:]) if a is not None and b is not None]
    return record


def summarize(runs, counts):
    """Per variant: medians over the rounds (peak RSS, wall and CPU seconds) and over every step but each run's
    first (which pays for one-off allocations and lazy initialisation)."""
    rows = {}
    for v in VARIANTS:
        mine = [r for r in runs if r["variant"] == v]
        steps, rss = [s for r in mine for s in r["step_s"][1:]], [r["peak_rss_mib"] for r in mine]
        cpu_steps = [s for r in mine for s in r["step_cpu_s"]]
        rows[v] = {"median_step_s": statistics.median(steps), "min_step_s": min(steps), "max_step_s": max(steps),
                   "median_step_cpu_s": statistics.median(cpu_steps), "min_step_cpu_s": min(cpu_steps),
                   "max_step_cpu_s": max(cpu_steps), "median_peak_rss_mib": statistics.median(rss),
                   "min_peak_rss_mib": min(rss), "max_peak_rss_mib": max(rss),
                   "median_wall_s": statistics.median(r["wall_s"] for r in mine),
                   "median_cpu_s": statistics.median(r["cpu_s"] for r in mine),
                   "final_loss": [r["final_loss"] for r in mine], **counts[v]}
    for row in rows.values():
        for key in ("step_s", "step_cpu_s", "peak_rss_mib"):
            row[f"{key}_vs_full"] = row[f"median_{key}"] / rows["full"][f"median_{key}"]
    return rows


def table(rows):
    lines = ["| variant | params | trainable | peak RSS MiB (min / max) | RSS vs full | wall s / step (min / max) "
             "| CPU s / step (min / max) | CPU step vs full | process wall / CPU s |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for v, r in rows.items():
        lines.append(f"| {VARIANTS[v]} | {r['params']:,} | {r['trainable']:,} ({r['trainable'] / r['params']:.2%}) | "
                     f"{r['median_peak_rss_mib']:.0f} ({r['min_peak_rss_mib']:.0f} / {r['max_peak_rss_mib']:.0f}) | "
                     f"{r['peak_rss_mib_vs_full']:.2f} | {r['median_step_s']:.1f} ({r['min_step_s']:.1f} / "
                     f"{r['max_step_s']:.1f}) | {r['median_step_cpu_s']:.1f} ({r['min_step_cpu_s']:.1f} / "
                     f"{r['max_step_cpu_s']:.1f}) | {r['step_cpu_s_vs_full']:.2f} | {r['median_wall_s']:.0f} / "
                     f"{r['median_cpu_s']:.0f} |")
    return "\n".join(lines)


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", help="output folder (default: a new temporary folder, kept)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of (full, LoRA) (default 3)")
    ap.add_argument("--steps", type=int, default=3, help=f"optimizer steps of {BATCH} pairs per run (default 3)")
    ap.add_argument("--tree", default=ROOT, help="the repository copy whose train.py runs (default: this one)")
    ap.add_argument("--tree-commit", help="with --tree: the commit that copy was exported from, for the results "
                    "(meta.commit is this repository's HEAD, which is not what ran)")
    ap.add_argument("--train-overrides", default="", metavar="'K=V K=V'", help="extra train.py overrides, both variants")
    ap.add_argument("--env", action="append", default=[], metavar="K=V",
                    help="extra environment of the children, e.g. MALLOC_MMAP_THRESHOLD_=1048576 (repeatable)")
    args = ap.parse_args(argv)
    args.out, args.tree = os.path.abspath(args.out or tempfile.mkdtemp(prefix="bench-lora-")), os.path.abspath(args.tree)
    return args


def main(argv=None):
    args = parse_args(argv)
    args.config = workload.write(args.out, dtype="float32")["dpo"]  # float32: see workload.native_bf16
    os.makedirs(os.path.join(args.out, "logs"), exist_ok=True)
    counts = parameter_counts()
    tokens = step_tokens(args.tree, args.config, DATA + args.train_overrides.split(), args.steps)
    print(f"folder {args.out}; model {counts['full']['params']:,} params, adapter {counts['lora']['trainable']:,}; "
          f"non-pad tokens per step {tokens}", flush=True)
    results = {"meta": {**bench_run.meta(args, "float32"), "model": MODEL, "lora": LORA, "batch": BATCH,
                        "micro_batches": MICRO_BATCHES, "data": DATA, "measured_tree": args.tree,
                        "measured_commit": args.tree_commit if args.tree != ROOT else "meta.commit"},
               "step_tokens": tokens, "runs": []}
    path = os.path.join(args.out, "lora-results.json")
    run_child([sys.executable, "-c", "import train, transformers, peft"], args.tree,  # warm the disk cache, unmeasured
              os.path.join(args.out, "logs", "warmup"), os.path.join(args.out, "cache", "warmup"), {}, os.devnull)
    for round_ in range(1, args.rounds + 1):
        for variant in VARIANTS:
            record = run_variant(variant, round_, args, tokens)
            results["runs"].append(record)
            with open(path, "w") as f:
                json.dump(results, f, indent=1)
            if record["returncode"] != 0:
                return 1
            print(f"round {round_} {variant}: {record['peak_rss_mib']:.0f} MiB, wall {record['wall_s']:.0f} s, "
                  f"CPU {record['cpu_s']:.0f} s, steps {', '.join(f'{s:.1f}' for s in record['step_s'])} s wall, "
                  f"{', '.join(f'{s:.1f}' for s in record['step_cpu_s'])} s CPU", flush=True)
    results["summary"] = summarize(results["runs"], counts)
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    print("\n" + table(results["summary"]) + f"\n\nraw numbers: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
