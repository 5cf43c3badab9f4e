"""The child processes of bench/grpo.py: the shared model folder, and one GRPO run of this project's train.py or of
TRL's GRPOTrainer on it, timed phase by phase from the outside.

    python bench/grpo_child.py model --model DIR                                  # the tiny Llama, saved once
    python bench/grpo_child.py ours --model DIR --steps N --run-dir DIR --out FILE.json
    python bench/grpo_child.py trl  --model DIR --steps N --run-dir DIR --out FILE.json
    python bench/grpo_child.py generation --model DIR --out FILE.json           # one step's sampling, 4 ways

Neither framework's code is changed: the timers wrap the bound methods of the one trainer instance the process
builds (the project: the copy --tree names, default this checkout). Ours: the objective's generate / score /
token_logps / prepare and the trainer's accumulate + update (the update) and train_step (the step). TRL:
_generate_single_turn, _calculate_rewards, _get_per_token_logps_and_entropies (log-probs only when called without
grad; with grad it is the loss's forward, part of the update), _prepare_inputs, training_step minus _prepare_inputs
plus clip / optimizer step / zero_grad up to on_step_end (the update).
A step's seconds run from one optimizer step's end to the next (the first: from its start), so data loading and
logging between steps count as "other" in both. FILE.json: one row per optimizer step (seconds, per-phase seconds,
completion tokens generated, mean reward), set-up and training seconds of the process, torch threads.
"""
import argparse
import functools
import importlib.util
import json
import os
import sys
import time

STARTED = time.perf_counter()
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import grpo  # noqa: E402  (the shared settings)


class Steps:
    """Phase seconds and counts of the optimizer step under way; step_end() closes its row."""

    def __init__(self):
        self.rows, self.now, self.last_end, self.first_begin = [], {}, None, None

    def add(self, key, value):
        self.now[key] = self.now.get(key, 0.0) + value

    def timed(self, fn, phase, after=None):
        """fn with its seconds added to `phase`; after(result) runs outside the timed part (counts, rewards)."""
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            self.add(phase, time.perf_counter() - start)
            if after is not None:
                after(out)
            return out
        return wrapper

    def step_begin(self):
        if self.last_end is None:
            self.last_end = self.first_begin = time.perf_counter()

    def step_end(self):
        end = time.perf_counter()
        self.rows.append({"seconds": end - self.last_end, **self.now})
        self.now, self.last_end = {}, end

    def save(self, path, **extra):
        import torch
        out = {"rows": self.rows, "setup_s": self.first_begin - STARTED, "train_s": self.last_end - self.first_begin,
               "torch_threads": torch.get_num_threads(), **extra}
        with open(path, "w") as f:
            json.dump(out, f, indent=1)


def mean_reward(values) -> float:
    import torch
    return float(torch.nanmean(values.float()))


def write_model(folder):
    """The tiny Llama of example/tiny-grpo.yml, built as train.py builds it (seed, from_config, example/tokenizer),
    saved as a float32 Hugging Face folder that both frameworks load."""
    from config import load_config
    import models
    import utils
    cfg = load_config(grpo.CONFIG, [])
    tokenizer = models.build_tokenizer(cfg)
    utils.set_seed(cfg.seed)
    model = models.load_policy(cfg, tokenizer)
    model.save_pretrained(folder)
    print(json.dumps({"params": sum(p.numel() for p in model.parameters()), "eos": tokenizer.eos_token_id,
                      "generation_eos": model.generation_config.eos_token_id}))


def instrument(trainer, steps):
    """The trainer with its objective's phases timed into `steps`: generate, score, token_logps, a critic's values
    (PPO), prepare, and the update (accumulate + update); train_step closes each step's row."""
    objective = trainer.objective
    objective.generate = steps.timed(objective.generate, "generation",
                                     lambda out: steps.add("tokens", sum(map(len, out[0]))))
    objective.score = steps.timed(objective.score, "reward", lambda out: steps.add("reward_mean", mean_reward(out[0])))
    objective.token_logps = steps.timed(objective.token_logps, "logps")
    if hasattr(objective, "critic_values"):
        objective.critic_values = steps.timed(objective.critic_values, "critic")
    objective.prepare = steps.timed(objective.prepare, "prepare")
    trainer.accumulate = steps.timed(trainer.accumulate, "update")
    trainer.update = steps.timed(trainer.update, "update")
    train_step = trainer.train_step

    def step(examples):
        steps.step_begin()
        out = train_step(examples)
        steps.step_end()
        return out
    trainer.train_step = step
    return trainer


