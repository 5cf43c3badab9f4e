"""How data.collate lays a micro-batch's sequences out in rows: one right-padded row per sequence, or packed end to
end (`packing: true`) in rows of up to max_length tokens (best_fit_rows) or, for varlen_attn, in one row; and the
rows as the segments that variable-length attention reads (segments). prefix.py lays preference pairs out with
their prompt once, in the same rows.
"""
import torch


def best_fit_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Sequence indices in rows of at most `capacity` tokens (a longer sequence gets a row of its own): as many rows as
    best-fit decreasing bin packing needs, then `even_rows` of them where that fits and shortens the longest row,
    which every row of a batch is padded to. Deterministic."""
    rows, space = [], []  # space[r] = tokens still free in row r
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    for i in order:
        fits = [r for r in range(len(rows)) if space[r] >= lengths[i]]
        if fits:
            best = min(fits, key=lambda r: (space[r], r))
            rows[best].append(i)
            space[best] -= lengths[i]
        else:
            rows.append([i])
            space.append(capacity - lengths[i])
    even, used = even_rows(order, lengths, len(rows))
    return even if used and max(used) <= capacity and max(used) < capacity - min(space) else rows


def even_rows(order, lengths, n_rows):
    """The sequences `order` names (longest first) spread over n_rows rows, each into the emptiest row: (rows, tokens
    in each row)."""
    rows, used = [[] for _ in range(n_rows)], [0] * n_rows
    for i in order:
        r = used.index(min(used))
        rows[r].append(i)
        used[r] += lengths[i]
    return rows, used


def packed_rows(lengths: list[int], max_length: int | None, one_row: bool) -> list[list[int]]:
    """Packing's rows of sequence indices: all in one row (one_row), or best_fit_rows of up to max_length tokens
    (None: the longest sequence's)."""
    return [list(range(len(lengths)))] if one_row else best_fit_rows(lengths, max_length or max(lengths))


def segments(seq_ids):
    """The flattened [R, T] tokens as segments, for attention kernels over variable-length segments (varlen_attn):
    a segment starts at every row start and wherever the sequence id changes, so each sequence is one, and so is
    each row's trailing padding. Returns (cu_seq_lens [S + 1] int32: where each starts, then R*T; the longest)."""
    flat = seq_ids.flatten()
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[1:] = flat[1:] != flat[:-1]
    starts[::seq_ids.shape[1]] = True
    bounds = torch.cat([starts.nonzero().flatten(), torch.tensor([flat.numel()])])
    return bounds.to(torch.int32), int(bounds.diff().max())


def sequence_rows(seqs, pad_token_id, packing, max_length, pad_to_multiple_of, one_row=False) -> dict:
    """data.collate's token tensors of the (input_ids, labels) sequences `seqs` (data.sequences_of), one per row
    (padded) or several end to end (packed; one_row: all of them)."""
    lengths = [len(ids) for ids, _ in seqs]
    rows = packed_rows(lengths, max_length, one_row) if packing else [[i] for i in range(len(seqs))]
    T = max(sum(lengths[i] for i in row) for row in rows)
    T = -(-T // pad_to_multiple_of) * pad_to_multiple_of
    batch = {"input_ids": torch.full((len(rows), T), pad_token_id, dtype=torch.long),
             "labels": torch.full((len(rows), T), -100, dtype=torch.long),
             "seq_ids": torch.full((len(rows), T), -1, dtype=torch.long)}
    if packing:
        batch["position_ids"] = torch.zeros((len(rows), T), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            ids, labels = seqs[i]
            n = len(ids)
            batch["input_ids"][r, at:at + n] = torch.tensor(ids)
            batch["labels"][r, at:at + n] = torch.tensor(labels)
            batch["labels"][r, at] = -100
            batch["seq_ids"][r, at:at + n] = i
            if packing:
                batch["position_ids"][r, at:at + n] = torch.arange(n)
            at += n
        if packing:
            batch["position_ids"][r, at:] = torch.arange(T - at)
    if not packing:
        batch["attention_mask"] = (batch["seq_ids"] >= 0).long()
    batch["cu_seq_lens"], batch["max_seq_len"] = segments(batch["seq_ids"])
    batch["n_seqs"] = len(seqs)
    return batch
