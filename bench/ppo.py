"""PPO (loss.name: ppo) against TRL's PPOTrainer on a tiny CPU workload, as child processes taking turns; our step split
into generation, reward, log-probs, critic and update; our GRPO on the same prompts for scale.

    python bench/ppo.py --trl-path DIR [--out DIR] [--steps 20] [--repeats 2] [--threads 1]

TRL removed PPO in 2026 (huggingface/trl#7020; the 1.16 wheel has none): the last release with it,
trl.experimental.ppo of trl 1.12.0, is installed beside the project's packages with
`pip install --no-deps --target DIR trl==1.12.0` and put first on the TRL child's path (--trl-path DIR; without it the
TRL runs are skipped). The workload is example/tiny-ppo.yml's: its tiny Llama (from_config, seed 0) saved once as a
float32 folder both load; the tiny reward model of example/tiny-reward-model.yml (trained once into DIR/rm) as the
reward and as the critic's (TRL: value model's) start; the prompts of example/data/dpo_demo.json as the project
tokenizes them; 64 prompts x 1 completion a step, at most 12 new tokens, temperature 1, k1 KL coefficient 0.05, clip
0.2, value clip 0.2, vf_coef 0.1, gamma 1, lam 0.95, one PPO epoch in one mini-batch, AdamW lr 3e-3 constant for policy
and critic, clipping at 1.0. GRPO: 16 prompts x 4 completions, beta 0.05, no critic. Per run: whole-process wall time
and peak RSS (os.wait4), milliseconds per optimizer step (step 1 left out) and, for ours, its phases (the objective's
generate, score, token_logps, critic_values; the update: accumulate + clip + optimizer steps). Writes DIR/results.json
and prints a markdown table.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)
PHASES = ("generation", "reward", "logps", "critic", "update")
SETTINGS = {"prompts": 64, "max_new_tokens": 12, "beta": 0.05, "lr": 3e-3}


def overrides(method, model, rm, steps, run_dir):
    s = SETTINGS
    common = [f"model.name_or_path={model}", "model.from_config=null", "model.tokenizer_name_or_path=example/tokenizer",
              "n_eval_examples=0", "do_first_eval=false", "print_log_step=1", "report_to_tensorboard=false",
              "debug=true", "overwrite=true", f"output_dirs={run_dir}", f"rewards=[{{model: {rm}}}]",
              f"loss.beta={s['beta']}", f"lr={s['lr']}", f"rollout.max_new_tokens={s['max_new_tokens']}"]
    if method == "ppo":
        return common + ["loss.name=ppo", f"critic.name_or_path={rm}", f"total_batch_size={s['prompts']}",
                         "rollout.num_generations=1", f"n_examples={s['prompts'] * steps}"]
    return common + ["loss.name=grpo", "total_batch_size=16", "rollout.num_generations=4", f"n_examples={16 * steps}"]


def run_ours(args):
    """train.py in this process, its trainer's phases timed (grpo_child.instrument)."""
    import train
    from grpo_child import Steps, instrument
    steps, build = Steps(), train.build_trainer
    train.build_trainer = lambda cfg: instrument(build(cfg), steps)
    code = train.cli(["example/tiny-ppo.yml", "--overrides",
                      *overrides(args.child, args.model, args.rm, args.steps, args.run_dir)])
    steps.save(args.json, returncode=code)
    return code


