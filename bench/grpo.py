"""GRPO: this project's train.py against TRL's GRPOTrainer on one tiny CPU workload, as child processes taking turns.

    python bench/grpo.py [--out DIR] [--steps 20] [--repeats 3] [--threads 1] [--tree DIR | --commit REV]

The workload (example/tiny-grpo.yml's): its tiny Llama (from_config, example/tokenizer, seed 0) saved ONCE as a
float32 Hugging Face folder that both load; the prompts of example/data/prompts_demo.json; the reward
example/rewards.py:write_what_is_asked (TRL's signature); 16 prompts x 8 completions per optimizer step in one
micro-batch, at most 12 new tokens, temperature 1, top_p 1, beta 0 (no reference), epsilon 0.2, one pass per rollout,
AdamW lr 3e-3 constant, clipping at 1.0, no evaluation, no checkpoints, no TensorBoard. The children
(bench/grpo_child.py) run ours, TRL, ours, TRL, ... for --repeats rounds, each timing its own steps phase by phase.

Per run: whole-process wall time and peak RSS (os.wait4), and per optimizer step: generation, reward, log-probs
(no-grad scoring: none needed with beta 0 and one pass), update (loss forward + backward + clip + optimizer step) and
the rest. Step 1 (one-off warm-up) is left out of the means. Then, once, one step's sampling timed 4 ways (ours per
prompt, all rows batched, batched with per-row seeds: grpo_child.py check_generation). Before each child it waits
(up to --max-wait seconds) while a pytest process runs or other jobs keep more than --max-busy CPUs busy, so that
another session's test suite does not distort the timings; what it found is recorded with each run. Writes
DIR/results.json and prints the markdown table. The project measured is the commit --commit names (default HEAD),
exported with `git archive` into DIR/tree, so that other sessions' uncommitted edits are not what gets measured (and
cannot change under a running benchmark); --tree runs another copy instead, e.g. `--tree .` this working tree.
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

CONFIG, PROMPTS, TOKENIZER = "example/tiny-grpo.yml", "example/data/prompts_demo.json", "example/tokenizer"
REWARD_FILE, REWARD_NAME = "example/rewards.py", "write_what_is_asked"
SETTINGS = {"prompts_per_step": 16, "num_generations": 8, "max_new_tokens": 12, "temperature": 1.0, "top_p": 1.0,
            "beta": 0.0, "epsilon": 0.2, "num_iterations": 1, "lr": 3e-3, "max_grad_norm": 1.0, "seed": 0}
FRAMEWORKS = {"ours": "train.py (grpo)", "trl": "TRL GRPOTrainer"}
PHASES = ("generation", "reward", "logps", "update")
CHILD_ENV = {"TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1",
             "HF_DATASETS_OFFLINE": "1", "PYTHONHASHSEED": "0", "ACCELERATE_USE_CPU": "1"}


def ours_overrides(model_dir, steps, run_dir):
    """train.py overrides: example/tiny-grpo.yml on the saved folder, `steps` optimizer steps, one metrics row per
    step, no evaluation, no checkpoint (debug), no TensorBoard; the settings above (most are the config's own)."""
    s = SETTINGS
    return [f"model.name_or_path={model_dir}", "model.from_config=null", f"model.tokenizer_name_or_path={TOKENIZER}",
            f"total_batch_size={s['prompts_per_step']}", "gradient_accumulation_steps=1",
            f"n_examples={steps * s['prompts_per_step']}", "n_eval_examples=0", "do_first_eval=false",
            "print_log_step=1", "report_to_tensorboard=false", "debug=true", "overwrite=true", f"output_dirs={run_dir}",
            "loss.name=grpo", f"loss.beta={s['beta']}", f"loss.epsilon={s['epsilon']}", f"lr={s['lr']}",
            "lr_scheduler=constant", "warmup_steps=0", f"max_grad_norm={s['max_grad_norm']}", f"seed={s['seed']}",
            f"rollout.num_generations={s['num_generations']}", f"rollout.max_new_tokens={s['max_new_tokens']}",
            f"rollout.temperature={s['temperature']}", f"rollout.top_p={s['top_p']}",
            f"rollout.num_iterations={s['num_iterations']}", "optimizer=AdamW", "weight_decay=0.0"]


def pytest_running() -> bool:
    """Is a pytest process (another session's test suite) running on this machine?"""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"pytest" in f.read():
                    return True
        except OSError:
            pass
    return False


def busy_cpus(seconds=3.0) -> float:
    """CPUs busy on the machine over `seconds` (/proc/stat): between our children, what other jobs use."""
    def sample():
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        return sum(values), values[3] + values[4]  # total, idle + iowait
    (total0, idle0), _, (total1, idle1) = sample(), time.sleep(seconds), sample()
    return (1 - (idle1 - idle0) / max(total1 - total0, 1)) * (os.cpu_count() or 1)


def wait_for_quiet(max_wait, max_busy) -> dict:
    """Wait (up to max_wait s) while a pytest process runs or other jobs keep more than max_busy CPUs busy; -> what
    the machine was like when the child started."""
    start = time.perf_counter()
    while (pytest_running() or busy_cpus() > max_busy) and time.perf_counter() - start < max_wait:
        time.sleep(20)
    with open("/proc/loadavg") as f:
        load = float(f.read().split()[0])
    return {"waited_s": round(time.perf_counter() - start), "pytest_running": pytest_running(),
            "busy_cpus": round(busy_cpus(), 2), "loadavg_1min": load}


def run_child(cmd, log_base, threads):
    """-> (wall s, peak RSS MiB, exit code) of cmd run from the repository root; output into files."""
    env = {**os.environ, **CHILD_ENV, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with open(log_base + ".out", "w") as out, open(log_base + ".err", "w") as err:
        start = time.perf_counter()
        child = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=err)
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    return wall, usage.ru_maxrss / 1024, child.returncode


def run_summary(timings, wall, rss):
    """One run's numbers: phase means over steps 2..N, generated tokens/s, rewards of the first and last 5 steps."""
    rows = timings["rows"]
    later = rows[1:]
    mean = lambda key: statistics.fmean(r.get(key, 0.0) for r in later)  # noqa: E731
    out = {phase: mean(phase) for phase in PHASES}
    out["step"] = mean("seconds")
    out["other"] = out["step"] - sum(out[p] for p in PHASES)
    out["prepare_other"] = mean("prepare") - out["generation"] - out["reward"] - out["logps"]
    out["first_step"] = rows[0]["seconds"]
    out["tokens_per_s"] = sum(r["tokens"] for r in later) / sum(r["generation"] for r in later)
    out["tokens_per_step"] = mean("tokens")
    out["reward_first5"] = statistics.fmean(r["reward_mean"] for r in rows[:5])
    out["reward_last5"] = statistics.fmean(r["reward_mean"] for r in rows[-5:])
    out.update(wall_s=wall, peak_rss_mib=rss, setup_s=timings["setup_s"], train_s=timings["train_s"])
    return out


def summarize(runs):
    """Median over the rounds of each framework's run numbers, with min / max of step and wall seconds."""
    table = {}
    for name in FRAMEWORKS:
        mine = [r["summary"] for r in runs if r["framework"] == name]
        if mine:
            table[name] = {k: statistics.median(m[k] for m in mine) for k in mine[0]}
            for k in ("step", "wall_s"):
                table[name][k + "_range"] = [min(m[k] for m in mine), max(m[k] for m in mine)]
    if len(table) == 2:
        keys = [*PHASES, "other", "step", "wall_s", "tokens_per_s", "peak_rss_mib"]
        table["ratio"] = {k: table["ours"][k] / table["trl"][k] if table["trl"][k] else None for k in keys}
    return table


def markdown(table, steps, rounds):
    ms = lambda x: f"{1000 * x:.0f}"  # noqa: E731
    lines = [f"{steps} optimizer steps per run, means over steps 2-{steps}, medians of {rounds} alternating rounds; "
             "phases in ms per step",
             "", "| framework | step ms (min / max) | generation | reward | log-probs | update | other | gen tok/s | "
             "wall s (min / max) | peak RSS MiB | reward first 5 / last 5 steps |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, label in FRAMEWORKS.items():
        r = table.get(name)
        if r:
            lines.append(f"| {label} | {ms(r['step'])} ({ms(r['step_range'][0])} / {ms(r['step_range'][1])}) | "
                         + " | ".join(ms(r[p]) for p in (*PHASES, "other"))
                         + f" | {r['tokens_per_s']:.0f} | {r['wall_s']:.1f} ({r['wall_s_range'][0]:.1f} / "
                         f"{r['wall_s_range'][1]:.1f}) | {r['peak_rss_mib']:.0f} | {r['reward_first5']:.3f} / "
                         f"{r['reward_last5']:.3f} |")
    q = table.get("ratio")
    if q:
        fmt = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
        lines.append(f"| ours / TRL | {fmt(q['step'])} | " + " | ".join(fmt(q[p]) for p in (*PHASES, "other"))
                     + f" | {fmt(q['tokens_per_s'])} | {fmt(q['wall_s'])} | {fmt(q['peak_rss_mib'])} | |")
    return "\n".join(lines)


def git(*args) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()


def export(commit, folder) -> str:
    """`git archive COMMIT` unpacked into folder (emptied first): the committed project, nothing uncommitted."""
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    archive = subprocess.run(["git", "archive", commit], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", folder], input=archive, check=True)
    return folder


def meta(args):
    import platform
    code = "import torch, transformers, trl, accelerate as a; print(torch.__version__, transformers.__version__, " \
           "trl.__version__, a.__version__)"
    versions = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.split()
    return {"args": vars(args), "settings": SETTINGS, "python": platform.python_version(),
            "torch_transformers_trl_accelerate": versions, "checkout_commit": git("rev-parse", "HEAD"),
            "checkout_dirty": bool(git("status", "--porcelain", "--untracked-files=no")), "cpu_count": os.cpu_count(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", help="output folder (default: a new temporary folder, kept)")
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps per run (default 20)")
    ap.add_argument("--repeats", type=int, default=3, help="alternating rounds (default 3)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of each child (default 1)")
    ap.add_argument("--commit", default="HEAD", help="the commit to measure, exported into OUT/tree (default HEAD)")
    ap.add_argument("--tree", help="measure this copy of the project instead of an export of --commit")
    ap.add_argument("--only", choices=tuple(FRAMEWORKS), help="one framework only")
    ap.add_argument("--max-wait", type=float, default=1200, help="longest wait for a quiet machine (s) per child")
    ap.add_argument("--max-busy", type=float, default=0.3, help="CPUs other jobs may keep busy before a child starts")
    args = ap.parse_args(argv)
    out = os.path.abspath(args.out or tempfile.mkdtemp(prefix="bench-grpo-"))
    model_dir, logs = os.path.join(out, "model"), os.path.join(out, "logs")
    os.makedirs(logs, exist_ok=True)
    tree = os.path.abspath(args.tree) if args.tree else export(args.commit, os.path.join(out, "tree"))
    child = [sys.executable, os.path.join(HERE, "grpo_child.py"), "--tree", tree]
    if run_child([*child, "model", "--model", model_dir], os.path.join(logs, "model"), args.threads)[2]:
        sys.exit(f"error: writing the model failed: see {logs}/model.err")
    commit = None if args.tree else git("rev-parse", args.commit)
    results = {"meta": {**meta(args), "tree": tree, "tree_commit": commit}, "runs": []}
    print(f"benchmark folder: {out}", flush=True)
    for round_ in range(1, args.repeats + 1):
        for name in [args.only] if args.only else FRAMEWORKS:
            base = os.path.join(logs, f"{name}-{round_}")
            cmd = [*child, name, "--model", model_dir, "--steps", str(args.steps), "--threads", str(args.threads),
                   "--run-dir", os.path.join(out, "runs", name), "--out", base + ".json"]
            machine = wait_for_quiet(args.max_wait, args.max_busy)
            wall, rss, code = run_child(cmd, base, args.threads)
            if code:
                sys.exit(f"error: {' '.join(cmd)} exited {code}: see {base}.err")
            with open(base + ".json") as f:
                timings = json.load(f)
            summary = run_summary(timings, wall, rss)
            results["runs"].append({"framework": name, "round": round_, "cmd": cmd, "machine": machine,
                                    "summary": summary, "timings": timings})
            print(f"round {round_} {name}: wall {wall:.1f} s, step {summary['step'] * 1000:.0f} ms, generation "
                  f"{summary['generation'] * 1000:.0f} ms, {summary['tokens_per_s']:.0f} tok/s, other jobs "
                  f"{machine['busy_cpus']:.2f} CPUs", flush=True)
    results["summary"] = summarize(results["runs"])
    base = os.path.join(logs, "generation")  # one step's sampling, 4 ways (bench/grpo_child.py check_generation)
    results["generation_check"] = {"machine": wait_for_quiet(args.max_wait, args.max_busy)}
    if not run_child([*child, "generation", "--model", model_dir, "--threads", str(args.threads), "--out",
                      base + ".json"], base, args.threads)[2]:
        with open(base + ".json") as f:
            results["generation_check"].update(json.load(f))
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    print("\n" + markdown(results["summary"], args.steps, args.repeats))
    print("\n" + "\n".join(f"generation, {k}: {v['median_s'] * 1000:.0f} ms" for k, v in
                            results["generation_check"].items() if k != "machine"))
    print(f"\nraw numbers: {os.path.join(out, 'results.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
