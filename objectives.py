"""What a loss does around the trainer's micro-batches, on the loss's side of the loop.

The trainer (trainers.py) runs the same step for every loss: the global batch's normaliser, what the loss needs from
the whole batch before its first micro-batch, the micro-batches' losses (each already divided by the global
normaliser, so 1 x 8 and 8 x 1 micro-batches give one gradient), and what the loss updates after a successful step.
An objective answers each of these for its loss and keeps the loss's own training state (checkpointed through
`state_dict`). `OfflineObjective` serves every row of the loss table (losses.LOSSES) over fixed examples; what a row
declares beyond its loss function is done here and nowhere else: KTO's reference point over the batch's mismatched
pairs (`batch_kl`), BCO's running mean of the rewards (`running_mean`).
"""
import torch

import data
import losses
import models


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

    def prepare(self, trainer, local) -> dict:
        """What the loss needs from the whole global batch before its first micro-batch (the same for any split
        into micro-batches and processes; `local`: this process's share): bco_pair's running reward mean (of the
        steps before this one), KTO's KL estimate over the batch's mismatched pairs."""
        stats = {"delta": self.running["reward_mean"]} if self.spec.running_mean else {}
        if self.spec.batch_kl:
            stats["kl"] = batch_kl(trainer, local)
        return stats

    def prepare_flops(self, trainer, local) -> float:
        """The FLOPs of `prepare`'s forward passes (KTO's KL sequences, no backward): they count towards MFU."""
        if not self.spec.batch_kl:
            return 0.0
        return models.model_flops(trainer.flop_shape, data.sequences_of(kl_views(local)),
                                  trainer.reference.runs_forward, backward=False)[1]

    def scored(self, examples):
        """What a micro-batch's loss forwards: every sequence of the examples, but for a loss with a batch KL (KTO)
        only the completions: their mismatched KL sequences were scored once per global batch (`prepare`)."""
        if not self.spec.batch_kl:
            return examples
        return [{k: v for k, v in ex.items() if not k.startswith("rejected_")} for ex in examples]

    def loss(self, trainer, batch, norm, stats):
        """Loss of one micro-batch, already divided by the global batch's normaliser (`norm`), and metric sums."""
        logps, seq_ids, logits = models.token_logps(trainer.policy, batch)
        reference_logps = trainer.reference.logps(batch, batch["n_seqs"])
        with torch.no_grad():  # each position's mean logit (TRL's logits/*), a float32 sum
            mean_logits = logits.sum(-1, dtype=torch.float32) / logits.shape[-1]
        extra = {**stats, **({"desirable": batch["desirable"]} if "desirable" in batch else {})}
        return losses.micro_batch_loss(self.spec, self.hp, logps, seq_ids, batch["n_seqs"], reference_logps, norm,
                                       mean_logits, extra)

    def finish(self, sums, norm):
        """After a step that was taken: bco_pair's running mean takes this step's mean reward (used from the next
        step on)."""
        if self.spec.running_mean:
            self.running["reward_mean"], self.running["reward_count"] = losses.running_mean_update(
                self.running["reward_mean"], self.running["reward_count"],
                (sums["rewards/chosen"] + sums["rewards/rejected"]) / (2 * norm["examples"]))


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
