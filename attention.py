"""Attention for packed batches: `model.attn_implementation: varlen_attn`, the segments of a flattened batch through
PyTorch's own FlashAttention varlen kernel on a GPU, and a plain SDPA loop over the segments as its fallback
elsewhere (CPU, float32). Registered with transformers' AttentionInterface by `register_varlen_attention`; tested
in tests/test_attention.py.
"""
import inspect

import torch

from utils import UserError

VARLEN_ATTN = "varlen_attn"  # model.attn_implementation: batches as segments, no mask (varlen_attention)

try:  # PyTorch's own FlashAttention varlen kernel (torch >= 2.10, CUDA), and the arguments this version takes
    from torch.nn.attention.varlen import varlen_attn
    VARLEN_PARAMS = frozenset(inspect.signature(varlen_attn).parameters)
except ImportError:
    varlen_attn, VARLEN_PARAMS = None, frozenset()


def varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, cu_seq_lens_q=None,
                     max_length_q=None, segment_prefixes=None, **kwargs):
    """Causal attention within each segment of a flattened batch: the transformers attention function behind
    `model.attn_implementation: varlen_attn` (registered by `register_varlen_attention`, called by models.load_policy).

    query [B, H, T, D], key / value [B, Hkv, T, D]; cu_seq_lens_q [S + 1] int32: where each of the S segments of
    the B*T tokens starts (data.collate: every sequence, and the padding at each row's end), max_length_q the
    longest; segment_prefixes (prefix sharing, prefix.collate_pairs): per segment, the (start, length) of the
    shared keys its tokens see before their own. Returns ([B, T, H, D], None). On CUDA in bfloat16/float16 it is
    PyTorch's FlashAttention varlen kernel (torch.nn.attention.varlen): no [T, T] mask, no FLOPs across sequences or
    on padding, no per-shape planning. Elsewhere (CPU, float32) it is SDPA over each segment in turn. Without
    segments (generate) it is transformers' SDPA with the mask transformers built.
    """
    if cu_seq_lens_q is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    B, H, T, D = query.shape  # plain causal attention: models.load_policy refused sliding windows and softcapping
    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else query.dtype
    if query.is_cuda and dtype in (torch.bfloat16, torch.float16) and segment_prefixes is None:
        q, k, v = (x.transpose(1, 2).reshape(B * T, x.shape[1], D).to(dtype) for x in (query, key, value))
        return flash_varlen(q, k, v, cu_seq_lens_q, max_length_q, scaling).reshape(B, T, H, D), None
    # a GPU with prefix sharing was refused at start (register_varlen_attention)
    q, k, v = (x.transpose(0, 1).reshape(x.shape[1], B * T, D) for x in (query, key, value))  # a view when B == 1
    return segment_sdpa(q, k, v, cu_seq_lens_q, scaling, segment_prefixes).reshape(B, T, H, D), None


@torch.compiler.disable  # a loop over data-dependent lengths: compiled, it would be re-traced for every batch
def segment_sdpa(q, k, v, cu_seq_lens, scale, prefixes=None):
    """The CPU / float32 path of varlen_attention: causal SDPA over each segment; q [H, N, D], k / v [Hkv, N, D]
    (heads first) -> [N, H, D] (tokens first, as the output projection reads them). A segment with a shared prefix
    (prefixes[i] = (start, s), s > 0: a rejected branch, see prefix.py) also sees the first s keys of the segment
    that starts at `start` (its group's shared part and chosen branch), all of them: its r queries attend
    [shared | own] under a causal mask aligned to the bottom right (r x (s + r) scores), or, when that block is
    larger than plain causal attention over s + r tokens (r > s), the shared queries are run along and their
    outputs dropped. Either way no more work than the separate sequence. The segments are `split` views (whose
    backward is one concatenation, where slices would each add a zero tensor of the whole batch), and each SDPA call
    gets a batch dimension: that is what selects the CPU flash kernel (3-D inputs fall back to SDPA's unfused math,
    which materializes the scores)."""
    bounds = cu_seq_lens.tolist()
    sizes = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    pieces = list(zip(*(x.unsqueeze(0).split(sizes, dim=2) for x in (q, k, v))))  # per segment [1, H, L, D] each
    index = {a: i for i, a in enumerate(bounds[:-1])}
    out = []
    for (qi, ki, vi), (start, s) in zip(pieces, prefixes or [(0, 0)] * len(sizes)):
        if s == 0:
            out.append(sdpa(qi, ki, vi, scale, is_causal=True))
            continue
        shared = [x[:, :, :s] for x in pieces[index[start]]]
        kv = [torch.cat([p, o], dim=2) for p, o in zip(shared[1:], (ki, vi))]
        r = qi.shape[2]
        if r <= s:
            mask = torch.ones(r, s + r, dtype=torch.bool, device=q.device).tril(diagonal=s)
            out.append(sdpa(qi, *kv, scale, attn_mask=mask))
        else:
            out.append(sdpa(torch.cat([shared[0], qi], dim=2), *kv, scale, is_causal=True)[s:])
    return torch.cat(out)


