"""The online methods' objective (loss.name grpo, dr_grpo, dapo, gspo, rloo, reinforce_pp; losses.LOSSES rows with
`online`): each global batch of prompts becomes a rollout, and the loss trains on it.

    prompts -> rollouts.generate (rollout.num_generations completions each, the weights gathered once under FSDP)
            -> rewards.score (the `rewards:` functions, weighted) -> rl_losses.advantages (the method's estimator)
            -> rollout.num_iterations optimizer passes of rl_losses.micro_batch_loss over the completions

A prompt's completions are sampled on the process that holds the prompt, seeded by (seed, step, the prompt's place in
the global batch): the same completions on one device or many, in any micro-batch split or generation batch, and a
resumed run samples what the uninterrupted one did (the global RNG is left alone). Everything that is normalised over the global batch
(token counts, whitening statistics, reward metrics) is summed over the processes first.
"""
import math
import os
import time

import torch

import logprobs
import losses
import models
import rewards as reward_fns
import rl_losses
import rollouts
from objectives import OfflineObjective, Work
from utils import UserError


def reward_entries(cfg) -> list:
    """The `rewards:` section as rewards.load_rewards takes it: each entry's set keys."""
    return [{k: v for k, v in dict(entry).items() if v is not None} for entry in cfg.rewards]


def check_config(cfg):
    """What an online method needs before any model is loaded: reward functions that load and take TRL's arguments,
    groups of >= 2 completions for a group baseline, and none of the options that apply to fixed examples only."""
    spec = losses.LOSSES[cfg.loss.name]
    if not losses.is_online(cfg.loss):
        return
    name = f"loss.name={cfg.loss.name}" + (" with loss.online=true" if spec.online is None else "")
    if not cfg.rewards:
        raise UserError(f"config: {name} needs rewards, e.g. rewards: [{{function: math}}] or "
                        "[{function: my_rewards.py:my_function}] (docs/online.md)")
    if (spec.online is None or spec.online.groups) and cfg.rollout.num_generations < 2:
        raise UserError(f"config: {name} compares each completion with the others of its prompt: "
                        f"rollout.num_generations must be >= 2, got {cfg.rollout.num_generations}")
    if cfg.rollout.dynamic_sampling and cfg.rollout.num_generations < 2:
        raise UserError(f"config: rollout.dynamic_sampling=true drops groups whose rewards are all equal: it needs "
                        f"rollout.num_generations >= 2, got {cfg.rollout.num_generations}")
    for key in ("packing", "precompute_reference_logps"):
        if cfg[key]:
            raise UserError(f"config: {key}=true does not apply to {name} (its completions are sampled each step); "
                            "set it to false")
    for i, entry in enumerate(cfg.rewards):
        if bool(entry.function) == bool(entry.model):
            raise UserError(f"config: rewards[{i}] needs a function (math | format | overlong | file.py:name) or a "
                            f"model (a reward model's folder or hub id){', not both' if entry.function else ''}")
    reward_fns.load_rewards(reward_entries(cfg))  # a missing file or function, a wrong signature: one line


def rollout_seed(seed, step, index) -> int:
    """The sampling seed of the prompt at `index` of the global batch of step `step` (evaluation: step -1 - k)."""
    return (seed * 1_000_003 + step) * 1_000_033 + index


