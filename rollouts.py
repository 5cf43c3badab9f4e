"""Rollouts for the online methods (the GRPO family): the policy samples completions of prompts, and the completions
become examples that the offline machinery (data.collate, models.token_logps) scores token by token.

    completions, truncated = generate(model, prompts, num_generations=G, ...)   # prompt p's G completions adjacent
    with gathered(model): ...                                                   # FSDP2: weights gathered once
    batch = data.collate(as_examples(prompts, completions), pad_id)             # prompt + completion, labelled
    logps, seq_ids, _ = models.token_logps(model, batch)
    per_token, mask = completion_rows(logps, seq_ids, batch["n_seqs"])         # [N, T], as rl_losses takes them

Sampling is reproducible and invisible: each completion draws from a generator of its own, seeded by the caller's
number for its prompt (from seed, step and the prompt's place in the global batch) and its place in the group, so the
global RNG stream that exact resume depends on is left as it was. It is exactly softmax(logits / temperature) within
top_p (or greedy): the knobs a model's own generation_config may ship (Qwen's top_k 20 and repetition_penalty 1.05,
transformers' global top_k 50) are switched off, because the losses score the completions under that plain
distribution.
"""
import contextlib
import math

import torch
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from transformers import LogitsProcessor, LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

# Logits processors that a model's generation_config or transformers' defaults would add, at their no-op values;
# decoding is greedy over RowSampler's choice, so the sampling knobs (top_k, min_p, ...) are never applied
NEUTRAL = dict(repetition_penalty=1.0, no_repeat_ngram_size=0, min_new_tokens=0, num_beams=1, num_return_sequences=1,
               do_sample=False)


def generate(model, prompts, *, num_generations, max_new_tokens, temperature, top_p, eos_token_id, pad_token_id,
             seed, micro_batch, synced=False, device=None):
    """Sample `num_generations` completions of each prompt (token-id lists), prompt 0's first, then prompt 1's, ...

    Batched generate with the KV cache over all prompts' rows (shortest prompts together, at most `micro_batch`
    sequences per call), prompts LEFT-padded with pad_token_id (the mask keeps padding out of attention and
    positions); temperature 0 is greedy. Each row samples with a generator of its own, seeded by its prompt's seed
    (`seed`: one per prompt, or one int: prompt i then takes seed x 1000033 + i) and its place in the group (RowSampler): a completion does
    not depend on which other prompts share its batch, so one process or many sample the same completions.
    synced=True (FSDP outside `gathered`): every process keeps running forward passes until all are done, as
    sharded weights are gathered collectively; every process must then pass the same number of rows.
    eos_token_id: an id or a list of ids. device: where the inputs go (default: the model's parameters').

    Returns (completions: N = len(prompts) x num_generations token-id lists, cut after the first eos, which is kept;
    truncated: N bools, True where max_new_tokens ran out before any eos)."""
    seeds = [seed * 1_000_033 + i for i in range(len(prompts))] if isinstance(seed, int) else list(seed)
    rows = [(list(p), (s * 1_000_003 + g) % 2 ** 63) for p, s in zip(prompts, seeds) for g in range(num_generations)]
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))  # less padding; the rows' order back at the end
    eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)
    device = device or input_device(model)
    completions, truncated = [None] * len(rows), [None] * len(rows)
    with torch.no_grad(), eval_mode(model):
        for start in range(0, len(rows), micro_batch):
            chunk = order[start:start + micro_batch]
            input_ids, attention_mask = left_padded([rows[i][0] for i in chunk], pad_token_id, device)
            # decoding is greedy over what RowSampler leaves (the sampled token): no global RNG is drawn from
            sampler = [RowSampler([rows[i][1] for i in chunk], temperature, top_p, device)] if temperature > 0 else []
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                                 eos_token_id=sorted(eos), pad_token_id=pad_token_id, use_cache=True,
                                 synced_gpus=synced, logits_processor=LogitsProcessorList(sampler), **NEUTRAL)
            for i, ids in zip(chunk, out[:, input_ids.shape[1]:].tolist()):
                end = next((k for k, t in enumerate(ids) if t in eos), None)
                completions[i] = ids if end is None else ids[:end + 1]  # after eos: padding only
                truncated[i] = end is None
    return completions, truncated


class RowSampler(LogitsProcessor):
    """Samples each row's next token from softmax(logits / temperature) within top_p (transformers' own warpers),
    with the row's own torch.Generator, and leaves only that token for the (greedy) decoding to take. The draw is
    the Gumbel-max one: argmax(logits - log(-log u)), u uniform from the row's generator, one vectorised argmax for
    the batch (a multinomial call per row and token cost more than the model's forward on small models)."""

    def __init__(self, seeds, temperature, top_p, device):
        self.generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        self.warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature), *(
            [TopPLogitsWarper(top_p)] if top_p < 1 else [])])

    def __call__(self, input_ids, scores):
        logits = self.warpers(input_ids, scores.float())  # -inf outside top_p: never drawn
        vocab, device = logits.shape[1], logits.device
        uniform = torch.stack([torch.rand(vocab, generator=g, device=device) for g in self.generators])
        picks = (logits - torch.log(-torch.log(uniform.clamp(min=1e-30)))).argmax(-1)
        return torch.full_like(scores, -math.inf).scatter_(1, picks[:, None], 0.0)


