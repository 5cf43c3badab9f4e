"""The trainer: one explicit training loop (`Trainer.train`, `Trainer.train_step`) over a process layout
(layouts.py: `OneDevice` for trainer: BasicTrainer, `FSDPRanks` for FSDPTrainer), made before any model. Global
batches come from a batch source (sources.py); what the loss does around the micro-batches, and the loss of each,
comes from its objective (objectives.py); the reference is a models.*Reference. Gradient accumulation, clipping,
logging (metrics.py), evaluation and checkpoints (checkpoints.py, through `state_dict`) are the same for every loss.
"""
import contextlib
import gc
import math
import os
import signal
import sys
import threading
import time
import warnings

import torch
from torch.distributed.fsdp import FSDPModule
from tqdm import tqdm

import checkpoints
import data
import logprobs
import losses
import models
from flops import model_flop_shape, model_flops, peak_flops
from metrics import MetricsWriter, plot_curves
from objectives import OfflineObjective
from online import OnlineObjective, OnlinePairs
from ppo import CriticObjective
from sources import DatasetSource
from utils import TrainingError, UserError, abort_now, rng_state, set_rng_state


class Trainer:
    """Training over a layout: policy (+ reference), one readable loop in `train`."""

    def __init__(self, cfg, layout, policy, reference, tokenizer, train_data, eval_data, run_dir, critic=None):
        self.cfg, self.layout, self.policy, self.reference, self.tokenizer = cfg, layout, policy, reference, tokenizer
        self.train_data, self.run_dir, self.critic = train_data, run_dir, critic
        self.rank, self.world_size, self.device = layout.rank, layout.world_size, layout.device
        # the row says: completions sampled for a method's own loss (with a critic: PPO), or examples; a pair loss may
        # sample its pairs
        method = losses.LOSSES[cfg.loss.name].online
        self.objective = (CriticObjective(cfg, tokenizer) if method is not None and method.critic else
                          OnlineObjective(cfg, tokenizer) if method is not None else
                          OnlinePairs(cfg, tokenizer) if cfg.loss.online else OfflineObjective(cfg.loss))
        self.source = DatasetSource(train_data, cfg, self.world_size)
        self.compute_dtype = models.DTYPES[cfg.model.policy_dtype]
        self.optimizer = build_optimizer(policy, cfg.optimizer, cfg.lr, cfg.weight_decay, dict(cfg.optimizer_kwargs))
        self.n_train_examples, self.total_steps = self.source.n_examples, self.source.total_steps
        # every process must run the same number of forward passes (sharded weights are gathered collectively), so
        # the eval set is cut to a multiple of world_size, as the source cuts the last global batch
        self.eval_data = eval_data[: len(eval_data) - len(eval_data) % self.world_size]
        self.scheduler = build_scheduler(self.optimizer, cfg.lr_scheduler, cfg.warmup_steps, self.total_steps)
        # PPO's critic: trained beside the policy with its own optimizer and learning rate, on the same schedule
        self.critic_optimizer = self.critic_scheduler = None
        if critic is not None:
            self.critic_optimizer = build_optimizer(critic, cfg.optimizer, cfg.critic.lr or cfg.lr, cfg.weight_decay,
                                                    dict(cfg.optimizer_kwargs))
            self.critic_scheduler = build_scheduler(self.critic_optimizer, cfg.lr_scheduler, cfg.warmup_steps,
                                                    self.total_steps)
        if cfg.warmup_steps > self.total_steps and self.is_main:
            print(f"warning: warmup_steps={cfg.warmup_steps} is longer than the run ({self.total_steps} steps): the "
                  f"learning rate never reaches lr={cfg.lr:g} (its peak is {self.total_steps / (cfg.warmup_steps + 1):.0%} "
                  "of it); lower warmup_steps", file=sys.stderr)
        # fp16 needs loss scaling against underflow; bf16 and fp32 do not (enabled=False makes it a no-op)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.compute_dtype == torch.float16)
        self.step, self.examples_seen, self.nonfinite_streak = 0, 0, 0
        self.wandb_id, self.stop_signal, self.pending_save = None, None, None
        self.flop_shape = model_flop_shape(policy)
        self.peak_flops = peak_flops(self.device, self.compute_dtype)
        if cfg.compile:  # in place (the module keeps its class, so saving is unchanged); shapes vary: dynamic
            for model in (policy, reference.model):
                if model is not None:
                    model.compile(dynamic=True)

    @property
    def is_main(self) -> bool:
        """Only the main process logs, shows the bar and writes files."""
        return self.rank == 0

    def any_process(self, flag: bool) -> bool:
        return self.layout.any_process(flag)

    def state_dict(self) -> dict:
        """The trainer's state beside the weights and the optimizer (which checkpoints.py saves through the layout:
        whole or sharded): counters, schedule, grad scaler, the objective's state, RNG, the WandB run. A new piece of
        training state is added here, once."""
        return {"step": self.step, "examples_seen": self.examples_seen, "nonfinite_streak": self.nonfinite_streak,
                "wandb_id": self.wandb_id, "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "loss_state": self.objective.state_dict(), "rng": rng_state(),
                **({"critic_scheduler": self.critic_scheduler.state_dict()} if self.critic is not None else {})}

    def load_state_dict(self, state):
        self.step, self.examples_seen = state["step"], state["examples_seen"]
        self.nonfinite_streak, self.wandb_id = state["nonfinite_streak"], state["wandb_id"]
        self.scheduler.load_state_dict(state["scheduler"])
        if self.critic is not None:
            self.critic_scheduler.load_state_dict(state["critic_scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if "loss_state" in state:  # absent in checkpoints of earlier versions
            self.objective.load_state_dict(state["loss_state"])
        set_rng_state(state["rng"])

    # ---- helpers -------------------------------------------------------------------------------------------------
    def autocast(self):
        if self.compute_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.compute_dtype)

    def to_batch(self, examples):
        batch = data.collate(examples, self.tokenizer.pad_token_id, packing=self.cfg.packing, max_length=self.cfg.max_length,
                             pad_to_multiple_of=models.length_multiple(self.device, self.policy),
                             prefix_sharing=models.prefix_sharing(self.cfg, self.policy, self.device),
                             segments_only=self.policy.config._attn_implementation == models.VARLEN_ATTN)
        return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    def global_batches(self):
        """The global batches from where the run is (a resumed run: where the checkpoint was)."""
        return self.source.batches(self.examples_seen)

    # ---- one optimizer step --------------------------------------------------------------------------------------
    def train_step(self, examples):
        """One global batch: what the loss needs first (objective.prepare: an online method's rollout), then for each
        of its passes forward/backward over the micro-batches, clip and an optimizer step; the schedule steps once.
        Returns the step's metrics (averaged over the passes), its trained tokens and FLOPs."""
        self.policy.train()
        if self.critic is not None:
            self.critic.train()
        objective = self.objective
        local = self.layout.local_share(examples)
        work = objective.prepare(self, examples, local)  # normalised over the GLOBAL batch: every share weighs right
        totals, tokens, flops = {}, 0, work.flops
        for _ in range(work.passes):
            sums, pass_tokens, pass_flops = self.accumulate(work)
            lr = self.optimizer.param_groups[0]["lr"]
            sums["grad_norm"], taken = self.update(sums)
            if taken:  # the loss's own state follows the steps that were taken
                objective.finish(sums, work)
            for k, v in objective.averages(sums, work).items():
                totals[k] = totals.get(k, 0.0) + v / work.passes
            tokens, flops = tokens + pass_tokens, flops + pass_flops
        # The schedule follows the step count, skipped steps included, on purpose: torch's warning that the scheduler
        # stepped before the optimizer (after a skipped first step) is about a mistake that this is not.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
            for scheduler in (self.scheduler, self.critic_scheduler):
                if scheduler is not None:
                    scheduler.step()
        self.step += 1
        self.examples_seen += len(examples)
        totals.update(work.metrics, lr=lr, examples_seen=self.examples_seen)
        return totals, tokens, flops

    def accumulate(self, work):
        """Forward/backward over this process's micro-batches of a global batch. Returns the metric sums over the
        global batch (one sync for all of them), its trained tokens and FLOPs (all processes)."""
        sums, tokens, flops, starts = {}, 0, 0.0, range(0, len(work.items), work.micro)
        for start in starts:
            for model in (self.policy, self.critic):  # HSDP: gradients cross between replicas once per step, not per
                if isinstance(model, FSDPModule):  # micro-batch (no-op on a 1-D mesh)
                    model.set_requires_all_reduce(start == starts[-1])
            examples_mb, batch = self.objective.micro_batch(self, work.items[start:start + work.micro])
            with self.autocast():
                loss, mb_sums = self.objective.loss(self, batch, work)
            self.scaler.scale(loss).backward()
            for k, v in mb_sums.items():  # kept on the device: no sync per micro-batch, the next one queues at once
                sums[k] = sums.get(k, 0.0) + v.detach()
            mb_tokens, mb_flops = model_flops(self.flop_shape, data.sequences_of(examples_mb),
                                                     with_reference=self.reference.runs_forward)
            tokens, flops = tokens + mb_tokens, flops + mb_flops
        sums = dict(zip(sums, torch.stack(list(sums.values())).tolist()))
        sums = self.layout.reduce_sums({**sums, "tokens": tokens, "flops": flops})  # before deciding on the step: all alike
        return sums, sums.pop("tokens"), sums.pop("flops")

    def update(self, sums):
        """Clip and take the optimizer step (skipped when the loss or gradient is not finite; too many in a row stop
        the run). Returns the gradient norm and whether the step was taken."""
        trained = [(self.policy, self.optimizer)] + ([(self.critic, self.critic_optimizer)] if self.critic else [])
        max_norm = self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else math.inf
        norms = []
        for model, optimizer in trained:  # each model clipped on its own (PPO's critic: as TRL and OpenRLHF)
            self.scaler.unscale_(optimizer)
            norms.append(self.layout.clip_gradients(model, max_norm))
        grad_norm = norms[0]
        if self.critic is not None:
            sums["critic/grad_norm"] = norms[1]
        # fp16: the grad scaler skips steps with inf gradients by itself (that is how it finds its scale)
        finite = math.isfinite(sums["loss"]) and (self.scaler.is_enabled() or all(map(math.isfinite, norms)))
        self.nonfinite_streak = 0 if finite else self.nonfinite_streak + 1
        if finite:
            for _, optimizer in trained:
                self.scaler.step(optimizer)
            self.scaler.update()
        else:
            tqdm.write(f"warning: step {self.step + 1}: non-finite loss or gradient (loss={sums['loss']}, "
                       f"grad_norm={grad_norm}): step skipped ({self.nonfinite_streak} in a row)")
            if self.nonfinite_streak >= self.cfg.max_nonfinite_steps:
                raise TrainingError(f"{self.nonfinite_streak} steps in a row had a non-finite loss or gradient: training "
                                    "diverged (lower lr, check the data, or use bfloat16 instead of float16); the last "
                                    "good checkpoint is kept")
        for _, optimizer in trained:
            optimizer.zero_grad(set_to_none=True)
        return grad_norm, finite

    # ---- evaluation and samples ----------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self):
        """eval/* metrics over the whole eval set (its share on each process), as the objective evaluates."""
        self.policy.eval()
        return self.objective.evaluate(self)

    @torch.no_grad()
    def sample(self, writer):
        """Sample completions of the first eval prompts from the policy (and reference) into samples/step-N.txt.
        A finished reply shows its end-of-turn token; one cut by max_new_tokens ends in "[truncated ...]"."""
        cfg, tok = self.cfg, self.tokenizer
        examples = self.eval_data[: cfg.n_eval_model_samples]
        batch = self.to_batch(examples)
        samplers = {"policy": self.policy, **({"reference": self.reference.model} if self.reference.model else {})}
        rows = [{"prompt": tok.decode(ex["prompt_input_ids"], skip_special_tokens=False)} for ex in examples]
        how = dict(do_sample=True, temperature=cfg.sample_temperature, top_p=cfg.sample_top_p) \
            if cfg.sample_temperature > 0 else dict(do_sample=False)  # temperature 0: greedy
        for name, model in samplers.items():
            model.eval()
            with self.autocast():
                out = model.generate(input_ids=batch["prompt_input_ids"], attention_mask=batch["prompt_attention_mask"],
                                     max_new_tokens=cfg.max_new_tokens, eos_token_id=tok.eos_token_id,
                                     pad_token_id=tok.pad_token_id, **how,
                                     synced_gpus=self.world_size > 1)  # keep stepping until every process is done
            for row, ids in zip(rows, out[:, batch["prompt_input_ids"].shape[1]:].tolist()):
                row[name] = sample_text(tok, ids, cfg.max_new_tokens)
        if not self.is_main:
            return
        os.makedirs(os.path.join(self.run_dir, "samples"), exist_ok=True)
        with open(os.path.join(self.run_dir, "samples", f"step-{self.step:06d}.txt"), "w") as f:
            for row in rows:
                f.write("\n".join(f"### {k}\n{v}" for k, v in row.items()) + "\n\n" + "=" * 80 + "\n\n")
        writer.log_samples(rows, self.step)

    # ---- reference log-probs, once ------------------------------------------------------------------------------
    @torch.no_grad()
    def precompute_reference_logps(self):
        """Reference log-probs of every train and eval example, read from the disk cache or computed once (batched,
        no grad), then the reference model is freed: each training step runs the policy alone. The cache file is
        keyed by the reference weights and the settings that change log-probs; inside it, by each example's tokens."""
        cfg = self.cfg
        examples = self.source.used() + self.eval_data  # only the examples this run trains on
        if not isinstance(self.reference, (models.FrozenReference, models.AdapterOffReference)):  # none, or done
            return
        settings = (cfg.model.reference_dtype or cfg.model.policy_dtype, self.device.type, self.tokenizer.name_or_path,
                    len(self.tokenizer), cfg.max_length, cfg.max_prompt_length)
        path = logprobs.logps_cache_path(cfg.reference_cache_dir, self.reference.fingerprint(settings))
        cache = logprobs.read_logps_cache(path)
        keys = [logprobs.example_key(ex) for ex in examples]
        cached = torch.tensor([k in cache for k in keys], dtype=torch.long, device=self.device)
        cached = self.layout.all_gather(cached).min(0).values.cpu()  # computed where any process lacks it: all agree
        missing = [i for i in range(len(examples)) if not cached[i]]
        if missing:
            values = self.reference_logps_of([examples[i] for i in missing])
            cache.update(zip([keys[i] for i in missing], map(tuple, values.tolist())))
            if self.is_main:
                logprobs.write_logps_cache(path, cache)
        for example, key in zip(examples, keys):
            example["reference_logps"] = cache[key]
        if self.is_main:
            print(f"reference log-probs: {len(examples) - len(missing)} from the cache, {len(missing)} computed ({path})")
        self.reference = models.PrecomputedReference()  # the model's memory goes back to the policy's training
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def reference_logps_of(self, examples):
        """[len(examples), 2] (chosen, rejected) reference log-probs; each process computes a strided share."""
        per_process = math.ceil(len(examples) / self.world_size)
        share = examples[self.rank::self.world_size]
        share += (share or examples)[-1:] * (per_process - len(share))  # equal counts: sharded forwards are collective
        out = []
        for start in tqdm(range(0, per_process, self.cfg.eval_batch_size), desc="reference log-probs", unit="batch",
                          disable=not self.is_main, dynamic_ncols=True):
            chunk = share[start:start + self.cfg.eval_batch_size]
            with self.autocast():
                logps = self.reference.logps(self.to_batch(chunk), 2 * len(chunk))
            out.append(torch.stack([logps[:len(chunk)], logps[len(chunk):]], 1))
        gathered = self.layout.all_gather(torch.cat(out))  # [world, per_process, 2]; process r holds examples r, r + world, ...
        return gathered.transpose(0, 1).reshape(-1, 2)[:len(examples)].cpu()

    # ---- the loop ------------------------------------------------------------------------------------------------
    def train(self):
        """Train to the end, or until SIGTERM/SIGINT: then finish the step, save, and return 'interrupted'."""
        cfg = self.cfg
        resumed = self.step > 0
        writer = MetricsWriter(self.run_dir, cfg, enabled=self.is_main, resume_step=self.step if resumed else None,
                               wandb_id=self.wandb_id)
        self.wandb_id = writer.wandb_id
        # from here on SIGTERM / a first Ctrl-C ends training gracefully, also during precompute, the first eval and
        # the final save (which then finishes: the run is complete)
        with self.stop_on_signals():
            if cfg.precompute_reference_logps:
                self.precompute_reference_logps()
            do_eval = len(self.eval_data) > 0
            if do_eval and cfg.do_first_eval and not resumed:
                self.evaluate_and_log(writer)
            bar = tqdm(total=self.total_steps, initial=self.step, desc=cfg.exp_name, unit="step", dynamic_ncols=True,
                       disable=not self.is_main)
            window_tokens, window_flops, window_start = 0, 0.0, time.perf_counter()
            with bar:  # the bar is closed (its line ended) even when an error stops training
                for examples in self.global_batches():
                    metrics, tokens, flops = self.train_step(examples)
                    window_tokens, window_flops = window_tokens + tokens, window_flops + flops
                    bar.update(1)
                    if self.step % cfg.print_log_step == 0 or self.step == self.total_steps:
                        seconds = time.perf_counter() - window_start
                        metrics["tokens_per_second"] = window_tokens / seconds  # real (non-padding) tokens, all processes
                        if self.peak_flops:
                            metrics["mfu"] = window_flops / seconds / (self.peak_flops * self.world_size)
                        writer.log(metrics, self.step)
                        bar.set_postfix(progress_fields(metrics))
                        window_tokens, window_flops, window_start = 0, 0.0, time.perf_counter()
                    paused = time.perf_counter()
                    if do_eval and (self.step % cfg.eval_every_steps == 0 or self.step == self.total_steps):
                        self.evaluate_and_log(writer)
                    periodic = cfg.save_model_step and self.step % cfg.save_model_step == 0
                    stop = self.any_process(self.stop_signal is not None)
                    if not cfg.debug and self.step < self.total_steps and (periodic or stop):
                        checkpoints.save(self, f"step-{self.step:06d}")
                    checkpoints.finish_save(self, wait=False)  # a checkpoint written in the background: complete it once written
                    # evaluation and saving are not training: neither the tokens/s nor the bar's rate and ETA count them
                    window_start += exclude_from_bar(bar, time.perf_counter() - paused)
                    if stop:
                        self.stop_signal = self.stop_signal or signal.SIGTERM
                        break
            checkpoints.finish_save(self)
            writer.close()
            if self.is_main:
                plot_curves(writer.history, os.path.join(self.run_dir, "loss_curve.png"))
            if self.step < self.total_steps:
                return "interrupted"
            if not cfg.debug:
                path = checkpoints.save(self, "final")
                if self.is_main:
                    print(f"saved final checkpoint to {path}")
        return "finished"

    @contextlib.contextmanager
    def stop_on_signals(self):
        """SIGTERM (preemption) / first Ctrl-C: finish the step, save, stop. A second Ctrl-C aborts at once; a
        repeated SIGTERM changes nothing (the stop is under way)."""
        def request_stop(signum, frame):
            if self.stop_signal is not None:
                if signum == signal.SIGINT:  # exits right here: an exception raised at an arbitrary point of the
                    abort_now(say=self.is_main)  # program (say, inside tqdm's lock setup) could end in a traceback
                return
            self.stop_signal = signum
            if self.is_main:
                tqdm.write(f"{signal.Signals(signum).name}: finishing this step and saving a checkpoint "
                           "(Ctrl-C again aborts at once)")
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {s: signal.signal(s, request_stop) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def evaluate_and_log(self, writer):
        """The objective's evaluation (eval/* metrics) logged and summed up in a line; samples if asked for."""
        metrics = self.evaluate()
        writer.log(metrics, self.step)
        shown = ("eval/loss", "eval/rewards/accuracies", "eval/reward", "eval/pass@1")
        summary = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k in shown)
        if self.is_main:
            tqdm.write(f"step {self.step}: {summary}")
        if self.cfg.sample_during_eval:
            self.objective.sample(self, writer)


def sample_text(tokenizer, ids, max_new_tokens) -> str:
    """A generated reply as text: up to and including its end-of-turn (eos) token, which stays visible, or marked
    as cut when generation stopped at max_new_tokens instead."""
    if tokenizer.eos_token_id in ids:
        ids = ids[:ids.index(tokenizer.eos_token_id)]
        return tokenizer.decode(ids, skip_special_tokens=True) + tokenizer.eos_token
    return tokenizer.decode(ids, skip_special_tokens=True) + f" [truncated at max_new_tokens={max_new_tokens}]"


def progress_fields(metrics) -> dict:
    """What the bar shows: the loss (and an online method's mean reward), training tokens/s (and generated tokens/s),
    MFU where the GPU's peak is known."""
    shown = {"loss": ("loss", ".4f"), "reward": ("reward", ".3f"), "tok_s": ("tokens_per_second", ".0f"),
             "gen_tok_s": ("generation/tokens_per_second", ".0f"), "mfu": ("mfu", ".1%")}
    return {name: format(metrics[key], spec) for name, (key, spec) in shown.items() if key in metrics}


def exclude_from_bar(bar, seconds) -> float:
    """Shift a tqdm bar's clock by `seconds` (time spent on evaluation or saving), so that its rate and ETA
    measure training steps only. Returns `seconds`."""
    if not bar.disable:  # a disabled bar (processes other than the main one) keeps no clock
        bar.start_t += seconds
        bar.last_print_t += seconds
    return seconds


FUSED = ("Adam", "AdamW")  # optimizers whose torch implementation has a fused kernel for CPUs and GPUs


def build_optimizer(model, name, lr, weight_decay, extra):
    """Any torch.optim class by name. Weight decay only on matrices (not on biases and norm gains). Adam and AdamW
    run torch's fused kernel unless optimizer_kwargs choose (`fused` / `foreach`), as transformers' default optimizer
    (adamw_torch_fused) does: one kernel over all parameters instead of a Python loop of small ops, 3.5x faster a step
    on a CPU; the same update up to float32 rounding."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    if name in FUSED and not {"fused", "foreach"} & extra.keys():
        extra = {**extra, "fused": True}
    try:
        return getattr(torch.optim, name)([g for g in groups if g["params"]], lr=lr, **extra)
    except (TypeError, ValueError) as e:  # an unknown argument / a value the optimizer refuses (betas: [2, 3])
        raise UserError(f"config: optimizer_kwargs do not fit torch.optim.{name}: {' '.join(str(e).split())}") from e


def build_scheduler(optimizer, kind, warmup_steps, total_steps):
    """Linear warmup from 0 to lr over warmup_steps, then constant, linear decay to 0, or cosine decay to 0."""
    def multiplier(step):
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0
    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