class OnlineObjective:
    """Rollouts, rewards and advantages before the micro-batches; the method's clipped policy loss in them."""

    def __init__(self, cfg, tokenizer):
        self.spec = losses.LOSSES[cfg.loss.name]
        self.method, self.tokenizer, self.rollout = self.spec.online, tokenizer, cfg.rollout
        self.hp = rl_losses.resolve(self.method, cfg.loss.beta, cfg.loss.epsilon, cfg.loss.epsilon_high) \
            if self.method else {}
        # the loss scores the distribution the completions were sampled from: softmax(logits / temperature), as TRL
        self.temperature = cfg.rollout.temperature if cfg.rollout.temperature > 0 else 1.0
        self.rewards = reward_fns.load_rewards(reward_entries(cfg), device=models.device_type(cfg),
                                               shard=cfg.trainer == "FSDPTrainer" and cfg.fsdp.shard_reference)
        self.shown = []  # the last evaluation's completions, for the samples file

    def state_dict(self) -> dict:
        return {}  # nothing beyond the step: the rollouts' seeds follow from it

    def load_state_dict(self, state):
        pass

    # ---- the rollout -------------------------------------------------------------------------------------------
    def generate(self, trainer, prompts, indices, num_generations, step, temperature):
        """(completions, truncated) of each prompt, num_generations each, in batches of rollout.generation_batch_size
        sequences (null: all of them in one call); each prompt's completions seeded by (seed, step, its index in the
        global batch)."""
        seeds = [rollout_seed(trainer.cfg.seed, step, index) for index in indices]
        batch = self.rollout.generation_batch_size or max(len(prompts) * num_generations, 1)
        with rollouts.gathered(trainer.policy), trainer.autocast():  # gathered: no collective per forward pass
            return rollouts.generate(
                trainer.policy, prompts, num_generations=num_generations, max_new_tokens=self.rollout.max_new_tokens,
                temperature=temperature, top_p=self.rollout.top_p, eos_token_id=self.tokenizer.eos_token_id,
                pad_token_id=self.tokenizer.pad_token_id, seed=seeds, micro_batch=batch,
                synced=False, device=trainer.device)

    def score(self, examples, completions, num_generations):
        """(total [N], per function {name: [N]}) rewards of the completions (token ids) of `examples`, num_generations
        each (rewards.score_records)."""
        texts = [self.tokenizer.decode(ids, skip_special_tokens=True) for ids in completions]
        return reward_fns.score_records(self.rewards, examples, texts, completions, num_generations)

    def roll_out(self, trainer, examples, local):
        """(prompts, completions, truncated, total rewards, per-function rewards, seconds generating) of this
        process's prompts. With rollout.dynamic_sampling (DAPO) a group whose rewards are all equal teaches a group
        baseline nothing: it is dropped, and further rounds draw global batches of prompts at random from the
        training set (seeded by seed, step and round: a resumed run draws the same) until every process has its share
        of groups with a spread, or rollout.max_sampling_rounds rounds (the first included) have run; what is still
        missing is then filled with dropped groups (under a group baseline: no advantage, only a KL term trains)."""
        G, B, share = self.rollout.num_generations, len(examples), len(local)
        kept, dropped, seconds, rounds = [], [], 0.0, 0
        while True:
            if rounds:  # a refill round: every process enters it (the weights are gathered collectively)
                g = torch.Generator().manual_seed(rollout_seed(trainer.cfg.seed, trainer.step, -1 - rounds))
                drawn = torch.randint(len(trainer.train_data), (B,), generator=g).tolist()
                local = trainer.layout.local_share([trainer.train_data[i] for i in drawn])
            indices = [rounds * B + i for i in trainer.layout.local_share(list(range(B)))]
            prompts = [ex["prompt_input_ids"] for ex in local] if len(kept) < share else []
            started = time.perf_counter()
            completions, truncated = self.generate(trainer, prompts, indices, G, trainer.step, self.rollout.temperature)
            seconds += time.perf_counter() - started
            total, per_function = self.score(local[:len(prompts)], completions, G)  # on every process: a sharded
            # reward model's forwards are collective
            flat = rl_losses.reward_std(total, G)[1] if prompts and self.rollout.dynamic_sampling else None
            for i, prompt in enumerate(prompts):
                group = (prompt, completions[i * G:(i + 1) * G], truncated[i * G:(i + 1) * G], total[i * G:(i + 1) * G],
                         {name: values[i * G:(i + 1) * G] for name, values in per_function.items()})
                (dropped if flat is not None and flat[i] else kept).append(group)
            rounds += 1
            missing = trainer.layout.reduce_sums({"missing": max(share - len(kept), 0)})["missing"]
            if not missing or rounds >= self.rollout.max_sampling_rounds:
                break
        groups = (kept + dropped)[:share]
        self.sampling = {"rounds": rounds, "filled": share - min(len(kept), share)}  # for the metrics
        prompts = [g[0] for g in groups]
        completions, truncated = [c for g in groups for c in g[1]], [t for g in groups for t in g[2]]
        total = torch.cat([g[3] for g in groups])
        per_function = {name: torch.cat([g[4][name] for g in groups]) for name in groups[0][4]}
        return prompts, completions, truncated, total, per_function, seconds

    def prepare(self, trainer, examples, local) -> Work:
        """Sample, score and weigh the completions of this process's prompts; the per-token log-probs the loss
        compares against (the rollout policy's, when there is more than one pass or a KL in the reward; the
        reference's when beta > 0), all no grad, before the first micro-batch."""
        G, cfg = self.rollout.num_generations, trainer.cfg
        prompts, completions, truncated, total, per_function, seconds = self.roll_out(trainer, examples, local)
        items, mask, width = self.rollout_items(prompts, completions, truncated)
        reference, old = self.token_logps(trainer, items, width)
        kl = old - reference if reference is not None and old is not None else None
        advantages = rl_losses.advantages(self.method, total, G, mask, kl, self.hp["beta"],
                                          lambda t: self.global_sum(trainer, t))
        if self.rollout.num_iterations == 1:
            old = None  # on-policy: the ratio is 1 with the gradient of the log-probs (as logps.detach())
        metrics, norm = self.rollout_metrics(trainer, total, per_function, completions, truncated, float(mask.sum()), G,
                                             seconds)
        micro = math.ceil(len(items) / cfg.gradient_accumulation_steps)
        stats = {"mask": mask, "advantages": advantages, "old": old, "reference": reference, "width": width}
        return Work(norm, items, micro, stats, passes=self.rollout.num_iterations, metrics=metrics)

    def rollout_items(self, prompts, completions, truncated):
        """(items, mask [N, width], width): the completions as examples (rollouts.as_examples, each with its place in
        the rollout), and the loss tokens (a truncated completion's none with rollout.mask_truncated)."""
        items = rollouts.as_examples(prompts, completions)
        for i, item in enumerate(items):
            item["rollout_index"] = i
        width = max(len(c) for c in completions)
        mask = torch.tensor([[1.0] * len(c) + [0.0] * (width - len(c)) for c in completions])
        if self.rollout.mask_truncated:  # a cut completion has no reward for its ending: no loss either
            mask[torch.tensor(truncated)] = 0.0
        return items, mask, width

    @staticmethod
    def global_sum(trainer, values):
        """A statistics tensor summed over the processes (whitening over the global batch)."""
        return torch.tensor(list(trainer.layout.reduce_sums(dict(enumerate(values.tolist()))).values()),
                            dtype=values.dtype)

    @torch.no_grad()
    def token_logps(self, trainer, items, width):
        """([N, width] reference log-probs or None, [N, width] the rollout policy's or None) of the completions."""
        need_old = self.rollout.num_iterations > 1 or (self.method.kl == "reward" and self.hp["beta"] > 0)
        need_reference = self.hp["beta"] > 0
        if not (need_old or need_reference):
            return None, None
        reference, old = [], []
        for start in range(0, len(items), trainer.cfg.eval_batch_size):
            chunk = items[start:start + trainer.cfg.eval_batch_size]
            batch = trainer.to_batch(chunk)
            seq_ids = logprobs.scored_positions(batch["labels"], batch["seq_ids"])[2]  # each scored token's sequence
            with trainer.autocast():
                if need_reference:
                    values = trainer.reference.token_logps(batch, self.temperature)
                    reference.append(rollouts.completion_rows(values, seq_ids, len(chunk), width)[0].cpu())
                if need_old:
                    values = models.token_logps(trainer.policy, batch, self.temperature)[0]
                    old.append(rollouts.completion_rows(values.float(), seq_ids, len(chunk), width)[0].cpu())
        return (torch.cat(reference) if reference else None), (torch.cat(old) if old else None)

    def rollout_metrics(self, trainer, total, per_function, completions, truncated, loss_tokens, G, seconds):
        """TRL's rollout metrics over the global batch, and the normaliser: completions, loss tokens, the length
        limit (Dr.GRPO's constant)."""
        zero_std = rl_losses.reward_std(total, G)[1] if G > 1 else torch.ones(len(total))
        sums = {**reward_fns.reward_sums(total, per_function), "groups": len(total) / G,
                "zero_std": float(zero_std.float().sum()), "length": sum(map(len, completions)),
                "truncated": sum(truncated), "tokens": loss_tokens, "seconds": seconds,
                "filled": self.sampling["filled"]}
        sums = trainer.layout.reduce_sums(sums)
        metrics = {**reward_fns.reward_metrics(sums), "frac_reward_zero_std": sums["zero_std"] / sums["groups"],
                   "completions/mean_length": sums["length"] / sums["n"],
                   "completions/clipped_ratio": sums["truncated"] / sums["n"],
                   "generation/tokens_per_second": sums["length"] / max(sums["seconds"] / trainer.world_size, 1e-9)}
        if self.rollout.dynamic_sampling:  # rounds: the same on every process; filled: groups with no spread trained
            metrics.update({"dynamic_sampling/rounds": self.sampling["rounds"],
                            "dynamic_sampling/filled_ratio": sums["filled"] / sums["groups"]})
        norm = {"sequences": sums["n"], "tokens": sums["tokens"], "max_new_tokens": self.rollout.max_new_tokens}
        return metrics, norm

    # ---- the micro-batches -------------------------------------------------------------------------------------
    def micro_batch(self, trainer, items):
        batch = trainer.to_batch(items)
        batch["rollout_index"] = torch.tensor([item["rollout_index"] for item in items])
        return items, batch

    def loss(self, trainer, batch, work):
        """The method's loss of one micro-batch of completions (rl_losses.micro_batch_loss), divided by the global
        batch's normaliser, and its metrics' sums."""
        stats, rows = work.stats, batch["rollout_index"]
        values, seq_ids, logits = models.token_logps(trainer.policy, batch, self.temperature)
        logps, _ = rollouts.completion_rows(values, seq_ids, len(rows), stats["width"])
        with torch.no_grad():
            entropy, _ = rollouts.completion_rows(token_entropy(logits), seq_ids, len(rows), stats["width"])
        pick = lambda t: None if t is None else t[rows].to(logps.device)  # noqa: E731
        return rl_losses.micro_batch_loss(self.method, self.hp, logps, pick(stats["old"]), pick(stats["reference"]),
                                          pick(stats["advantages"]), pick(stats["mask"]), work.norm, entropy)

    def finish(self, sums, work):
        pass  # no state of its own

    def averages(self, sums, work) -> dict:
        """rl_losses already divides each micro-batch's metrics by the global counts: the sums are the values."""
        return dict(sums)

    # ---- evaluation --------------------------------------------------------------------------------------------
    def evaluate(self, trainer) -> dict:
        """Mean reward and pass@1 of greedy completions of the eval prompts; with eval_num_generations k > 1 also
        pass@k and mean@k of k sampled ones. A completion passes when its reward is >= 1 (the math reward's
        correct answer)."""
        k = trainer.cfg.eval_num_generations
        local = trainer.layout.local_share(trainer.eval_data)
        indices = trainer.layout.local_share(list(range(len(trainer.eval_data))))
        prompts = [ex["prompt_input_ids"] for ex in local]
        greedy, _ = self.generate(trainer, prompts, indices, 1, -1, temperature=0.0)
        total, _ = self.score(local, greedy, 1)
        sums = {"n": len(local), "reward": float(total.nan_to_num(0.0).sum()), "pass@1": float((total >= 1).sum())}
        if k > 1:
            sampled, _ = self.generate(trainer, prompts, indices, k, -2 - trainer.step, self.rollout.temperature)
            rewards_k = self.score(local, sampled, k)[0].view(len(local), k)
            sums[f"pass@{k}"] = float((rewards_k >= 1).any(1).sum())
            sums[f"mean@{k}"] = float(rewards_k.nan_to_num(0.0).mean(1).sum())
        self.shown = [(self.tokenizer.decode(p, skip_special_tokens=False), self.tokenizer.decode(c), float(r))
                      for p, c, r in zip(prompts, greedy, total)][:trainer.cfg.n_eval_model_samples]
        sums = trainer.layout.reduce_sums(sums)
        return {f"eval/{key}": value / max(sums["n"], 1) for key, value in sums.items() if key != "n"}

    def sample(self, trainer, writer):
        """The last evaluation's greedy completions of the first eval prompts, with their rewards, into
        samples/step-N.txt (and a WandB table)."""
        if not trainer.is_main:
            return
        rows = [{"prompt": p, "policy": c, "reward": f"{r:.4f}"} for p, c, r in self.shown]
        os.makedirs(os.path.join(trainer.run_dir, "samples"), exist_ok=True)
        with open(os.path.join(trainer.run_dir, "samples", f"step-{trainer.step:06d}.txt"), "w") as f:
            for row in rows:
                f.write("\n".join(f"### {k}\n{v}" for k, v in row.items()) + "\n\n" + "=" * 80 + "\n\n")
        writer.log_samples(rows, trainer.step)


