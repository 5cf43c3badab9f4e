"""PPO with a critic (loss.name: ppo; rl_losses.ONLINE rows with `critic`): the RLHF step of InstructGPT
(Ouyang et al. 2022) as TRL's and OpenRLHF's PPO do it.

    prompts -> rollout (online.OnlineObjective.roll_out) -> rewards (functions or a reward model)
            -> per-token rewards: -beta k1 (rollout policy vs reference) + the reward at the last token
            -> the critic's values V_t of the state before each completion token (no grad)
            -> GAE (gamma, lam): advantages whitened over the global batch, returns = advantages + V
            -> rollout.num_iterations passes: the policy's clipped loss + vf_coef x the critic's clipped value loss

The critic is a scalar-head model (AutoModelForSequenceClassification, one label) read at every position
(models.head_outputs): by default the policy's initial weights with a new zero head (its values start at 0), or
`critic.name_or_path` (a reward model's final/, as TRL initialises its value model; or a causal LM, given a zero
head). It is always a full model trained with its own optimizer and learning rate (`critic.lr`) on the policy's
schedule, also when the policy trains a LoRA adapter; FSDPTrainer shards it like the policy. The trainer clips and
steps it beside the policy, and checkpoints keep it (its weights and optimizer in training_state.pt or critic_dcp/,
final/critic/ a model that transformers loads). With `loss.kl_target` the KL coefficient adapts (Ziegler et al.
2019); its current value is the objective's state, checkpointed.
"""
import copy
import math

import torch

import adapters
import logprobs
import models
import rl_losses
import rollouts
from objectives import Work
from online import OnlineObjective
from utils import UserError

HEAD = "sequence_classification"


# ---------------------------------------------------------------------------------------------------------------------
# The critic model
# ---------------------------------------------------------------------------------------------------------------------
def initial_critic(cfg, tokenizer, policy, meta=False):
    """The critic before its first step, float32 on the CPU: `critic.name_or_path` with its scalar head (a zero head
    when the checkpoint has none), or (null) the initial `policy`'s own weights under a zero head. meta=True: the
    structure only (filled later from the main process's copy); `policy` may then be a meta model too."""
    from transformers import AutoConfig
    path, key = cfg.critic.name_or_path, "critic.name_or_path"
    if path:
        config = models.disable_dropout(models.from_pretrained(AutoConfig, path, key,
                                                               trust_remote_code=cfg.model.trust_remote_code))
        has_head = any(a.endswith("ForSequenceClassification") for a in config.architectures or [])
        config = models.with_head(config, HEAD)
        if meta:
            with torch.device("meta"):
                critic = models.auto_class(HEAD).from_config(config, dtype=torch.float32)
        else:
            check_critic_tokenizer(path, tokenizer)
            critic = models.from_pretrained(models.auto_class(HEAD), path, key, config=config, dtype=torch.float32,
                                            trust_remote_code=cfg.model.trust_remote_code)
    else:
        base = policy.get_base_model() if cfg.model.lora is not None else policy
        config, has_head = models.with_head(copy.deepcopy(base.config), HEAD), False
        with torch.device("meta") if meta else torch.device("cpu"):
            critic = models.auto_class(HEAD).from_config(config, dtype=torch.float32)
        if not meta:
            copy_backbone(critic, policy, lora=cfg.model.lora is not None)
    if len(tokenizer) > critic.get_input_embeddings().weight.shape[0]:
        raise UserError(f"config: critic.name_or_path: '{path}' has {critic.get_input_embeddings().weight.shape[0]} "
                        f"embeddings but the policy's tokenizer {len(tokenizer)} tokens: the critic must read the "
                        "policy's tokens (use a model of the policy's family, or null for the policy's own weights)")
    if not has_head and not meta:
        torch.nn.init.zeros_(critic.score.weight)  # values start at 0: GAE's first advantages are the rewards'
    critic.config.pad_token_id = tokenizer.pad_token_id
    if cfg.activation_checkpointing:
        critic.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return models.disable_dropout(critic)


def copy_backbone(critic, policy, lora):
    """The policy's transformer (all but its LM head) into the critic's (its plain weights; a LoRA policy's base
    with the adapter, which starts at zero, left out)."""
    state = adapters.base_state(policy.state_dict()) if lora else policy.state_dict()
    prefix = critic.base_model_prefix + "."
    backbone = {k: v for k, v in state.items() if k.startswith(prefix)}
    missing, unexpected = critic.load_state_dict(backbone, strict=False)
    if unexpected or any(k.startswith(prefix) for k in missing):
        raise ValueError(f"the policy's backbone does not fit the critic: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")


def check_critic_tokenizer(path, tokenizer):
    """A one-line error unless the critic's own tokenizer (where its folder has one) is the policy's: the critic
    scores the policy's tokens, position by position."""
    from transformers import AutoTokenizer
    try:
        own = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        return  # no tokenizer of its own: the embedding size is checked by the caller
    if own.get_vocab() != tokenizer.get_vocab():
        raise UserError(f"config: critic.name_or_path: '{path}' has another tokenizer than the policy "
                        f"({len(own)} against {len(tokenizer)} tokens, or other ids): a critic reads the policy's "
                        "tokens; use a critic of the policy's family, or null for the policy's own weights")


