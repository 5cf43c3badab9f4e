"""Benchmark train.py (packing on / off) against the hand-written padded loop (bench/bare_loop.py), SFT and DPO.

    python bench/run.py [--repeats 3] [--only sft|dpo] [--out DIR] [--variants packing,nopacking,nosharing,bare]
                        [--shape default|multiturn] [--commit REV | --tree DIR]

Writes the synthetic workload (bench/workload.py) into DIR (default: a new temporary folder, kept), then per task
runs the variants as child processes, alternating (A B C A B C ...) for --repeats rounds, each with one thread.
Per child: whole-process wall time (start-up, tokenization, training and the final save included) and the child's
own peak RSS (ru_maxrss from os.wait4). Prints one markdown table per task and writes every raw number to
DIR/results.json. A child that fails stops the benchmark with its stderr tail and a non-zero exit code.
Before each child it waits (up to --max-wait s) while a pytest process runs or other jobs keep more than --max-busy
CPUs busy (bench/grpo.py's wait_for_quiet); what it found is recorded with each run. The workload options
(--shape, --vocab-size, ...) are bench/workload.py's. The project measured is this checkout, or with --commit a
`git archive` export of that commit (other sessions' uncommitted edits then are not what gets measured), or --tree.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import workload  # noqa: E402
from grpo import export, wait_for_quiet  # noqa: E402

# name -> (label in the table, script, extra arguments after CONFIG). "train" (no packing key) is for a train.py
# that does not know `packing` yet; the default set is the three the goals are about.
VARIANTS = {
    "packing": ("train.py packing=true", "train.py", ["--overrides", "packing=true", "overwrite=true"]),
    "nopacking": ("train.py packing=false", "train.py", ["--overrides", "packing=false", "overwrite=true"]),
    "nosharing": ("train.py packing=true prefix_sharing=false", "train.py",
                  ["--overrides", "packing=true", "prefix_sharing=false", "overwrite=true"]),
    "train": ("train.py (default)", "train.py", ["--overrides", "overwrite=true"]),
    "bare": ("bare loop", os.path.join("bench", "bare_loop.py"), ["--overrides"]),
}
DEFAULT_VARIANTS = "packing,nopacking,bare"
# One thread (the second vCPU is not reliably available: see the README), no network, no WandB, no tokenizer threads.
CHILD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
             "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "PYTHONHASHSEED": "0"}


def run_child(cmd, log_base, cache_dir, cwd=ROOT):
    """Run cmd from the repository root (or cwd); -> (wall seconds, peak RSS MiB, exit code). stdout/stderr go to files
    (no pipes: a full pipe would stall the child and distort its time). Every child gets its own empty cache folder,
    so nothing one run caches (e.g. precomputed reference log-probs) makes a later run look faster."""
    # matplotlib keeps its font cache under XDG_CACHE_HOME too: point it at one shared, warmed folder instead, or
    # every train.py run (which plots its loss curve) would pay for rebuilding it
    env = {**os.environ, **CHILD_ENV, "XDG_CACHE_HOME": cache_dir,
           "MPLCONFIGDIR": os.path.join(os.path.dirname(cache_dir), "matplotlib")}
    with open(log_base + ".out", "w") as out, open(log_base + ".err", "w") as err:
        start = time.perf_counter()
        child = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=err)
        _, status, usage = os.wait4(child.pid, 0)  # this child's own rusage (Popen.wait would not give it)
        wall = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)  # reaped here: tell Popen so it does not wait again
    return wall, usage.ru_maxrss / 1024, child.returncode  # ru_maxrss is in KiB on Linux


def tail(path, lines=30):
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-lines:])


def final_loss(variant, run_dir, log_base):
    """The last optimizer step's training loss: the bare loop prints it; train.py logs it to metrics.jsonl."""
    try:
        if variant == "bare":
            with open(log_base + ".out") as f:
                return json.loads(f.read().strip().splitlines()[-1])
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            train_lines = [json.loads(line) for line in f if line.strip()]
        return {"final_loss": [m for m in train_lines if "loss" in m][-1]["loss"]}
    except (OSError, ValueError, IndexError, KeyError):
        return {}