def run_ours(args):
    """train.py in this process, its trainer instrumented as train.build_trainer returns it."""
    import train
    steps, build = Steps(), train.build_trainer

    train.build_trainer = lambda cfg: instrument(build(cfg), steps)
    code = train.cli([grpo.CONFIG, "--overrides", *grpo.ours_overrides(args.model, args.steps, args.run_dir)])
    with open(os.path.join(args.run_dir, "metrics.jsonl")) as f:
        logged = [json.loads(line) for line in f if line.strip()]
    steps.save(args.out, returncode=code, logged_tokens_per_second=[m.get("generation/tokens_per_second")
                                                                    for m in logged if "loss" in m])
    return code


def trl_config(args):
    from trl import GRPOConfig
    s = grpo.SETTINGS
    return GRPOConfig(
        output_dir=args.run_dir, per_device_train_batch_size=s["prompts_per_step"] * s["num_generations"],
        gradient_accumulation_steps=1, num_generations=s["num_generations"], max_completion_length=s["max_new_tokens"],
        temperature=s["temperature"], top_p=s["top_p"], top_k=0, beta=s["beta"], epsilon=s["epsilon"],
        num_iterations=s["num_iterations"], loss_type="grpo", scale_rewards="group", learning_rate=s["lr"],
        lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=s["max_grad_norm"], weight_decay=0.0,
        optim="adamw_torch", seed=s["seed"], max_steps=args.steps, use_cpu=True, bf16=False, fp16=False,
        gradient_checkpointing=False, use_vllm=False, report_to="none", logging_steps=1, save_strategy="no",
        eval_strategy="no", mask_truncated_completions=False, log_completions=False)


def instrument_trl(trainer, steps):
    """Timers on the TRL trainer instance, and the callback that closes each optimizer step."""
    import torch
    from transformers import TrainerCallback
    trainer._generate_single_turn = steps.timed(trainer._generate_single_turn, "generation",
                                                lambda out: steps.add("tokens", sum(map(len, out[0]))))
    trainer._calculate_rewards = steps.timed(trainer._calculate_rewards, "reward",
                                             lambda out: steps.add("reward_mean", mean_reward(out.sum(1))))
    logps = trainer._get_per_token_logps_and_entropies
    trainer._get_per_token_logps_and_entropies = lambda *a, **k: (  # noqa: E731
        logps(*a, **k) if torch.is_grad_enabled() else steps.timed(logps, "logps")(*a, **k))
    trainer._prepare_inputs = steps.timed(trainer._prepare_inputs, "prepare")
    training_step, marks = trainer.training_step, {}

    def timed_training_step(*args, **kwargs):
        start, prepared = time.perf_counter(), steps.now.get("prepare", 0.0)
        out = training_step(*args, **kwargs)
        marks["end"] = time.perf_counter()
        steps.add("update", marks["end"] - start - (steps.now.get("prepare", 0.0) - prepared))
        return out
    trainer.training_step = timed_training_step

    class StepEnds(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            steps.step_begin()

        def on_step_end(self, args, state, control, **kwargs):
            steps.add("update", time.perf_counter() - marks["end"])  # clip, optimizer step, schedule, zero_grad
            steps.step_end()
    trainer.add_callback(StepEnds())


def run_trl(args):
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOTrainer
    spec = importlib.util.spec_from_file_location("example_rewards", grpo.REWARD_FILE)
    rewards = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rewards)
    with open(grpo.PROMPTS) as f:
        dataset = Dataset.from_list([{"prompt": row["prompt"]} for row in json.load(f)])
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(grpo.TOKENIZER)
    trainer = GRPOTrainer(model=model, reward_funcs=getattr(rewards, grpo.REWARD_NAME), args=trl_config(args),
                          train_dataset=dataset, processing_class=tokenizer)
    steps = Steps()
    instrument_trl(trainer, steps)
    trainer.train()
    logged = [m for m in trainer.state.log_history if "reward" in m]
    steps.save(args.out, returncode=0, logged_step_time=[m.get("step_time") for m in logged],
               logged_reward=[m.get("reward") for m in logged])
    return 0