def run_trl(args):
    """TRL's PPOTrainer on the same model, reward model, prompts and settings; a callback closes each step's row."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    import models
    import train
    from config import load_config
    from grpo_child import Steps
    cfg = load_config("example/tiny-ppo.yml", overrides("ppo", args.model, args.rm, args.steps, args.run_dir))
    tokenizer = models.build_tokenizer(cfg)
    prompts = [ex["prompt_input_ids"] for ex in train.build_data(cfg, tokenizer)[0]]
    s, steps = SETTINGS, Steps()

    class StepEnd(TrainerCallback):
        def on_step_end(self, *_, **__):
            steps.step_end()
    config = PPOConfig(
        output_dir=args.run_dir, per_device_train_batch_size=s["prompts"], gradient_accumulation_steps=1,
        num_mini_batches=1, num_ppo_epochs=1, total_episodes=s["prompts"] * args.steps,
        local_rollout_forward_batch_size=s["prompts"], response_length=s["max_new_tokens"], temperature=1.0,
        stop_token="eos", kl_coef=s["beta"], kl_estimator="k1", cliprange=0.2, vf_coef=0.1, cliprange_value=0.2,
        gamma=1.0, lam=0.95, whiten_rewards=False, learning_rate=s["lr"], lr_scheduler_type="constant",
        max_grad_norm=1.0, num_sample_generations=0, report_to=[], save_strategy="no", use_cpu=True, seed=0,
        logging_steps=1, dataloader_num_workers=0)
    policy = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    trainer = PPOTrainer(args=config, processing_class=tokenizer, model=policy,
                         ref_model=AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32),
                         reward_model=AutoModelForSequenceClassification.from_pretrained(args.rm, dtype=torch.float32),
                         value_model=AutoModelForSequenceClassification.from_pretrained(args.rm, dtype=torch.float32),
                         train_dataset=Dataset.from_dict({"input_ids": prompts}), callbacks=[StepEnd()])
    steps.step_begin()
    trainer.train()
    steps.save(args.json, returncode=0)
    return 0


def run_child(cmd, threads, extra_path=None):
    """(wall seconds, peak RSS in MiB) of one child process."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TRL_EXPERIMENTAL_SILENCE": "1"}
    if extra_path:
        env["PYTHONPATH"] = os.pathsep.join([extra_path, env.get("PYTHONPATH", "")])
    start = time.perf_counter()
    child = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(child.pid, 0)
    if status:
        raise SystemExit(f"{' '.join(cmd)} failed: {child.stderr.read()[-2000:]}")
    return time.perf_counter() - start, usage.ru_maxrss / 1024


def summary(result) -> dict:
    rows = result["rows"][1:]  # step 1: one-off warm-up
    out = {"step_ms": 1000 * statistics.mean(r["seconds"] for r in rows)}
    for phase in PHASES:
        out[f"{phase}_ms"] = 1000 * statistics.mean(r.get(phase, 0.0) for r in rows)
    return out


def prepare(out):
    """(model folder, reward model folder) in `out`, made once."""
    model, rm = os.path.join(out, "model"), os.path.join(out, "rm")
    if not os.path.isdir(model):
        subprocess.run([sys.executable, os.path.join(HERE, "grpo_child.py"), "model", "--model", model], check=True,
                       stdout=subprocess.DEVNULL)
    if not os.path.isdir(os.path.join(rm, "final")):
        subprocess.run([sys.executable, "train.py", "example/tiny-reward-model.yml", "--overrides", f"output_dirs={rm}",
                        "report_to_tensorboard=false", "overwrite=true"], check=True, stdout=subprocess.DEVNULL)
    return model, os.path.join(rm, "final")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--trl-path", default=None, help="a folder holding trl 1.12.0 (pip install --target)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    for hidden in ("--child", "--model", "--rm", "--run-dir", "--json"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.chdir(ROOT)
    if args.child:
        import torch
        torch.set_num_threads(args.threads)
        return run_trl(args) if args.child == "trl" else run_ours(args)
    out = os.path.abspath(args.out or tempfile.mkdtemp(prefix="bench-ppo-"))
    os.makedirs(out, exist_ok=True)
    model, rm = prepare(out)
    methods = ["ppo", "grpo"] + (["trl"] if args.trl_path else [])
    results = {m: [] for m in methods}
    for round_ in range(args.repeats):
        for method in methods:
            path = os.path.join(out, f"{method}-{round_}.json")
            cmd = [sys.executable, __file__, "--child", method, "--model", model, "--rm", rm, "--run-dir",
                   os.path.join(out, f"run-{method}"), "--json", path, "--steps", str(args.steps), "--threads",
                   str(args.threads)]
            wall, rss = run_child(cmd, args.threads, args.trl_path if method == "trl" else None)
            with open(path) as f:
                results[method].append({**summary(json.load(f)), "wall_s": wall, "peak_rss_mib": rss})
    table = {m: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for m, runs in results.items()}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"runs": results, "median": table, "steps": args.steps, "threads": args.threads,
                   "settings": SETTINGS}, f, indent=1)
    keys = ["step_ms", *(f"{p}_ms" for p in PHASES), "wall_s", "peak_rss_mib"]
    print("| run | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    names = {"ppo": "ours, ppo", "grpo": "ours, grpo", "trl": "TRL 1.12 PPOTrainer"}
    for method, row in table.items():
        print(f"| {names[method]} | " + " | ".join(f"{row[k]:.0f}" for k in keys) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