class OnlinePairs(OnlineObjective):
    """A pair loss of the table trained on pairs it samples (loss.online: true; TRL's OnlineDPO, for the whole family):
    each prompt's rollout.num_generations completions are scored by the rewards, the best and the worst become the
    pair's chosen and rejected, and the loss's offline objective (its reference, metrics and options) trains on them.
    A group whose best and worst rewards tie has nothing to prefer: its pair stays in the batch with weight 0 (every
    process keeps its share of micro-batches) and is counted (pairs/tied_ratio). Evaluation and samples are the
    online methods' (rewards of greedy completions)."""

    def __init__(self, cfg, tokenizer):
        super().__init__(cfg, tokenizer)
        self.offline = OfflineObjective(cfg.loss)

    def state_dict(self) -> dict:
        return self.offline.state_dict()

    def load_state_dict(self, state):
        self.offline.load_state_dict(state)

    def prepare(self, trainer, examples, local) -> Work:
        G = self.rollout.num_generations
        prompts, completions, truncated, total, per_function, seconds = self.roll_out(trainer, examples, local)
        items = []
        for i, prompt in enumerate(prompts):
            rewards = total[i * G:(i + 1) * G]
            best, worst = int(rewards.nan_to_num(-math.inf).argmax()), int(rewards.nan_to_num(math.inf).argmin())
            tied = not rewards[best] > rewards[worst]  # NaN (nothing scored) ties too
            sides = rollouts.as_examples([prompt], [completions[i * G + best], completions[i * G + worst]])
            items.append({"prompt_input_ids": prompt, "pair_weight": 0.0 if tied else 1.0,
                          **{f"{side}_{key}": example[key] for side, example in zip(("chosen", "rejected"), sides)
                             for key in ("input_ids", "labels")}})
        metrics, _ = self.rollout_metrics(trainer, total, per_function, completions, truncated,
                                          float(sum(map(len, completions))), G, seconds)
        norm = trainer.layout.reduce_sums(self.offline.normalizer([x for x in items if x["pair_weight"]]))
        metrics["pairs/tied_ratio"] = 1 - norm["examples"] / max(len(examples), 1)
        norm["examples"] = max(norm["examples"], 1)  # all tied: a step of zero loss (weight 0 everywhere)
        stats = self.offline.prepare(trainer, items, items).stats  # what the loss needs beside (bco: its mean)
        micro = math.ceil(len(items) / trainer.cfg.gradient_accumulation_steps)
        return Work(norm, items, micro, stats, metrics=metrics)

    def micro_batch(self, trainer, items):
        batch = trainer.to_batch(items)
        batch["pair_weight"] = torch.tensor([x["pair_weight"] for x in items], device=trainer.device)
        return items, batch

    def loss(self, trainer, batch, work):
        return self.offline.loss(trainer, batch, work)

    def finish(self, sums, work):
        self.offline.finish(sums, work)

    def averages(self, sums, work) -> dict:
        return self.offline.averages(sums, work)


def token_entropy(logits):
    """[N] entropy of each scored position's next-token distribution (float32, in chunks: never [N, V] float32)."""
    out = []
    for chunk in logits.split(1024):
        logp = chunk.float().log_softmax(-1)
        out.append(-(logp.exp() * logp).sum(-1))
    return torch.cat(out) if out else logits.new_zeros(0, dtype=torch.float32)
