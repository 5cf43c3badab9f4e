"""What a loss does around the trainer's micro-batches, on the loss's side of the loop.

The trainer (trainers.py) runs the same step for every loss: `prepare` the global batch (its normaliser, what the
loss needs from the whole batch before its first micro-batch, the items this process trains on: a `Work`), then for
each of its passes the micro-batches' losses (each already divided by the global normaliser, so 1 x 8 and 8 x 1
micro-batches give one gradient) and an optimizer step, after which the loss updates its own state (`finish`).
An objective answers each of these for its loss, evaluates it, and keeps the loss's own training state
(checkpointed through `state_dict`). `OfflineObjective` serves the offline rows of the loss table (losses.LOSSES)
over fixed examples; what a row declares beyond its loss function is done here and nowhere else: KTO's reference
point over the batch's mismatched pairs (`batch_kl`), BCO's running mean of the rewards (`running_mean`). The online
methods' objective (rollouts, rewards, advantages) is online.OnlineObjective.
"""
import math
from dataclasses import dataclass, field

import torch

import data
import losses
import models
from flops import model_flops


@dataclass
class Work:
    """A global batch made ready for its micro-batches: what they are divided by (`norm`, global counts), what the
    loss needs from the whole batch (`stats`), this process's items and how many go in a micro-batch, the optimizer
    passes over them, the FLOPs spent preparing them and the metrics that preparing measured (global values)."""
    norm: dict
    items: list
    micro: int
    stats: dict = field(default_factory=dict)
    passes: int = 1
    flops: float = 0.0
    metrics: dict = field(default_factory=dict)


