"""Loss functions for SFT and preference optimisation (DPO, conservative DPO, IPO).

Pure functions of tensors: no config objects, no models. Shapes use
B = batch size, T = sequence length, V = vocabulary size.

Label convention: ``labels`` has the same shape as ``input_ids``, with ``-100`` at every position that
carries no loss (prompt, padding). Logits at position ``t`` predict the token at ``t + 1``, so the
functions below shift by one: ``logits[:, :-1]`` is scored against ``labels[:, 1:]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probabilities of the labels.

    Args:
        logits: [B, T, V], any float dtype (bf16/fp16/fp32/fp64).
        labels: [B, T] integer token ids, ``-100`` where there is no loss.

    Returns:
        logps: [B, T-1] float32 (float64 if ``logits`` is float64); ``log p(labels[:, t+1] | ..t)``, 0 where masked.
        mask:  [B, T-1] bool, True where ``labels[:, 1:] != -100``.

    ``log p(y) = z_y - logsumexp(z)``: the label logit is gathered and the log-normaliser subtracted, both in
    float32, instead of building a full [B, T, V] float32 ``log_softmax``. The logsumexp runs one sequence
    at a time, so for low-precision logits only one [T, V] float32 copy exists at a time when no graph is
    recorded (the reference model); with autograd the float32 rows are kept for the backward pass, which is
    no more than ``log_softmax(logits.float())`` would keep.
    """
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree on [B, T]")
    compute_dtype = torch.promote_types(logits.dtype, torch.float32)
    logits = logits[:, :-1]  # position t predicts token t + 1
    labels = labels[:, 1:]
    mask = labels != IGNORE_INDEX
    safe_labels = labels.masked_fill(~mask, 0)  # any valid index; masked out below

    label_logits = torch.gather(logits, dim=-1, index=safe_labels.unsqueeze(-1)).squeeze(-1).to(compute_dtype)
    log_normaliser = torch.stack([torch.logsumexp(row.to(compute_dtype), dim=-1) for row in logits])
    logps = torch.where(mask, label_logits - log_normaliser, torch.zeros((), dtype=compute_dtype, device=logits.device))
    return logps, mask


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, average: bool = False) -> torch.Tensor:
    """Log-probability of each sequence's labelled tokens.

    Args:
        logits: [B, T, V], any float dtype.
        labels: [B, T], ``-100`` where there is no loss.
        average: if True, divide by the number of label tokens of each sequence (mean log-prob per token,
            0 for a sequence without label tokens) instead of returning the sum.

    Returns:
        [B] float32 (float64 for float64 logits): ``sum_t log p(labels[:, t+1] | ..t)`` over label tokens.
    """
    logps, mask = token_logps(logits, labels)
    total = logps.sum(-1)
    if average:
        return total / mask.sum(-1).clamp(min=1)
    return total


def preference_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
    ipo: bool = False,
    reference_free: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO-family loss for a batch of preference pairs.

    Args:
        policy_chosen_logps, policy_rejected_logps: [B] log pi_theta(y_w | x), log pi_theta(y_l | x).
        reference_chosen_logps, reference_rejected_logps: [B] the same under the frozen reference pi_ref.
        beta: the KL-strength / inverse temperature, > 0.
        label_smoothing: eps, the assumed probability that a preference label is flipped (conservative DPO,
            Mitchell 2023); 0 gives plain DPO. Must lie in [0, 0.5].
        ipo: use the IPO loss instead of the sigmoid (DPO) loss.
        reference_free: treat the reference log-probs as 0 (an implicit uniform reference), in the loss
            and in the rewards.

    With the log-ratio difference (all per example)

        h = (log pi(y_w) - log pi(y_l)) - (log ref(y_w) - log ref(y_l))

    the per-example losses are

        DPO  (Rafailov et al. 2023, eq. 7):   -log sigmoid(beta * h)
        cDPO (Mitchell 2023):                 -(1 - eps) * log sigmoid(beta * h) - eps * log sigmoid(-beta * h)
        IPO  (Azar et al. 2023, eq. 17):      (h - 1 / (2 * beta)) ** 2

    IPO is applied to the *summed* sequence log-ratios, as in the original DPO repository (TRL instead
    averages the log-probs over tokens first; pass ``sequence_logps(..., average=True)`` values for that).

    Returns:
        losses: [B], one loss per pair (reduce with ``.mean()`` or a global-batch normaliser).
        chosen_rewards, rejected_rewards: [B], the implicit rewards ``beta * (log pi - log ref)``, detached.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5], got {label_smoothing}")
    if ipo and label_smoothing:
        raise ValueError("label_smoothing (conservative DPO) is not defined for the IPO loss")
    if reference_free:
        reference_chosen_logps = torch.zeros_like(policy_chosen_logps)
        reference_rejected_logps = torch.zeros_like(policy_rejected_logps)

    policy_logratios = policy_chosen_logps - policy_rejected_logps
    reference_logratios = reference_chosen_logps - reference_rejected_logps
    h = policy_logratios - reference_logratios

    if ipo:
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        eps = label_smoothing
        losses = -(1.0 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)

    chosen_rewards = beta * (policy_chosen_logps - reference_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - reference_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards


def sft_loss(logits: torch.Tensor, labels: torch.Tensor, num_loss_tokens: int | torch.Tensor) -> torch.Tensor:
    """Next-token NLL of one micro-batch, normalised by the token count of the whole global batch.

    Args:
        logits: [B, T, V] of this micro-batch, any float dtype.
        labels: [B, T], ``-100`` where there is no loss.
        num_loss_tokens: the number of label tokens (``labels[:, 1:] != -100``) in the WHOLE global batch:
            all micro-batches of the optimizer step, on all ranks.

    Returns:
        scalar: ``-sum_{label tokens in this micro-batch} log p(y_t) / num_loss_tokens``.

    Summing this over the micro-batches (and ranks) of a step gives exactly the token mean over the global
    batch, ``-(1/N) sum_{all label tokens} log p(y_t)``, so 1 micro-batch of 8 and 8 micro-batches of 1
    give the same gradient. Averaging per-micro-batch means instead weights tokens of short micro-batches
    more (the gradient-accumulation bug fixed across libraries in 2024). With DDP, which averages gradients
    over ranks, multiply by the world size (or pass ``num_loss_tokens / world_size``).
    """
    logps, _ = token_logps(logits, labels)
    if isinstance(num_loss_tokens, torch.Tensor):
        denominator = num_loss_tokens.to(device=logps.device, dtype=logps.dtype).clamp(min=1)
    else:
        denominator = max(num_loss_tokens, 1)
    return -logps.sum() / denominator
