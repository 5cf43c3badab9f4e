"""PPO (loss.name: ppo) on a tiny CPU workload, its step split into generation, scoring, log-probs, critic and update,
beside GRPO on the same workload (the method a user would pick instead when there is no critic to train).

    python bench/ppo.py [--out DIR] [--steps 20] [--repeats 2] [--threads 1]

TRL (1.16) has no PPO trainer any more (trl.experimental holds online_dpo but no ppo), and OpenRLHF's and verl's need
Ray and GPUs: there is no peer to run beside on a CPU, so the comparison is with our own GRPO step. The workload is
example/tiny-ppo.yml's: the tiny reward model of example/tiny-reward-model.yml (trained once into DIR/rm), the
prompts of example/data/dpo_demo.json, 16 prompts x 4 completions a step, 12 new tokens, AdamW lr 3e-3. PPO: the
reward model as reward and as the critic's start, beta 0.05 (a reference model), one pass. GRPO: the same reward,
beta 0.05 too (so both run a reference), no critic. Children take turns (ppo, grpo, ppo, ...), each timing its steps
with bench/grpo_child.Steps: generation (the objective's generate), reward (score: the reward model's forward),
logps (old and reference log-probs), critic (the critic's values of the rollout, no grad) and update (forward +
backward of policy and critic, clipping and optimizer steps). Step 1 is left out of the means. Writes
DIR/results.json and prints a markdown table.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)
PHASES = ("generation", "reward", "logps", "critic", "update")


def overrides(method, rm, steps, run_dir):
    common = ["n_eval_examples=0", "do_first_eval=false", "print_log_step=1", "report_to_tensorboard=false",
              "debug=true", "overwrite=true", f"output_dirs={run_dir}", f"n_examples={16 * steps}",
              f"rewards=[{{model: {rm}}}]", "loss.beta=0.05", "rollout.num_generations=4"]
    return common + (["loss.name=ppo", f"critic.name_or_path={rm}"] if method == "ppo" else ["loss.name=grpo"])


def child(args):
    """One run in this process, its trainer's phases timed (grpo_child.Steps wraps the bound methods)."""
    import torch
    torch.set_num_threads(args.threads)
    import train
    from grpo_child import Steps, instrument
    steps, build = Steps(), train.build_trainer
    train.build_trainer = lambda cfg: instrument(build(cfg), steps)
    code = train.cli(["example/tiny-ppo.yml", "--overrides", *overrides(args.child, args.rm, args.steps, args.run_dir)])
    steps.save(args.json, returncode=code)
    return code


def summary(rows) -> dict:
    rows = rows[1:]  # step 1: one-off warm-up
    out = {"step_ms": 1000 * statistics.mean(r["seconds"] for r in rows)}
    for phase in PHASES:
        out[f"{phase}_ms"] = 1000 * statistics.mean(r.get(phase, 0.0) for r in rows)
    out["other_ms"] = out["step_ms"] - sum(out[f"{p}_ms"] for p in PHASES)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", choices=("ppo", "grpo"), help=argparse.SUPPRESS)
    parser.add_argument("--rm", help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.chdir(ROOT)
    if args.child:
        return child(args)
    out = os.path.abspath(args.out or tempfile.mkdtemp(prefix="bench-ppo-"))
    os.makedirs(out, exist_ok=True)
    rm = os.path.join(out, "rm")
    if not os.path.isdir(os.path.join(rm, "final")):
        subprocess.run([sys.executable, "train.py", "example/tiny-reward-model.yml", "--overrides", f"output_dirs={rm}",
                        "report_to_tensorboard=false", "overwrite=true"], check=True, stdout=subprocess.DEVNULL)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    results = {"ppo": [], "grpo": []}
    for round_ in range(args.repeats):
        for method in results:
            path = os.path.join(out, f"{method}-{round_}.json")
            subprocess.run([sys.executable, __file__, "--child", method, "--rm", os.path.join(rm, "final"),
                            "--run-dir", os.path.join(out, f"run-{method}"), "--json", path, "--steps",
                            str(args.steps), "--threads", str(args.threads)], check=True, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            with open(path) as f:
                results[method].append(summary(json.load(f)["rows"]))
    table = {m: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for m, runs in results.items()}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"runs": results, "median": table, "steps": args.steps, "threads": args.threads}, f, indent=1)
    keys = ["step_ms", *(f"{p}_ms" for p in PHASES), "other_ms"]
    print("| method | " + " | ".join(k[:-3] + " (ms)" for k in keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for method, row in table.items():
        print(f"| {method} | " + " | ".join(f"{row[k]:.0f}" for k in keys) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
