"""Loss functions for SFT and preference optimisation (DPO, conservative DPO, IPO).

Pure functions of tensors: no config objects, no models. Shapes use
B = batch size (preference pairs), N = number of scored token positions, V = vocabulary size.

Token convention: the trainer scores only the positions whose NEXT token is a label (logits at position ``t``
predict the token at ``t + 1``; prompt, padding and the first token of each packed sequence carry no label),
flattened over the batch: ``logits`` [N, V], ``labels`` [N], ``seq_ids`` [N] (which sequence each belongs to).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


CHUNK_VALUES = 2**26  # float32 values per chunk in label_logps (256 MB), whatever the vocabulary


def _chunk_rows(vocab_size: int) -> int:
    return max(1, CHUNK_VALUES // max(1, vocab_size))


def scored_positions(labels: torch.Tensor, seq_ids: torch.Tensor):
    """Which logits a batch needs, and what they are scored against.

    Args:
        labels: [R, T], ``-100`` where there is no loss; seq_ids: [R, T] the sequence of each token.

    Returns:
        keep: [R, T] bool, True at positions whose NEXT token is a label (pass it as ``logits_to_keep``; the
            logits come back as ``logits[keep]``, [N, V], in row-major order);
        targets: [N] those next tokens; target_seq_ids: [N] the sequence each belongs to.
    """
    next_is_label = labels[:, 1:] != IGNORE_INDEX
    keep = F.pad(next_is_label, (0, 1), value=False)
    return keep, labels[:, 1:][next_is_label], seq_ids[:, 1:][next_is_label]


class _LabelLogps(torch.autograd.Function):
    """log p(label) from logits, chunked over rows, saving only the logits (in their own dtype) for backward.

    Forward:  logp_i = z_i[y_i] - logsumexp(z_i), computed in float32 one chunk of rows at a time.
    Backward: d logp_i / d z_i = onehot(y_i) - softmax(z_i), recomputed chunk by chunk from the saved logits
    and the saved [N] log-normalisers. So no [N, V] float32 tensor ever exists, only chunk-sized ones.
    """

    @staticmethod
    def forward(ctx, logits, labels):
        compute_dtype = torch.promote_types(logits.dtype, torch.float32)
        mask = labels != IGNORE_INDEX
        safe_labels = labels.masked_fill(~mask, 0)  # any valid index; masked out below
        step = _chunk_rows(logits.shape[-1])
        log_normaliser = torch.cat([torch.logsumexp(logits[i:i + step].to(compute_dtype), dim=-1)
                                    for i in range(0, logits.shape[0], step)]) if logits.shape[0] else \
            logits.new_zeros(0, dtype=compute_dtype)
        label_logits = logits.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1).to(compute_dtype)
        ctx.save_for_backward(logits, safe_labels, mask, log_normaliser)
        return torch.where(mask, label_logits - log_normaliser, torch.zeros((), dtype=compute_dtype, device=logits.device))

    @staticmethod
    def backward(ctx, grad_logps):
        logits, safe_labels, mask, log_normaliser = ctx.saved_tensors
        weight = torch.where(mask, grad_logps, torch.zeros_like(grad_logps)).to(log_normaliser.dtype)
        grad = torch.empty_like(logits)
        step = _chunk_rows(logits.shape[-1])
        for i in range(0, logits.shape[0], step):
            w, out = weight[i:i + step, None], grad[i:i + step]
            # -w * softmax + w * onehot, in place in one float32 buffer (the gradient itself for float32 logits)
            buf = out if out.dtype == w.dtype else torch.empty(out.shape, dtype=w.dtype, device=out.device)
            torch.sub(logits[i:i + step], log_normaliser[i:i + step, None], out=buf)
            buf.exp_().mul_(-w).scatter_add_(-1, safe_labels[i:i + step, None], w)
            if buf is not out:
                out.copy_(buf)
        return grad, None


def label_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Log-probability of each row's label: ``log p(y_i) = z_i[y_i] - logsumexp(z_i)``.

    Args:
        logits: [N, V], any float dtype: one row per scored position (the trainer passes only the positions whose next
            token is a label, so prompt and padding positions never reach the vocabulary projection).
        labels: [N] integer token ids, ``-100`` for rows without a label (they get log-prob 0 and no gradient).

    Returns:
        [N] float32 (float64 for float64 logits).

    Memory: the float32 work runs over chunks of rows (about 2**26 values each), and backward recomputes
    ``softmax`` chunk by chunk from the logits kept in their own dtype, so neither pass ever holds a full
    [N, V] float32 copy: with a 150k vocabulary that is the difference between 0.6 GB and 2.4 GB per 4k tokens.
    """
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"logits {tuple(logits.shape)} must be [N, V] and labels {tuple(labels.shape)} [N]")
    return _LabelLogps.apply(logits, labels)


def sequence_logps(token_logps: torch.Tensor, seq_ids: torch.Tensor, n_seqs: int, average: bool = False) -> torch.Tensor:
    """Sum (or mean) of token log-probs per sequence.

    Args:
        token_logps: [N] log-probs of label tokens (from ``label_logps``).
        seq_ids: [N] the sequence each token belongs to, in ``[0, n_seqs)``. Packed and padded batches look alike
            here: a token's row and column no longer matter, only its sequence.
        n_seqs: number of sequences (a sequence without label tokens gets 0).
        average: divide by each sequence's number of label tokens (mean log-prob per token) instead of summing.

    Returns:
        [n_seqs] in the dtype of ``token_logps``: ``sum_{t in seq} log p(y_t | ..t)``.
    """
    total = token_logps.new_zeros(n_seqs).index_add(0, seq_ids, token_logps)
    if average:
        return total / torch.bincount(seq_ids, minlength=n_seqs).clamp(min=1)
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


def sft_loss(token_logps: torch.Tensor, num_loss_tokens: int | torch.Tensor) -> torch.Tensor:
    """Next-token NLL of one micro-batch, normalised by the token count of the whole global batch.

    Args:
        token_logps: [N] log-probs of this micro-batch's label tokens (``label_logps``; 0 for unlabelled rows).
        num_loss_tokens: the number of label tokens in the WHOLE global batch: all micro-batches of the optimizer
            step, on all ranks.

    Returns:
        scalar: ``-sum_{label tokens in this micro-batch} log p(y_t) / num_loss_tokens``.

    Summing this over the micro-batches (and ranks) of a step gives exactly the token mean over the global
    batch, ``-(1/N) sum_{all label tokens} log p(y_t)``, so 1 micro-batch of 8 and 8 micro-batches of 1
    give the same gradient. Averaging per-micro-batch means instead weights tokens of short micro-batches
    more (the gradient-accumulation bug fixed across libraries in 2024). With DDP, which averages gradients
    over ranks, multiply by the world size (or pass ``num_loss_tokens / world_size``).
    """
    if isinstance(num_loss_tokens, torch.Tensor):
        denominator = num_loss_tokens.to(device=token_logps.device, dtype=token_logps.dtype).clamp(min=1)
    else:
        denominator = max(num_loss_tokens, 1)
    return -token_logps.sum() / denominator