class OfflineObjective:
    """The loss table's losses (SFT, preference pairs, unpaired) on examples of the training data."""

    def __init__(self, loss_cfg):
        self.name, self.spec, self.hp = loss_cfg.name, losses.LOSSES[loss_cfg.name], losses.hyperparameters(loss_cfg)
        self.running = {"reward_mean": 0.0, "reward_count": 1e-24}  # bco_pair's running mean (TRL's start)

    @property
    def unit(self) -> str:
        """What the loss and metrics are averaged over in a global batch ("tokens" or "examples")."""
        return self.spec.unit

    def state_dict(self) -> dict:
        return dict(self.running)

    def load_state_dict(self, state):
        self.running = dict(state)

    def normalizer(self, examples) -> dict:
        """What a global batch's loss and metrics are divided by: its examples, label tokens, chosen label tokens
        (the first of each example's sequences) and desirable examples (unpaired data)."""
        counts = [data.label_count(labels) for _, labels in data.sequences_of(examples)]
        return {"examples": len(examples), "tokens": sum(counts), "chosen_tokens": sum(counts[:len(examples)]),
                "desirable": sum(bool(ex.get("desirable")) for ex in examples)}

    def prepare(self, trainer, examples, local) -> Work:
        """The global batch's normaliser and what the loss needs from all of it before its first micro-batch (the
        same for any split into micro-batches and processes; `local`: this process's share): bco_pair's running
        reward mean (of the steps before this one), KTO's KL estimate over the batch's mismatched pairs, whose
        forward passes (no backward) count in the FLOPs."""
        stats, flops = {"delta": self.running["reward_mean"]} if self.spec.running_mean else {}, 0.0
        if self.spec.batch_kl:
            stats["kl"] = batch_kl(trainer, local)
            flops = model_flops(trainer.flop_shape, data.sequences_of(kl_views(local)),
                                       trainer.reference.runs_forward, backward=False)[1]
        cfg = trainer.cfg
        micro = math.ceil(cfg.total_batch_size / (cfg.gradient_accumulation_steps * trainer.world_size))
        return Work(self.normalizer(examples), local, micro, stats, flops=flops)

    def micro_batch(self, trainer, items):
        """(the examples a micro-batch's loss forwards, their batch on the device)."""
        scored = self.scored(items)
        return scored, trainer.to_batch(scored)

    def scored(self, examples):
        """What a micro-batch's loss forwards: every sequence of the examples, but for a loss with a batch KL (KTO)
        only the completions: their mismatched KL sequences were scored once per global batch (`prepare`)."""
        if not self.spec.batch_kl:
            return examples
        return [{k: v for k, v in ex.items() if not k.startswith("rejected_")} for ex in examples]

    def loss(self, trainer, batch, work):
        """Loss of one micro-batch, already divided by the global batch's normaliser, and metric sums."""
        norm, stats = work.norm, work.stats
        if self.spec.head != "causal_lm":  # a scalar head (reward_model): each reply's score, no log-probs
            scores = models.sequence_scores(trainer.policy, batch)
            return losses.scalar_pairs_loss(self.spec, self.hp, scores, norm, batch.get("margin"))
        logps, seq_ids, logits = models.token_logps(trainer.policy, batch)
        reference_logps = trainer.reference.logps(batch, batch["n_seqs"])
        with torch.no_grad():  # each position's mean logit (TRL's logits/*), a float32 sum
            mean_logits = logits.sum(-1, dtype=torch.float32) / logits.shape[-1]
        extra = {**stats, **{k: batch[k] for k in ("desirable", "pair_weight") if k in batch}}
        return losses.micro_batch_loss(self.spec, self.hp, logps, seq_ids, batch["n_seqs"], reference_logps, norm,
                                       mean_logits, extra)

    def finish(self, sums, work):
        """After a step that was taken: bco_pair's running mean takes this step's mean reward (used from the next
        step on)."""
        if self.spec.running_mean:
            self.running["reward_mean"], self.running["reward_count"] = losses.running_mean_update(
                self.running["reward_mean"], self.running["reward_count"],
                (sums["rewards/chosen"] + sums["rewards/rejected"]) / (2 * work.norm["examples"]))

    def averages(self, sums, work) -> dict:
        """The step's metrics: sums over the global batch divided by what the loss averages over (grad_norm as is)."""
        return {k: v if k == "grad_norm" else v / work.norm[self.unit] for k, v in sums.items()}

    def evaluate(self, trainer) -> dict:
        """eval/* metrics over the whole eval set (its share on each process), normalised as one global batch."""
        local = trainer.layout.local_share(trainer.eval_data)
        work = self.prepare(trainer, trainer.eval_data, local)
        sums, size = {}, trainer.cfg.eval_batch_size
        for start in range(0, len(local), size):
            with trainer.autocast():
                _, mb_sums = self.loss(trainer, trainer.to_batch(self.scored(local[start:start + size])), work)
            for k, v in mb_sums.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        return {f"eval/{k}": v / work.norm[self.unit] for k, v in trainer.layout.reduce_sums(sums).items()}

    def sample(self, trainer, writer):
        """Completions of the first eval prompts from the policy and the reference (Trainer.sample); a scalar head
        (reward_model) writes none: it scores replies and generates nothing."""
        if self.spec.head == "causal_lm":
            trainer.sample(writer)


@torch.no_grad()
def batch_kl(trainer, local) -> float:
    """KTO's reference point z0 = max(0, mean over the global batch of (policy - reference) log-probs of the
    mismatched KL sequences), no grad, micro-batch by micro-batch; every process adds its share."""
    total, micro = 0.0, trainer.cfg.eval_batch_size
    for start in range(0, len(local), micro):
        chunk = local[start:start + micro]
        batch = trainer.to_batch(kl_views(chunk))
        with trainer.autocast():
            policy = models.batch_logps(trainer.policy, batch, len(chunk))
            reference = (torch.tensor([ex["reference_logps"][1] for ex in chunk], device=trainer.device)
                         if "reference_logps" in chunk[0] else trainer.reference.logps(batch, len(chunk)))
        total += float((policy - reference).sum())
    sums = trainer.layout.reduce_sums({"kl": total, "n": len(local)})
    return float(losses.kto_kl(torch.tensor([sums["kl"] / max(sums["n"], 1)]), torch.zeros(1)))


def kl_views(examples):
    """Unpaired (KTO) examples' mismatched KL sequences alone, as single-sequence examples (for data.collate)."""
    return [{"input_ids": ex["rejected_input_ids"], "labels": ex["rejected_labels"],
             "prompt_input_ids": ex["prompt_input_ids"]} for ex in examples]