def token_values(critic, batch, n_seqs, width):
    """[n_seqs, width] float32: the critic's value of the state before each completion token (the position whose
    next token it is, as the policy's logits), rows as rollouts.completion_rows lays them out."""
    outputs = models.head_outputs(critic, batch)
    keep, _, seq_ids = logprobs.scored_positions(batch["labels"], batch["seq_ids"])
    return rollouts.completion_rows(outputs[keep], seq_ids, n_seqs, width)[0]


# ---------------------------------------------------------------------------------------------------------------------
# The objective
# ---------------------------------------------------------------------------------------------------------------------
class CriticObjective(OnlineObjective):
    """The rollout of the online methods; advantages from a critic (GAE); the policy's clipped loss plus the
    critic's value loss in each micro-batch."""

    def __init__(self, cfg, tokenizer):
        super().__init__(cfg, tokenizer)
        self.loss_cfg = cfg.loss
        self.beta = self.hp["beta"]  # the KL coefficient in the reward; adapted towards loss.kl_target if set

    def state_dict(self) -> dict:
        return {"beta": self.beta}

    def load_state_dict(self, state):
        self.beta = state.get("beta", self.beta)

    def prepare(self, trainer, examples, local) -> Work:
        """Sample and score; the rollout policy's and the reference's token log-probs and the critic's values (no
        grad); GAE; then the KL coefficient's adaptive update (with loss.kl_target) for the next step."""
        G, lc = self.rollout.num_generations, self.loss_cfg
        prompts, completions, truncated, total, per_function, seconds = self.roll_out(trainer, examples, local)
        items, mask, width = self.rollout_items(prompts, completions, truncated)
        reference, old = self.token_logps(trainer, items, width)
        values = self.critic_values(trainer, items, width)
        kl = old - reference if reference is not None else None
        advantages, returns = rl_losses.critic_advantages(self.method, total, values, mask, kl, self.beta, lc.gamma,
                                                          lc.lam, lambda t: self.global_sum(trainer, t))
        metrics, norm = self.rollout_metrics(trainer, total, per_function, completions, truncated, float(mask.sum()), G,
                                             seconds)
        sums = trainer.layout.reduce_sums({
            "kl": float(((kl if kl is not None else torch.zeros_like(mask)) * mask).sum()), "values": float(
                (values * mask).sum()), "returns": float((returns * mask).sum())})
        metrics.update({"kl_coef": self.beta, "critic/values_mean": sums["values"] / max(norm["tokens"], 1),
                        "critic/returns_mean": sums["returns"] / max(norm["tokens"], 1),
                        "kl_sequence": sums["kl"] / norm["sequences"]})
        if lc.kl_target is not None and kl is not None:
            self.beta = rl_losses.adaptive_kl(self.beta, sums["kl"] / norm["sequences"], lc.kl_target, lc.kl_horizon,
                                              int(norm["sequences"]))
        stats = {"mask": mask, "advantages": advantages, "old": old if self.rollout.num_iterations > 1 else None,
                 "reference": reference, "width": width, "values": values, "returns": returns}
        micro = math.ceil(len(items) / trainer.cfg.gradient_accumulation_steps)
        return Work(norm, items, micro, stats, passes=self.rollout.num_iterations, metrics=metrics)

    @torch.no_grad()
    def critic_values(self, trainer, items, width):
        """[N, width] the critic's values of the rollout's completions (no grad), in eval_batch_size chunks."""
        out = []
        for start in range(0, len(items), trainer.cfg.eval_batch_size):
            chunk = items[start:start + trainer.cfg.eval_batch_size]
            with trainer.autocast():
                out.append(token_values(trainer.critic, trainer.to_batch(chunk), len(chunk), width).cpu())
        return torch.cat(out)

    def loss(self, trainer, batch, work):
        """The policy's clipped loss (OnlineObjective.loss) + vf_coef x the critic's clipped value loss; "loss" is
        their sum, "policy_loss" and "value_loss" each."""
        policy_loss, metrics = super().loss(trainer, batch, work)
        stats, rows = work.stats, batch["rollout_index"]
        values = token_values(trainer.critic, batch, len(rows), stats["width"])
        pick = lambda t: t[rows].to(values.device)  # noqa: E731
        value_loss, value_metrics = rl_losses.value_loss(values, pick(stats["values"]), pick(stats["returns"]),
                                                         pick(stats["mask"]), self.loss_cfg.cliprange_value, work.norm)
        loss = policy_loss + self.loss_cfg.vf_coef * value_loss
        metrics = {**metrics, "policy_loss": metrics["loss"], **value_metrics, "loss": loss.detach()}
        return loss, metrics