def left_padded(rows, pad_token_id, device):
    """(input_ids, attention_mask) [B, longest], rows aligned to the right, where generation continues them."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad_token_id] * (width - len(r)) + r for r in rows], dtype=torch.long, device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long, device=device)
    return ids, mask


def input_device(model):
    """Where the model computes: its parameters' device; for sharded (DTensor) ones the mesh's device type (under
    CPU offload the shards live on the CPU but compute runs on the current GPU)."""
    param = next(model.parameters())
    if isinstance(param, DTensor) and param.device_mesh.device_type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return param.device


@contextlib.contextmanager
def eval_mode(model):
    """model.eval() (no dropout while sampling), then every submodule's own train/eval mode back as it was."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


@contextlib.contextmanager
def gathered(model):
    """FSDP2: every sharded unit's full weights gathered ONCE and kept for the whole block (a rollout's many
    generate calls and forward passes), instead of one all-gather per block per generated token; resharded after.
    Each unit's reshard-after-forward setting is switched off inside and restored exactly afterwards. A no-op for a
    model without FSDP units. Costs one full copy of the weights (in FSDP's compute dtype) per process meanwhile.
    Entering is collective (every process enters, once); inside, forward passes run no collective at all, so
    generate(synced=False) is safe there and spares the finished processes' idle forward passes.

    PeftModel.generate calls the wrapped model's generate, so the root's forward hook (which gathers what the root
    unit holds: final norm, tied embedding) never runs in generation; gathered up front, those weights are there."""
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not units:
        yield model
        return
    # The root decides at its first forward that it keeps its own weights after forward; a rollout may be that
    # first forward, and the setting changed below would hide the root from that decision: decide it now.
    units[0]._get_fsdp_state()._lazy_init()
    states = {id(s): s for s in (unit._get_fsdp_state() for unit in units)}.values()  # private: torch 2.13's FSDP2
    saved = [(s, s._auto_reshard_after_forward, [(g, g.post_forward_mesh_info) for g in s._fsdp_param_groups])
             for s in states]
    try:
        for unit in units:
            unit.set_reshard_after_forward(False, recurse=False)
            unit.unshard()
        yield model
    finally:
        for unit in units:
            unit.reshard()
        for state, auto, groups in saved:
            state._auto_reshard_after_forward = auto
            for group, mesh_info in groups:
                group.post_forward_mesh_info = mesh_info


def as_examples(prompts, completions):
    """Prompt + completion sequences shaped as SFT examples (data.tokenize_example, kind "sft"), for data.collate
    (packing=False) and models.token_logps: labels -100 on the prompt and the completion tokens on the completion,
    so exactly the completion tokens (its eos included) are scored, in order. prompts: one per completion, or one per
    group of adjacent completions (as `generate` lays them out)."""
    if not prompts or len(completions) % len(prompts):
        raise ValueError(f"{len(completions)} completions are not groups of {len(prompts)} prompts")
    group = len(completions) // len(prompts)
    examples = []
    for i, completion in enumerate(completions):
        prompt = list(prompts[i // group])
        if not prompt or not completion:  # the first token of a sequence is never scored: nothing predicts it
            raise ValueError(f"completion {i}: empty prompt or completion")
        examples.append({"input_ids": prompt + list(completion), "labels": [-100] * len(prompt) + list(completion),
                         "prompt_input_ids": prompt})
    return examples


def completion_rows(values, seq_ids, n_seqs, width=None):
    """Flat per-token values of sequences ([M], e.g. the log-probs models.token_logps returns, each sequence's tokens
    contiguous and in order) as rows: (padded [n_seqs, T] with 0 after each sequence's end, mask [n_seqs, T] float,
    1 on its tokens), T = width or the longest sequence. Differentiable in `values`. Pass width (max completion
    length, known from the examples) to spare a device sync."""
    counts = torch.bincount(seq_ids, minlength=n_seqs)
    width = int(counts.max()) if width is None else width
    starts = counts.cumsum(0) - counts
    positions = torch.arange(len(seq_ids), device=seq_ids.device) - starts[seq_ids]
    padded = values.new_zeros(n_seqs, width).index_put((seq_ids, positions), values)
    mask = (torch.arange(width, device=seq_ids.device) < counts[:, None]).to(values.dtype)
    return padded, mask
