"""Online RL losses (the GRPO family): advantage estimators, KL estimators, the clipped policy-gradient term, loss
aggregations, and ONLINE: the one table of what each online `loss.name` does.

Pure functions of tensors, like losses.py: no config objects, no models. Shapes: N completions of a rollout, laid
out as TRL does (P prompts x G generations, a prompt's G completions contiguous: rows p*G .. p*G+G-1); T completion
positions; ``mask`` [N, T] is 1 on the completion tokens that get a loss. Rewards are float tensors [N] holding NaN
where no reward could be given ("cannot score": such a completion gets advantage 0 and is left out of every group
and batch statistic). Log-probs are per token, [N, T]: ``logps`` the policy's (with grad), ``old_logps`` the
rollout policy's, ``ref_logps`` the reference's (both without grad).

A step's loss is the sum of its micro-batches' contributions: every aggregator and metric divides by a normaliser of
the WHOLE global batch (``norm``: {"sequences", "tokens", "max_new_tokens"}, counted over all micro-batches of the
optimizer step on all processes), so gradient accumulation 1x8 and 8x1 give the same loss and gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

ZERO_STD_ATOL = 1e-8  # a group whose reward std is at most this has no spread (as TRL: torch.isclose(std, 0))


# ---------------------------------------------------------------------------------------------------------------------
# Advantages. Group estimators take the rewards [N] of P whole groups of G completions and return advantages [N].
# ---------------------------------------------------------------------------------------------------------------------
def _groups(rewards: torch.Tensor, num_generations: int) -> torch.Tensor:
    if rewards.dim() != 1 or rewards.numel() % num_generations:
        raise ValueError(f"rewards must be [P * G] with G = {num_generations}, got shape {tuple(rewards.shape)}")
    return rewards.view(-1, num_generations)


def group_stats(rewards: torch.Tensor, num_generations: int):
    """(mean [P], std [P], count [P]) of each group's SCORED rewards (NaN ones left out).

    std has Bessel's correction, sqrt(sum (r - mean)^2 / (count - 1)), as TRL, OpenRLHF and verl; a group with fewer
    than 2 scored completions has std 0 (TRL's nanstd gives NaN there: either way its advantages are 0).
    """
    grouped = _groups(rewards, num_generations)
    scored = ~torch.isnan(grouped)
    count = scored.sum(1).to(grouped.dtype)
    mean = torch.where(scored, grouped, 0.0).sum(1) / count.clamp(min=1)
    squares = torch.where(scored, grouped - mean[:, None], 0.0).pow(2).sum(1)
    std = torch.where(count > 1, (squares / (count - 1).clamp(min=1)).sqrt(), torch.zeros_like(mean))
    return mean, std, count


def reward_std(rewards: torch.Tensor, num_generations: int):
    """(std [P], zero_std [P] bool): each group's reward std and whether it has no spread (std <= 1e-8, as TRL's
    isclose). The mean of zero_std is TRL's ``frac_reward_zero_std``: the share of groups that teach nothing under
    a group baseline. Groups with fewer than 2 scored completions count as zero-std (TRL: not counted)."""
    _, std, _ = group_stats(rewards, num_generations)
    return std, std <= ZERO_STD_ATOL


def _per_completion(advantages: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
    """Flatten [P, G] advantages to [N], 0 where the reward is NaN (cannot score: no signal, no push)."""
    advantages = advantages.reshape(-1)
    return torch.where(torch.isnan(rewards), torch.zeros_like(advantages), advantages)


def group_zscore(rewards: torch.Tensor, num_generations: int, eps: float = 1e-4) -> torch.Tensor:
    """GRPO's advantage (Shao et al. 2024, DeepSeekMath, arXiv:2402.03300, sec. 4.1.2):

        A_i = (r_i - mean_G r) / (std_G r + eps),   std with Bessel's correction, eps 1e-4 (TRL and the seed)
    """
    mean, std, _ = group_stats(rewards, num_generations)
    grouped = _groups(rewards, num_generations)
    return _per_completion((grouped - mean[:, None]) / (std[:, None] + eps), rewards)


def group_center(rewards: torch.Tensor, num_generations: int) -> torch.Tensor:
    """Dr.GRPO's advantage (Liu et al. 2025, "Understanding R1-Zero-Like Training", arXiv:2503.20783):
    A_i = r_i - mean_G r. No division by the std, which over-weights groups of nearly equal rewards."""
    mean, _, _ = group_stats(rewards, num_generations)
    return _per_completion(_groups(rewards, num_generations) - mean[:, None], rewards)


def leave_one_out(rewards: torch.Tensor, num_generations: int) -> torch.Tensor:
    """RLOO's advantage (Ahmadian et al. 2024, arXiv:2402.14740; Kool et al. 2019): the mean of the OTHER scored
    completions of the group as baseline,

        A_i = r_i - (1 / (G' - 1)) sum_{j != i} r_j = G' / (G' - 1) (r_i - mean_G r),   G' = scored completions

    0 for a group with fewer than 2 scored completions (no baseline).
    """
    mean, _, count = group_stats(rewards, num_generations)
    scale = torch.where(count > 1, count / (count - 1).clamp(min=1), torch.zeros_like(mean))
    return _per_completion(scale[:, None] * (_groups(rewards, num_generations) - mean[:, None]), rewards)


def kl_in_reward(rewards: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """A sequence reward with the KL penalty folded in (RLOO, as TRL): r_i - beta * sum_t m_it k1_it, where
    ``kl`` [N, T] is the rollout's k1 = old_logps - ref_logps. NaN rewards stay NaN."""
    return rewards - beta * (kl * mask).sum(1)


def token_rewards(rewards: torch.Tensor, mask: torch.Tensor, kl: torch.Tensor | None = None, beta: float = 0.0):
    """The per-token rewards of REINFORCE++ and PPO (Ouyang et al. 2022, arXiv:2203.02155; Hu 2025, arXiv:2501.03262):

        r_t = -beta * k1_t  (+ r_i at the sequence's last completion token)

    ``kl`` [N, T]: the rollout's k1 = old_logps - ref_logps (None: no KL shaping). Returns (per-token rewards [N, T],
    scored [N, T]): ``scored`` is ``mask`` on the rows whose reward is a number; rewards are 0 elsewhere, and any
    statistics (whitening) must be taken over ``scored``.
    """
    mask = mask.to(rewards.dtype)
    per_token = torch.zeros_like(mask) if kl is None or not beta else -beta * kl.to(rewards.dtype) * mask
    n_tokens = mask.sum(1)
    last = mask.shape[1] - 1 - mask.flip(1).argmax(1)  # the last completion token of each row
    has_tokens = n_tokens > 0
    rows = torch.arange(len(rewards), device=rewards.device)[has_tokens]
    per_token[rows, last[has_tokens]] += torch.nan_to_num(rewards[has_tokens], nan=0.0)
    scored = mask * (~torch.isnan(rewards)).to(mask.dtype)[:, None]
    return per_token * scored, scored


def token_returns(rewards: torch.Tensor, mask: torch.Tensor, kl: torch.Tensor | None = None, beta: float = 0.0):
    """REINFORCE++'s returns, before the global whitening: G_t = sum_{s >= t} r_s (gamma = 1) of ``token_rewards``.
    Returns (returns [N, T], scored [N, T]) as ``token_rewards``."""
    per_token, scored = token_rewards(rewards, mask, kl, beta)
    return per_token.flip(1).cumsum(1).flip(1) * scored, scored


def gae(per_token: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Generalized advantage estimation (Schulman et al. 2016, arXiv:1506.02438) over each completion's tokens:

        delta_t = r_t + gamma V_{t+1} - V_t,   A_t = delta_t + gamma lam A_{t+1},   returns R_t = A_t + V_t

    with V and A 0 after the last token (the episode ends there). per_token: [N, T] rewards (``token_rewards``);
    values: [N, T] the critic's value of the state before each token (no grad); mask: [N, T], 1 on the tokens (a
    completion's tokens are the first ones of its row). Returns (advantages [N, T], returns [N, T]), 0 off the mask.
    """
    mask = mask.to(values.dtype)
    values = values * mask
    advantages = torch.zeros_like(values)
    following_value, following = values.new_zeros(len(values)), values.new_zeros(len(values))
    for t in reversed(range(values.shape[1])):
        delta = per_token[:, t] + gamma * following_value - values[:, t]
        following = (delta + gamma * lam * following) * mask[:, t]
        following_value = values[:, t]
        advantages[:, t] = following
    return advantages, (advantages + values) * mask


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float, norm: dict):
    """PPO's clipped value loss (as TRL's PPO and verl's compute_value_loss), this micro-batch's share of the global
    token mean:

        L_V = 1/2 sum_t m_t max((V_t - R_t)^2, (clip(V_t, V_old_t - clip, V_old_t + clip) - R_t)^2) / norm["tokens"]

    Returns (loss with grad, {"value_loss", "value_clipfrac" (share of tokens where the clipped term is larger)}).
    """
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    unclipped_sq, clipped_sq = (values - returns).pow(2), (clipped - returns).pow(2)
    loss = 0.5 * token_mean(torch.max(unclipped_sq, clipped_sq), mask, norm)
    clipfrac = token_mean((clipped_sq > unclipped_sq).to(values.dtype), mask, norm)
    return loss, {"value_loss": loss.detach(), "value_clipfrac": clipfrac}


def adaptive_kl(beta: float, kl: float, target: float, horizon: int, n_sequences: int) -> float:
    """The adaptive KL coefficient of Ziegler et al. 2019 (arXiv:1909.08593, sec. 2.2; TRL's and OpenRLHF's
    AdaptiveKLController): beta <- beta (1 + clip(KL / target - 1, -0.2, 0.2) n / horizon), where KL is the
    rollout's mean over sequences of sum_t k1_t and n the number of sequences in it."""
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return beta * (1.0 + error * n_sequences / horizon)


def whiten_stats(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[sum, sum of squares, count] of ``values`` over ``mask`` (float64): additive, so the caller sums them over
    micro-batches and all-reduces them over processes to whiten over the global batch."""
    values, mask = values.double(), mask.double()
    return torch.stack([(values * mask).sum(), (values.pow(2) * mask).sum(), mask.sum()])


def whiten(values: torch.Tensor, mask: torch.Tensor, stats: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mu) / sqrt(var + eps) over the global batch whose ``whiten_stats`` are ``stats``; 0 outside ``mask``.

    var has Bessel's correction and eps is 1e-8, as verl's masked_whiten (REINFORCE++'s reference implementation).
    """
    total, squares, count = stats.double().unbind()
    mean = total / count.clamp(min=1)
    var = (squares - count * mean * mean).clamp(min=0) / (count - 1).clamp(min=1)
    out = (values.double() - mean) * torch.rsqrt(var + eps)
    return (out * mask).to(values.dtype)


def advantages(method, rewards, num_generations, mask, kl=None, beta=0.0, reduce=None):
    """The advantages of a rollout under ``method`` (an ONLINE row): [N] for group estimators, [N, T] for whitened
    token returns.

    Args:
        rewards: [N] combined rewards, NaN = cannot score; num_generations: G.
        mask: [N, T] completion mask; kl: [N, T] the rollout's k1 = old_logps - ref_logps, needed when
            ``method.kl == "reward"`` and beta > 0; beta: the resolved KL coefficient.
        reduce: sums a statistics tensor over the global batch (e.g. an all_reduce over processes); None: this
            rollout is the global batch. Used only by whitened methods.
    """
    reward_kl = kl if method.kl == "reward" and beta else None
    if method.whiten:
        returns, scored = method.advantage(rewards, mask, reward_kl, beta)
        stats = whiten_stats(returns, scored)
        return whiten(returns, scored, stats if reduce is None else reduce(stats))
    if reward_kl is not None:
        rewards = kl_in_reward(rewards, reward_kl, mask, beta)
    return method.advantage(rewards, num_generations)


def critic_advantages(method, rewards, values, mask, kl, beta, gamma, lam, reduce=None):
    """(advantages [N, T], returns [N, T]) of a rollout under a method with a critic (``method.critic``): GAE over
    its per-token rewards (``method.advantage``, the KL folded in when ``method.kl == "reward"``) with the critic's
    ``values`` [N, T]; the advantages whitened over the global batch (``reduce`` as in ``advantages``), the returns
    (the value loss's targets) not."""
    per_token, scored = method.advantage(rewards, mask, kl if method.kl == "reward" and beta else None, beta)
    adv, returns = gae(per_token, values, scored, gamma, lam)
    stats = whiten_stats(adv, scored)
    return whiten(adv, scored, stats if reduce is None else reduce(stats)), returns


# ---------------------------------------------------------------------------------------------------------------------
# KL estimators (Schulman 2020, "Approximating KL Divergence", joschu.net/blog/kl-approx.html) of KL(pi || ref) from
# samples of pi, per token, with d = logps - ref_logps: k1 unbiased but can be negative, k2 and k3 >= 0, k3 unbiased.
# ---------------------------------------------------------------------------------------------------------------------
def k1(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """k1 = d = log pi - log ref."""
    return logps - ref_logps


def k2(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """k2 = d^2 / 2."""
    return 0.5 * (logps - ref_logps).pow(2)


def k3(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """k3 = exp(-d) + d - 1 = ref/pi - log(ref/pi) - 1 (GRPO's KL term, DeepSeekMath eq. 4)."""
    d = ref_logps - logps
    return torch.exp(d) - d - 1.0


# ---------------------------------------------------------------------------------------------------------------------
# Importance ratios, as [N, T] tensors so that one clipped term and one aggregator serve every ratio level. A
# sequence ratio s_i is written per token as s_it = exp(sg[log s_i] + w_i (l_t - sg[l_t])) (sg: stop-gradient):
# value s_i at every token, gradient s_i w_i grad l_t, so that under any aggregation that weights a sequence's tokens
# equally (all of ours) the gradient is that of the sequence ratio itself (GSPO's token variant, arXiv:2507.18071).
# ---------------------------------------------------------------------------------------------------------------------
def token_ratio(logps: torch.Tensor, old_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """PPO's per-token ratio rho_it = pi(o_t) / pi_old(o_t) = exp(l_t - l_old_t). ``mask`` is not needed."""
    return torch.exp(logps - old_logps)


def _sequence_ratio(logps, old_logps, mask, length_normalise):
    mask = mask.to(logps.dtype)
    n_tokens = mask.sum(1, keepdim=True).clamp(min=1)
    log_seq = ((logps - old_logps) * mask).sum(1, keepdim=True)
    weight = 1.0 if length_normalise else n_tokens
    log_seq = log_seq / n_tokens if length_normalise else log_seq
    return torch.exp(log_seq.detach() + weight * (logps - logps.detach()))


def sequence_ratio(logps: torch.Tensor, old_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """GSPO's sequence ratio (Zheng et al. 2025, arXiv:2507.18071), the geometric mean of the token ratios:
    s_i = exp((1/|o_i|) sum_t (l_t - l_old_t)), per token (w_i = 1; see above)."""
    return _sequence_ratio(logps, old_logps, mask, length_normalise=True)


def sequence_sum_ratio(logps: torch.Tensor, old_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The ratio of sequence likelihoods, s_i = pi(o_i) / pi_old(o_i) = exp(sum_t (l_t - l_old_t)): TRL's RLOO
    (on-policy its gradient is REINFORCE's, A_i grad log pi(o_i), as the RLOO paper). Per token with w_i = |o_i|."""
    return _sequence_ratio(logps, old_logps, mask, length_normalise=False)


RATIOS = {"token": token_ratio, "sequence": sequence_ratio, "sequence_sum": sequence_sum_ratio}


def clipped_pg(ratio: torch.Tensor, advantages: torch.Tensor, epsilon: float, epsilon_high: float) -> torch.Tensor:
    """The clipped policy-gradient term per token (PPO, Schulman et al. 2017, arXiv:1707.06347, eq. 7), with DAPO's
    decoupled clip-higher (Yu et al. 2025, arXiv:2503.14476: epsilon_high > epsilon lets rare tokens grow):

        pg_it = -min(rho_it A_it, clip(rho_it, 1 - epsilon, 1 + epsilon_high) A_it)

    advantages: [N, T], or [N, 1] to broadcast one advantage per sequence.
    """
    clipped = torch.clamp(ratio, 1.0 - epsilon, 1.0 + epsilon_high)
    return -torch.min(ratio * advantages, clipped * advantages)


def clip_flags(ratio: torch.Tensor, advantages: torch.Tensor, epsilon: float, epsilon_high: float):
    """(low, high) [N, T] bool: where the clip is active, so the token gets no gradient (TRL's clip_ratio/low_mean
    and high_mean): low = rho < 1 - epsilon with A < 0, high = rho > 1 + epsilon_high with A > 0."""
    return (ratio < 1.0 - epsilon) & (advantages < 0), (ratio > 1.0 + epsilon_high) & (advantages > 0)


# ---------------------------------------------------------------------------------------------------------------------
# Aggregations (verl's loss_agg_mode names). Each returns this micro-batch's share of the global-batch loss: summed
# over the micro-batches and processes of a step it is the loss of the whole batch. values, mask: [N, T].
# ---------------------------------------------------------------------------------------------------------------------
def seq_mean_token_mean(values: torch.Tensor, mask: torch.Tensor, norm: dict) -> torch.Tensor:
    """GRPO's aggregation (DeepSeekMath eq. 3): each sequence's token mean, averaged over sequences,
    sum_i [(1/|o_i|) sum_t m_it x_it] / norm["sequences"]. On a sequence ratio (one value per sequence) it is the
    sequence mean of GSPO and RLOO; an empty completion contributes 0 and still counts."""
    mask = mask.to(values.dtype)
    per_sequence = (values * mask).sum(1) / mask.sum(1).clamp(min=1)
    return per_sequence.sum() / norm["sequences"]


def seq_mean_token_sum_norm(values: torch.Tensor, mask: torch.Tensor, norm: dict) -> torch.Tensor:
    """Dr.GRPO's aggregation (arXiv:2503.20783): sum_i sum_t m_it x_it / (norm["sequences"] *
    norm["max_new_tokens"]): a constant normaliser, so long completions are not down-weighted per token."""
    return (values * mask.to(values.dtype)).sum() / (norm["sequences"] * norm["max_new_tokens"])


def token_mean(values: torch.Tensor, mask: torch.Tensor, norm: dict) -> torch.Tensor:
    """DAPO's token-level policy-gradient loss (arXiv:2503.14476): sum_i sum_t m_it x_it / norm["tokens"], the loss
    tokens of the whole global batch. With DDP, which averages gradients over ranks, scale by the world size."""
    return (values * mask.to(values.dtype)).sum() / norm["tokens"]


# ---------------------------------------------------------------------------------------------------------------------
# The online loss table: what each online `loss.name` does, declared once; `advantages` and `micro_batch_loss`
# read the rows, nothing branches on a method's name. Defaults are the papers' (or TRL's where they differ on a
# knob TRL exposes: see each comment); `loss.beta` / `epsilon` / `epsilon_high` null take them (``resolve``).
# ---------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Online:
    advantage: Callable    # group estimator (rewards [N], G) -> [N]; with whiten, token_returns (-> [N, T], mask)
    ratio: str             # a RATIOS key: "token" | "sequence" (GSPO, geometric mean) | "sequence_sum" (likelihoods)
    aggregate: Callable    # seq_mean_token_mean | seq_mean_token_sum_norm | token_mean
    kl: str                # "loss": + beta * k3(pi, ref) per token in the loss | "reward": - beta * k1 in the reward
    beta: float            # default KL coefficient; 0 builds no reference
    epsilon: float         # default clip range below 1
    epsilon_high: float    # default clip range above 1 (epsilon unless the method decouples them)
    groups: bool           # needs G >= 2 completions per prompt (a group baseline)
    whiten: bool = False   # advantages are token returns whitened over the global batch (statistics are collective)
    critic: bool = False   # a learned value baseline: GAE over `advantage`'s per-token rewards (ppo.py trains the critic)
    paper: str = ""


ONLINE = {
    # beta 0.0 as TRL (DeepSeekMath itself used 0.04); clip 0.2
    "grpo": Online(group_zscore, "token", seq_mean_token_mean, "loss", 0.0, 0.2, 0.2, True, paper="arXiv:2402.03300"),
    # no std, constant normaliser (completions x max_new_tokens); beta 0 as TRL
    "dr_grpo": Online(group_center, "token", seq_mean_token_sum_norm, "loss", 0.0, 0.2, 0.2, True,
                      paper="arXiv:2503.20783"),
    # clip-higher 0.2 / 0.28, token mean over the global batch, beta 0 (the paper drops the KL term); dynamic
    # sampling is a rollout setting, overlong shaping a reward (rewards.py)
    "dapo": Online(group_zscore, "token", token_mean, "loss", 0.0, 0.2, 0.28, True, paper="arXiv:2503.14476"),
    # sequence ratio with the paper's clip 3e-4 / 4e-4, beta 0; aggregated as grpo (TRL's GSPO recipe)
    "gspo": Online(group_zscore, "sequence", seq_mean_token_mean, "loss", 0.0, 3e-4, 4e-4, True,
                   paper="arXiv:2507.18071"),
    # k1 summed into the reward with beta 0.05 (TRL), likelihood ratio of the sequence, PPO clip 0.2 (TRL)
    "rloo": Online(leave_one_out, "sequence_sum", seq_mean_token_mean, "reward", 0.05, 0.2, 0.2, True,
                   paper="arXiv:2402.14740"),
    # per-token -beta k1 reward (beta 0.05: the seed's REINFORCE++ script), returns whitened over the
    # global batch, PPO clip 0.2, token mean; one completion per prompt is enough
    "reinforce_pp": Online(token_returns, "token", token_mean, "reward", 0.05, 0.2, 0.2, False, whiten=True,
                           paper="arXiv:2501.03262"),
    # PPO with a critic (the RLHF recipe of InstructGPT): per-token -beta k1 reward (beta 0.05, TRL), GAE
    # (gamma 1.0, lam 0.95: TRL and OpenRLHF) whitened over the global batch, PPO clip 0.2, token mean; the critic's
    # clipped value loss and its own optimizer in ppo.py
    "ppo": Online(token_rewards, "token", token_mean, "reward", 0.05, 0.2, 0.2, False, whiten=True, critic=True,
                  paper="arXiv:1707.06347"),
}


def resolve(method: Online, beta=None, epsilon=None, epsilon_high=None) -> dict:
    """{"beta", "epsilon", "epsilon_high"} from the `loss:` section's values (None: the method's default). As the
    issue's contract and TRL: an explicit epsilon is the clip range on both sides unless epsilon_high is set."""
    low = method.epsilon if epsilon is None else epsilon
    high = epsilon_high if epsilon_high is not None else (method.epsilon_high if epsilon is None else epsilon)
    return {"beta": method.beta if beta is None else beta, "epsilon": low, "epsilon_high": high}


def micro_batch_loss(method, hp, logps, old_logps, ref_logps, advantages, mask, norm, entropies=None):
    """The loss of one micro-batch, divided by its GLOBAL batch's normaliser, and its metrics' contributions.

    Args:
        method: an ONLINE row; hp: ``resolve(method, ...)``.
        logps: [N, T] the policy's token log-probs (with grad); old_logps: [N, T] the rollout policy's, or None
            (on-policy: ``logps.detach()``, ratio 1); ref_logps: [N, T] the reference's, or None when beta is 0.
        advantages: [N] or [N, T] (``advantages``); mask: [N, T] the loss tokens.
        norm: the global batch's {"sequences", "tokens" (loss tokens), "max_new_tokens"}.
        entropies: [N, T] the policy's token entropies (detached), or None.

    Returns (loss: scalar with grad, metrics: {name: scalar}). Each metric is already divided by its global count,
    so summing over the micro-batches and processes of a step gives the global value: "loss"; "kl" (token mean of
    k3(pi, ref) for KL in the loss, of the rollout's k1 for KL in the reward, as TRL's GRPO and RLOO log it);
    "entropy" (token mean); "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean" (share of
    tokens, or of sequences for a sequence ratio, whose clip is active).
    """
    beta, epsilon, epsilon_high = hp["beta"], hp["epsilon"], hp["epsilon_high"]
    mask = mask.to(logps.dtype)
    old_logps = logps.detach() if old_logps is None else old_logps
    adv = advantages.to(logps.dtype)
    adv = adv[:, None] if adv.dim() == 1 else adv
    ratio = RATIOS[method.ratio](logps, old_logps, mask)
    per_token = clipped_pg(ratio, adv, epsilon, epsilon_high)
    metrics = {}
    if beta and method.kl == "loss":
        kl = k3(logps, ref_logps)
        per_token = per_token + beta * kl
        metrics["kl"] = token_mean(kl.detach(), mask, norm)
    elif beta:
        metrics["kl"] = token_mean(k1(old_logps, ref_logps), mask, norm)
    loss = method.aggregate(per_token, mask, norm)
    metrics["loss"] = loss.detach()
    if entropies is not None:
        metrics["entropy"] = token_mean(entropies.detach(), mask, norm)
    share = token_mean if method.ratio == "token" else seq_mean_token_mean  # per token, or per sequence
    low, high = clip_flags(ratio.detach(), adv, epsilon, epsilon_high)
    for name, flags in (("low", low), ("high", high), ("region", low | high)):
        metrics[f"clip_ratio/{name}_mean"] = share(flags.to(logps.dtype), mask, norm)
    return loss, metrics