def sdpa(q, k, v, scale, **how):
    """SDPA of one segment: q [1, H, L, D], k / v [1, Hkv, S, D] -> [L, H, D]."""
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True, **how)
    return out[0].transpose(0, 1)


def flash_varlen(q, k, v, cu_seq_lens, max_length, scale):
    """PyTorch's varlen_attn, causal; q [N, H, D], k / v [N, Hkv, D] -> [N, H, D]. Its signature grew from torch 2.10
    (is_causal) to 2.11+ (window_size, scale, enable_gqa): this passes what the installed version takes."""
    extra = {"window_size": (-1, 0)} if "window_size" in VARLEN_PARAMS else {"is_causal": True}
    if "scale" in VARLEN_PARAMS:
        extra["scale"] = scale
    elif scale is not None:  # the kernel scales by D**-0.5: fold the model's own scale into q
        q = q * (scale * q.shape[-1] ** 0.5)
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in VARLEN_PARAMS:
            extra["enable_gqa"] = True
        else:
            k, v = (x.repeat_interleave(q.shape[1] // x.shape[1], dim=1) for x in (k, v))
    return varlen_attn(q, k, v, cu_seq_lens, cu_seq_lens, max_length, max_length, **extra)


def varlen_mask(q_length, kv_length, q_offset=0, kv_offset=0, attention_mask=None, **kwargs):
    """The mask transformers builds before each forward of a varlen_attn model. A training forward (no padding
    mask, no cache) gets none: the segments keep the sequences apart, and transformers would otherwise build a
    [rows, 1, T, T] mask of the packed sequences for nothing. Otherwise (generate) SDPA's mask, which
    varlen_attention hands to SDPA when there are no segments."""
    from transformers.masking_utils import sdpa_mask
    if attention_mask is None and q_length == kv_length and q_offset == 0 and kv_offset == 0:
        return None
    return sdpa_mask(q_length=q_length, kv_length=kv_length, q_offset=q_offset, kv_offset=kv_offset,
                     attention_mask=attention_mask, **kwargs)


def register_varlen_attention(device, policy_dtype="bfloat16", prefix_sharing=False):
    """Make `varlen_attn` a transformers attention implementation (its documented AttentionInterface), with
    `varlen_mask` as its mask."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    if device.type == "cuda" and varlen_attn is None:
        raise UserError(f"config: model.attn_implementation={VARLEN_ATTN} needs torch >= 2.10 on a GPU (this is "
                        f"torch {torch.__version__}): upgrade torch or use sdpa")
    if device.type == "cuda" and policy_dtype == "float32":
        raise UserError(f"config: model.attn_implementation={VARLEN_ATTN} runs its GPU kernel in bfloat16 or float16: "
                        "set model.policy_dtype=bfloat16, or use sdpa for float32")
    if device.type == "cuda" and prefix_sharing:  # the kernel takes no shared keys: a loop of SDPA calls instead
        raise UserError(f"config: prefix_sharing=true with model.attn_implementation={VARLEN_ATTN} runs on a CPU only: "
                        "use sdpa on a GPU (its mask keeps the branches apart)")
    AttentionInterface.register(VARLEN_ATTN, varlen_attention)
    AttentionMaskInterface.register(VARLEN_ATTN, varlen_mask)
