"""Prefix sharing (`prefix_sharing: true`): a preference pair's prompt computed once instead of twice.

A pair's chosen and rejected sequences start with the same prompt. Laid out as one group of tokens,

    [ prompt[:-1] | prompt[-1] chosen reply | prompt[-1] rejected reply ]
      shared        branch 1                  branch 2

each branch repeats the prompt's last token (whose logits predict the reply's first token) and sees the shared part
and its own earlier tokens only: the rejected reply never sees the chosen one. Position ids continue the prompt's in
each branch. So every token sees exactly the tokens, at exactly the positions, that it sees in its own sequence,
and its log-prob is the same (up to float rounding); the shared part's forward (and backward) runs once. The
attention is a 4-D boolean mask [R, 1, T, T] (True: attend), which transformers passes to SDPA as it is (eager
attention gets it as an additive float mask: models.forward_inputs); or, with varlen_attn on a CPU, the segments
(cu_seq_lens: shared part + chosen branch, rejected branch) with the shared keys each rejected branch also sees
(segment_prefixes, attention.segment_sdpa), so no attention is computed across branches or groups. Rows hold one
group each, or, with packing, several groups laid end to end (the mask keeps groups apart).

The batch is data.collate's, sequence ids included: the chosen reply's tokens (and the shared part) carry the pair's
chosen sequence id i, the rejected branch B + i, and labels sit where the next-token rule expects them, so the
forward pass and log-prob code do not change.
"""
import torch

import batching

IGNORE = -100


def shared_length(ids_a, labels_a, ids_b, labels_b) -> int:
    """How many leading tokens two sequences share in their prompt (equal ids, no label in either), minus the last
    one, which each branch keeps (its logits predict the reply's first token). 0: nothing to share."""
    n = 0
    for a, b, la, lb in zip(ids_a, ids_b, labels_a, labels_b):
        if a != b or la != IGNORE or lb != IGNORE:
            break
        n += 1
    return max(min(n, len(ids_a) - 1, len(ids_b) - 1) - 1, 0)


def group_of(example):
    """(ids, labels, branch, positions) of one pair's group: branch 0 shared, 1 chosen, 2 rejected."""
    ci, cl, ri, rl = (example[k] for k in ("chosen_input_ids", "chosen_labels", "rejected_input_ids",
                                           "rejected_labels"))
    s = shared_length(ci, cl, ri, rl)
    ids = list(ci) + list(ri[s:])
    # the first token of each branch is never a label: nothing in its branch predicts it (as collate's first token)
    labels = [IGNORE] * s + [IGNORE] + list(cl[s + 1:]) + [IGNORE] + list(rl[s + 1:])
    branch = [0] * s + [1] * (len(ci) - s) + [2] * (len(ri) - s)
    positions = list(range(len(ci))) + list(range(s, len(ri)))
    return ids, labels, branch, positions


def collate_pairs(examples, pad_token_id, packing=False, max_length=None, pad_to_multiple_of=1,
                  segments_only=False) -> dict:
    """data.collate's batch of preference pairs (or KTO's completions with their KL sequences), each pair one group
    (see the module docstring): input_ids, labels, seq_ids, position_ids [R, T], the 4-D attention_mask, and for
    varlen_attn the segments with, per segment, the (start, length) of the shared keys it sees before its own tokens
    in the flattened batch ((0, 0): none); packing puts several groups in a row (batching.packed_rows: best-fit
    decreasing, rows of up to max_length tokens). segments_only (varlen_attn): packed groups all in one row, and no
    4-D mask (the segments keep the branches apart)."""
    groups = [group_of(ex) for ex in examples]
    lengths = [len(g[0]) for g in groups]
    rows = batching.packed_rows(lengths, max_length, segments_only) if packing else [[i] for i in range(len(groups))]
    T = max(sum(lengths[i] for i in row) for row in rows)
    T = -(-T // pad_to_multiple_of) * pad_to_multiple_of
    R, B = len(rows), len(examples)
    input_ids = torch.full((R, T), pad_token_id, dtype=torch.long)
    labels = torch.full((R, T), IGNORE, dtype=torch.long)
    seq_ids = torch.full((R, T), -1, dtype=torch.long)
    positions = torch.zeros((R, T), dtype=torch.long)
    group_ids = torch.full((R, T), -1, dtype=torch.long)
    branches = torch.zeros((R, T), dtype=torch.long)
    shared_keys = {}  # flat start of a rejected branch -> (flat start, length) of its group's shared part
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            ids, labs, branch, pos = groups[i]
            n, part = len(ids), slice(at, at + len(ids))
            input_ids[r, part], labels[r, part] = torch.tensor(ids), torch.tensor(labs)
            branches[r, part], positions[r, part] = torch.tensor(branch), torch.tensor(pos)
            seq_ids[r, part] = torch.where(branches[r, part] == 2, B + i, i)
            group_ids[r, part] = i
            if branch.count(0):
                shared_keys[r * T + at + n - branch.count(2)] = (r * T + at, branch.count(0))
            at += n
        positions[r, at:] = torch.arange(T - at)
    batch = {"input_ids": input_ids, "labels": labels, "seq_ids": seq_ids, "position_ids": positions}
    if not segments_only:
        batch["attention_mask"] = attention_mask(group_ids, branches)
    batch["cu_seq_lens"], batch["max_seq_len"] = batching.segments(seq_ids)
    batch["segment_prefixes"] = [shared_keys.get(a, (0, 0)) for a in batch["cu_seq_lens"][:-1].tolist()]
    batch["n_seqs"] = 2 * B
    return batch


def attention_mask(group_ids, branches):
    """[R, 1, T, T] bool: query q attends key k <= q of its own group that is shared or in its own branch; a padding
    position attends to itself only (a row of nothing would give NaN, also in the backward pass)."""
    T = group_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    same_group = (group_ids[:, :, None] == group_ids[:, None, :]) & (group_ids[:, :, None] >= 0)
    visible = (branches[:, None, :] == 0) | (branches[:, :, None] == branches[:, None, :])
    mask = same_group & visible & causal
    return (mask | torch.eye(T, dtype=torch.bool)).unsqueeze(1)
