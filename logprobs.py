"""Log-probs: of each label token from the logits (chunked, never a full [N, V] float32 copy), summed or averaged per
sequence, and the disk cache of precomputed reference log-probs (Trainer.precompute_reference_logps).

Token convention: the trainer scores only the positions whose NEXT token is a label (logits at position ``t``
predict the token at ``t + 1``; prompt, padding and the first token of each packed sequence carry no label),
flattened over the batch: ``logits`` [N, V], ``labels`` [N], ``seq_ids`` [N] (which sequence each belongs to).
models.token_logps runs the forward pass through these; losses.py takes what they return.
"""
import hashlib
import os
from array import array

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


# ----------------------------------------------------------------------------------------------------------------
# The reference log-prob cache: one file per reference (named by its fingerprint), one entry per example
# ----------------------------------------------------------------------------------------------------------------
def example_key(example) -> int:
    """A 64-bit digest of an example's token ids and labels: the per-example key of the reference log-prob cache."""
    h = hashlib.blake2b(digest_size=8)
    for k in ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"):
        h.update(array("q", example[k]).tobytes() + b"|")
    return int.from_bytes(h.digest(), "little", signed=True)


def logps_cache_path(cache_dir, fingerprint) -> str:
    """The reference log-prob cache file named `fingerprint` (FrozenReference.fingerprint) in `cache_dir` (null:
    $XDG_CACHE_HOME, or ~/.cache, /minimal-llm-alignment/reference_logps)."""
    folder = cache_dir or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "minimal-llm-alignment",
                                       "reference_logps")
    return os.path.join(os.path.expanduser(folder), fingerprint + ".pt")


def read_logps_cache(path) -> dict:
    """{example key: (chosen, rejected)} from a cache file written by `write_logps_cache`; {} if absent or unreadable
    (a cache is never worth failing a run for: it is recomputed)."""
    if not os.path.exists(path):
        return {}
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        return dict(zip(state["keys"].tolist(), map(tuple, state["values"].tolist())))
    except Exception as e:  # truncated, corrupt or foreign file: whatever the loader raises, recompute
        print(f"warning: reference log-prob cache {path} is unreadable ({type(e).__name__}): recomputing it")
        return {}


def write_logps_cache(path, cache):
    """Atomically (a reader sees the old cache or the new one, never half of one); a cache that cannot be written
    costs the next run a recomputation, not this run its training: a warning, no error."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.save({"keys": torch.tensor(list(cache), dtype=torch.long),
                    "values": torch.tensor(list(cache.values()), dtype=torch.float32)}, tmp)
        os.replace(tmp, path)
    except OSError as e:
        print(f"warning: could not write the reference log-prob cache {path}: {e.strerror or e} (training goes on)")
        if os.path.exists(tmp):
            os.remove(tmp)