def check_generation(args):
    """One step's sampling (the first 16 prompts x 8, 12 new tokens) on the saved model, 4 ways, with the --tree's
    rollouts.generate: one call per prompt (how the trainer sampled before a601745), all 128 rows in micro-batches of
    32 (how it samples since, eval_batch_size 32) and in one call, and all rows in one greedy call whose logits
    processor adds Gumbel noise drawn per row from the row's own generator (argmax of logits / T + Gumbel noise is a
    sample of softmax(logits / T): per-row seeds, one call, one draw per row and token).
    Best and median of 5 timed repeats (after one untimed) -> FILE.json."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessor, LogitsProcessorList
    import rollouts
    tokenizer = AutoTokenizer.from_pretrained(grpo.TOKENIZER)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    with open(grpo.PROMPTS) as f:
        prompts = [tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=True,
                                                 return_dict=True)["input_ids"] for row in json.load(f)[:16]]
    s, eos, pad = grpo.SETTINGS, tokenizer.eos_token_id, tokenizer.pad_token_id
    how = dict(num_generations=s["num_generations"], max_new_tokens=s["max_new_tokens"], temperature=s["temperature"],
               top_p=s["top_p"], eos_token_id=eos, pad_token_id=pad)

    class RowGumbel(LogitsProcessor):
        def __init__(self, seeds):
            self.generators = [torch.Generator().manual_seed(seed) for seed in seeds]

        def __call__(self, input_ids, scores):
            u = torch.stack([torch.rand(scores.shape[1], generator=g) for g in self.generators])
            return scores / s["temperature"] - torch.log(-torch.log(u.clamp_min(1e-20)))

    def gumbel():
        ids, mask = rollouts.left_padded([p for p in prompts for _ in range(s["num_generations"])], pad, model.device)
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=s["max_new_tokens"], eos_token_id=[eos],
                           pad_token_id=pad, do_sample=False, num_beams=1, repetition_penalty=1.0,
                           logits_processor=LogitsProcessorList([RowGumbel(range(len(ids)))]))
    ways = {"one call per prompt": lambda: [rollouts.generate(model, [p], seed=i, micro_batch=32, **how)
                                          for i, p in enumerate(prompts)],
            "all rows, micro-batches of 32": lambda: rollouts.generate(model, prompts, seed=0, micro_batch=32, **how),
            "all rows, one call": lambda: rollouts.generate(model, prompts, seed=0, micro_batch=128, **how),
            "all rows, one call, per-row Gumbel": gumbel}
    out = {}
    for name, fn in ways.items():
        fn()
        times = []
        for _ in range(5):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        out[name] = {"best_s": min(times), "median_s": sorted(times)[2]}
        print(f"{name}: best {min(times) * 1000:.0f} ms, median {sorted(times)[2] * 1000:.0f} ms", flush=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=("model", "ours", "trl", "generation"))
    ap.add_argument("--model", required=True, help="the model folder (written by `model`)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--run-dir", help="the run's output folder")
    ap.add_argument("--out", help="the timings' JSON file")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    ap.add_argument("--tree", default=os.path.dirname(HERE), help="the copy of the project to run (default: this one)")
    args = ap.parse_args(argv)
    os.chdir(args.tree)  # the project measured: its modules, and the config's relative paths (example/...)
    sys.path.insert(1, os.path.abspath(args.tree))
    import torch
    torch.set_num_threads(args.threads)
    if args.what == "model":
        return write_model(args.model) or 0
    return {"ours": run_ours, "trl": run_trl, "generation": check_generation}[args.what](args)


if __name__ == "__main__":
    sys.exit(main())