def summarize(runs, nonpad, variants):
    rows = {}
    for v in variants:
        mine = [r for r in runs if r["variant"] == v]
        if mine:
            walls, rss = [r["wall_s"] for r in mine], [r["peak_rss_mib"] for r in mine]
            rows[v] = {"median_wall_s": statistics.median(walls), "min_wall_s": min(walls), "max_wall_s": max(walls),
                       "median_peak_rss_mib": statistics.median(rss), "max_peak_rss_mib": max(rss),
                       "nonpad_tokens_per_s": nonpad / statistics.median(walls),
                       "final_loss": statistics.median(r["final_loss"] for r in mine if r.get("final_loss") is not None)
                       if any(r.get("final_loss") is not None for r in mine) else None}
    base = rows.get("bare")
    for row in rows.values():
        row["wall_vs_bare"] = row["median_wall_s"] / base["median_wall_s"] if base else None
        row["rss_vs_bare"] = row["median_peak_rss_mib"] / base["median_peak_rss_mib"] if base else None
    return rows


def table(task, info, rows):
    fmt = lambda x, spec: "-" if x is None else format(x, spec)  # noqa: E731
    lines = [f"### {task}: {info['examples']} examples, {info['nonpad_tokens']} non-pad tokens "
             f"({info['padding_share']:.0%} of padded positions are padding), {info['repeats']} alternating rounds",
             "", "| variant | median wall s | min / max s | non-pad tok/s | peak RSS MiB | wall vs bare | RSS vs bare "
             "| final loss |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for v, r in rows.items():
        lines.append(f"| {VARIANTS[v][0]} | {r['median_wall_s']:.1f} | {r['min_wall_s']:.1f} / {r['max_wall_s']:.1f} | "
                     f"{r['nonpad_tokens_per_s']:.0f} | {r['median_peak_rss_mib']:.0f} | {fmt(r['wall_vs_bare'], '.2f')} | "
                     f"{fmt(r['rss_vs_bare'], '.2f')} | {fmt(r['final_loss'], '.4f')} |")
    return "\n".join(lines)


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        return platform.processor() or platform.machine()


def git_in(folder, *a):
    try:
        return subprocess.run(["git", *a], cwd=folder, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def meta(args, dtype):
    git = lambda *a: git_in(ROOT, *a)  # noqa: E731
    import torch
    import transformers
    return {"args": vars(args), "dtype": dtype, "native_bf16": workload.native_bf16(), "cpu": cpu_model(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "commit": git("rev-parse", "HEAD"),
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no")), "env": CHILD_ENV,
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3, help="alternating rounds per task (default 3)")
    ap.add_argument("--only", choices=("sft", "dpo"), help="one task only")
    ap.add_argument("--out", help="output folder (default: a new temporary folder, kept)")
    ap.add_argument("--variants", default=DEFAULT_VARIANTS,
                    help=f"comma-separated, in running order, from {', '.join(VARIANTS)} (default {DEFAULT_VARIANTS})")
    workload.add_shape_options(ap)
    ap.add_argument("--train-overrides", default="", metavar="'K=V K=V'",
                    help="extra overrides for the train.py variants only, e.g. 'precompute_reference_logps=true'")
    ap.add_argument("--no-warmup", action="store_true", help="skip the unmeasured import run that warms the disk cache")
    ap.add_argument("--commit", help="measure this commit, exported with git archive into OUT/tree (default: this "
                    "checkout as it is)")
    ap.add_argument("--tree", help="measure this copy of the project instead of this checkout")
    ap.add_argument("--max-wait", type=float, default=1200, help="longest wait for a quiet machine (s) per child")
    ap.add_argument("--max-busy", type=float, default=0.3, help="CPUs other jobs may keep busy before a child starts")
    args = ap.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown or not args.variants or args.repeats < 1:
        ap.error(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}" if unknown else
                 "need at least one variant and --repeats >= 1")
    return args


def run_task(task, config, args, out, tree, entry, save):
    """--repeats alternating rounds of the variants on one task; -> 0, or 1 when a child failed."""
    logs, info = os.path.join(out, "logs"), entry["workload"]
    for round_ in range(1, args.repeats + 1):
        for v in args.variants:
            label, script, extra = VARIANTS[v]
            run_dir = os.path.join(out, "runs", f"{task}-{v}")
            cmd = [sys.executable, script, config, *extra, f"output_dirs={run_dir}",
                   *(args.train_overrides.split() if script == "train.py" else [])]
            log_base = os.path.join(logs, f"{task}-{v}-{round_}")
            machine = wait_for_quiet(args.max_wait, args.max_busy)
            wall, rss, code = run_child(cmd, log_base, os.path.join(out, "cache", f"{task}-{v}-{round_}"), tree)
            run = {"variant": v, "round": round_, "wall_s": wall, "peak_rss_mib": rss, "returncode": code,
                   "cmd": cmd, "machine": machine, **final_loss(v, run_dir, log_base)}
            entry["runs"].append(run)
            save()
            print(f"{task} round {round_} {label}: {wall:.1f} s, {rss:.0f} MiB, exit {code} (other jobs "
                  f"{machine['busy_cpus']:.2f} CPUs)", flush=True)
            if code != 0:
                print(f"error: {label} failed on {task} (exit {code}): {' '.join(cmd)}\n--- stderr tail "
                      f"({log_base}.err) ---\n{tail(log_base + '.err')}", file=sys.stderr)
                return 1
            if v == "bare" and run.get("nonpad_tokens") not in (None, info["nonpad_tokens"]):
                print(f"warning: the bare loop counted {run['nonpad_tokens']} non-pad tokens, the workload "
                      f"{info['nonpad_tokens']}", file=sys.stderr)
    return 0


def main(argv=None):
    args = parse_args(argv)
    out = os.path.abspath(args.out or tempfile.mkdtemp(prefix="bench-"))
    tree = os.path.abspath(args.tree) if args.tree else export(args.commit, os.path.join(out, "tree")) \
        if args.commit else ROOT
    configs = workload.write(out, **workload.shape_args(args))
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    results = {"meta": meta(args, workload.pick_dtype(args.dtype)), "tasks": {}}
    results["meta"].update(tree=tree, tree_commit=git_in(ROOT, "rev-parse", args.commit) if args.commit else None)
    print(f"benchmark folder: {out} (shape {args.shape}, dtype {results['meta']['dtype']}, variants "
          f"{', '.join(args.variants)}, {args.repeats} rounds, project {tree})", flush=True)

    def save():
        with open(os.path.join(out, "results.json"), "w") as f:
            json.dump(results, f, indent=1)

    if not args.no_warmup:  # first-touch of torch/transformers files would otherwise be charged to round 1's first run
        run_child([sys.executable, "-c", "import train, transformers, matplotlib.pyplot; "
                   "from transformers import LlamaForCausalLM; from torch.utils.tensorboard import SummaryWriter"],
                  os.path.join(out, "logs", "warmup"), os.path.join(out, "cache", "warmup"), tree)
    tables = []
    for task in (args.only,) if args.only else ("sft", "dpo"):
        info = workload.token_stats(configs[task])  # the same non-pad token count for every variant
        info["repeats"] = args.repeats
        entry = results["tasks"][task] = {"workload": info, "runs": [], "summary": {}}
        if run_task(task, configs[task], args, out, tree, entry, save):
            return 1
        entry["summary"] = summarize(entry["runs"], info["nonpad_tokens"], args.variants)
        save()
        tables.append(table(task, info, entry["summary"]))
        print("\n" + tables[-1] + "\n", flush=True)
    print("## Summary\n\n" + "\n\n".join(tables))
    print(f"\nraw numbers: {os.path.join(out, 'results.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
