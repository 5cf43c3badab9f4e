"""Rollouts (rollouts.py): seeded sampling that leaves the global RNG alone, left padding that changes nothing,
eos cuts and truncation flags, the group layout, completions scored by the offline machinery (collate +
token_logps) exactly as a plain forward pass scores them, LoRA models, and FSDP2 weights gathered once per rollout."""
import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import data
import models
import rollouts
from conftest import ROOT, TINY_ARCH, run_cli

PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15]]  # different lengths: left padding in every batch
PAD = 0
SAMPLE = dict(max_new_tokens=8, temperature=1.0, top_p=1.0, eos_token_id=2, pad_token_id=PAD, micro_batch=4)
GREEDY = dict(SAMPLE, temperature=0.0)
ARCHS = {  # rotary positions are relative (llama, gpt_neox): gpt2's absolute ones also catch wrong position ids
    "llama": TINY_ARCH,
    "gpt_neox": dict(model_type="gpt_neox", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=256),
    "gpt2": dict(model_type="gpt2", n_embd=32, n_layer=2, n_head=4, n_positions=256),
}


def tiny(arch="llama", seed=0):
    """A random tiny model of `arch` (ARCHS) over the example tokenizer's 2048 ids (in train mode, as built)."""
    arch = dict(ARCHS[arch])
    config = AutoConfig.for_model(arch.pop("model_type"), vocab_size=2048, **arch)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


@pytest.fixture(scope="module")
def model():
    return tiny()


def run(model, prompts=PROMPTS, num_generations=2, seed=0, how=SAMPLE, **overrides):
    return rollouts.generate(model, prompts, num_generations=num_generations, seed=seed, **{**how, **overrides})


def test_same_seed_same_completions_whatever_the_global_rng(model):
    torch.manual_seed(1)
    first, _ = run(model, seed=7)
    torch.manual_seed(2)  # another global state: the rollout depends on its own seed alone
    again, _ = run(model, seed=7)
    other, _ = run(model, seed=8)
    assert first == again
    assert other != first
    assert len({tuple(c) for c in first}) == len(first)  # really sampled: the two samples of a prompt differ


def test_model_generation_config_knobs_do_not_apply(model):
    """Sampling is softmax(logits / temperature) within top_p whatever the model's generation_config ships (top_k 1
    would make it greedy, min_p 0.9 nearly so, a repetition penalty would change it): the losses assume so."""
    import copy
    knobs = copy.deepcopy(model)
    knobs.generation_config.update(top_k=1, min_p=0.9, repetition_penalty=5.0, no_repeat_ngram_size=1)
    assert run(knobs, seed=3) == run(model, seed=3)
    assert run(knobs, seed=3, how=GREEDY) == run(model, seed=3, how=GREEDY)


def test_global_rng_left_exactly_as_it_was(model):
    torch.manual_seed(3)
    state = torch.get_rng_state()
    expected = torch.rand(4)
    torch.set_rng_state(state)
    run(model, seed=11)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(torch.rand(4), expected)


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_left_padded_batch_equals_each_prompt_alone(arch):
    """Three prompts of different lengths in one batch (micro_batch 4: a batch of 4 and one of 2) give what each
    gives alone: padding is kept out of attention and positions."""
    model = tiny(arch)
    batched, _ = run(model, how=GREEDY)
    alone = [run(model, [p], num_generations=1, how=GREEDY)[0][0] for p in PROMPTS]
    assert batched == [c for c in alone for _ in range(2)]  # also the layout: prompt p's completions adjacent


def test_num_generations_layout_and_micro_batches(model):
    """G completions per prompt, prompt 0's first; micro_batch changes how many run together, not what comes out
    (greedy), including a micro-batch that splits a group."""
    completions, truncated = run(model, num_generations=3, how=GREEDY, micro_batch=2)
    assert len(completions) == len(truncated) == 9
    alone = [run(model, [p], num_generations=1, how=GREEDY)[0][0] for p in PROMPTS]
    assert completions == [alone[i // 3] for i in range(9)]
    assert run(model, num_generations=3, how=GREEDY, micro_batch=9)[0] == completions
    assert len({tuple(c) for c in alone}) == 3


@pytest.mark.parametrize("pad", [PAD, "eos"])
def test_cut_after_first_eos_and_truncated_flags(model, pad):
    """eos = a token the greedy model emits third in prompt 0's completion: that completion ends there (eos kept),
    the others at their own first eos or, without one, at max_new_tokens, flagged truncated. pad == eos (a tokenizer
    without pad token) also works: what follows an eos is padding."""
    never = 1  # bos: checked below never to come
    free, truncated = run(model, how=GREEDY, eos_token_id=never)
    assert all(len(c) == 8 for c in free) and all(truncated) and never not in sum(free, [])
    eos = free[0][2]
    got, truncated = run(model, how=GREEDY, eos_token_id=eos, pad_token_id=eos if pad == "eos" else PAD)
    expected = [c[:c.index(eos) + 1] if eos in c else c for c in free]
    assert got == expected
    assert truncated == [eos not in c for c in free]
    assert len(got[0]) <= 3 and got[0][-1] == eos and not truncated[0]
    assert any(truncated)  # both kinds of row seen
    sampled, truncated = run(model, eos_token_id=[eos, never], max_new_tokens=30)  # a list of eos ids, sampled
    for completion, cut in zip(sampled, truncated):
        assert cut == (eos not in completion) and (cut == (len(completion) == 30))
        assert eos not in completion[:-1]


def test_train_mode_restored_per_module(model):
    model.train()
    model.model.layers[0].eval()  # a submodule in its own mode stays so
    seen = []
    hook = model.register_forward_pre_hook(lambda m, args: seen.append(m.training))
    try:
        run(model, how=GREEDY, max_new_tokens=2)
    finally:
        hook.remove()
    assert seen and not any(seen)  # generation ran in eval mode
    assert model.training and not model.model.layers[0].training and model.model.layers[1].training
    model.eval()
    run(model, how=GREEDY, max_new_tokens=2)
    assert not model.training


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated")  # peft's call, not ours
def test_peft_lora_model_generates_with_its_adapter():
    """PeftModel.generate: greedy completions of the LoRA model equal its merged model's, and differ from the base's
    (the adapter, randomly initialised, takes part); gathered() is a no-op for a model without FSDP units."""
    import copy

    import peft
    base = tiny()
    config = peft.LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj", "down_proj"],
                             init_lora_weights=False)
    lora = peft.get_peft_model(copy.deepcopy(base), config)
    with rollouts.gathered(lora) as same:
        assert same is lora
        got, _ = run(lora, how=GREEDY)
    sampled = run(lora, seed=5)[0]
    merged = copy.deepcopy(lora).merge_and_unload()
    assert got == run(merged, how=GREEDY)[0]
    assert got != run(base, how=GREEDY)[0]
    assert sampled == run(lora, seed=5)[0]


def direct_logps(model, prompt, completion):
    """Log-probs of the completion's tokens from a forward pass over the unpadded sequence alone."""
    ids = torch.tensor([prompt + completion])
    logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(completion)[:, None])[:, 0]


def test_as_examples_collate_token_logps_match_a_direct_forward(model):
    """Completions of several lengths (some cut by eos) as SFT-shaped examples: collate (right padding) and
    token_logps give each completion token's log-prob, in order, equal to a plain forward pass to 1e-5; the [N, T]
    rows put them at positions 0 .. len - 1 with mask 1 there and 0 after."""
    free, _ = run(model, how=GREEDY, eos_token_id=1)
    completions, _ = run(model, how=GREEDY, eos_token_id=free[0][2])
    lengths = [len(c) for c in completions]
    assert len(set(lengths)) > 1
    examples = rollouts.as_examples(PROMPTS, completions)
    assert examples[3] == {"input_ids": PROMPTS[1] + completions[3], "prompt_input_ids": PROMPTS[1],
                           "labels": [-100] * len(PROMPTS[1]) + completions[3]}
    assert [data.label_count(ex["labels"]) for ex in examples] == lengths  # every completion token scored
    batch = data.collate(examples, PAD, packing=False, max_length=64)
    model.eval()
    with torch.no_grad():
        logps, seq_ids, _ = models.token_logps(model, batch)
        rows, mask = rollouts.completion_rows(logps, seq_ids, batch["n_seqs"])
        assert rows.shape == mask.shape == (6, max(lengths))
        for i, (prompt, completion) in enumerate(zip((p for p in PROMPTS for _ in range(2)), completions)):
            torch.testing.assert_close(rows[i, :len(completion)], direct_logps(model, prompt, completion),
                                       rtol=0, atol=1e-5)
            assert rows[i, len(completion):].eq(0).all()
    assert mask.tolist() == [[1.0] * n + [0.0] * (max(lengths) - n) for n in lengths]
    assert rollouts.as_examples([p for p in PROMPTS for _ in range(2)], completions) == examples  # one per completion
    with pytest.raises(ValueError, match="groups"):
        rollouts.as_examples(PROMPTS[:2], completions[:3])


def test_completion_rows_layout_width_and_gradient():
    values = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], requires_grad=True)
    seq_ids = torch.tensor([0, 0, 0, 2, 3, 3])  # sequence 1 has no token
    rows, mask = rollouts.completion_rows(values, seq_ids, 4)
    assert rows.tolist() == [[1, 2, 3], [0, 0, 0], [4, 0, 0], [5, 6, 0]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 0], [1, 0, 0], [1, 1, 0]]
    (rows * torch.arange(1.0, 13.0).view(4, 3)).sum().backward()  # each value's gradient: its own cell's weight
    assert values.grad.tolist() == [1, 2, 3, 7, 10, 11]
    wide, wide_mask = rollouts.completion_rows(values.detach(), seq_ids, 4, width=5)
    assert wide.shape == (4, 5) and torch.equal(wide[:, :3], rows.detach()) and wide_mask.sum() == 6


# Two gloo processes: the same model sharded (sharding.shard_model) and whole, also as a LoRA model; FSDP's all-gathers
# counted. Rank 0's first micro-batch (prompt 0's two completions) stops at its eos after 2 tokens, rank 1's run on.
FSDP_SCRIPT = """
import copy, json, os, sys
sys.path.insert(0, sys.argv[1])
import peft, torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, OffloadPolicy
from torch.distributed.fsdp._fully_shard import _fsdp_param_group
from transformers import AutoModelForCausalLM
import data, models, rollouts, sharding
torch.set_num_threads(1)
dist.init_process_group("gloo")
rank, mesh = dist.get_rank(), init_device_mesh("cpu", (2,))
def shard(model):
    sharding.shard_model(model, sharding.find_block_class(model, None), mesh, MixedPrecisionPolicy(), OffloadPolicy())
    return model
plain = AutoModelForCausalLM.from_pretrained(sys.argv[2])
sharded = shard(copy.deepcopy(plain))
units = [m for m in sharded.modules() if isinstance(m, FSDPModule)]
gathers = [0]
real = _fsdp_param_group.foreach_all_gather
def counted(*args, **kwargs):
    gathers[0] += 1
    return real(*args, **kwargs)
_fsdp_param_group.foreach_all_gather = counted
prompts = [[5 + rank, 6, 7, 8], [9, 10 + rank]]  # each process its own prompts
how = dict(num_generations=2, max_new_tokens=6, temperature=0.0, top_p=1.0, pad_token_id=0, seed=rank, micro_batch=2)
free, _ = rollouts.generate(plain, prompts, eos_token_id=1, **how)
how["eos_token_id"] = free[0][1] if rank == 0 else 1
expected, _ = rollouts.generate(plain, prompts, **how)
with rollouts.gathered(sharded):
    once, _ = rollouts.generate(sharded, prompts, synced=True, **how)
out = {"units": len(units), "gathered": gathers[0], "equal": once == expected, "short": len(expected[0])}
groups = [g for u in units for g in u._get_fsdp_state()._fsdp_param_groups]
out["resharded"] = not any(g.is_unsharded for g in groups)
out["keeps_after_forward"] = [g.post_forward_mesh_info is None for g in groups]
gathers[0] = 0
with rollouts.gathered(sharded):  # no collective inside: each process may stop on its own
    out["unsynced_equal"] = rollouts.generate(sharded, prompts, synced=False, **how)[0] == expected
out["unsynced_gathered"], gathers[0] = gathers[0], 0
out["per_token_equal"] = rollouts.generate(sharded, prompts, synced=True, **how)[0] == expected
out["per_token"] = gathers[0]
batch = data.collate(rollouts.as_examples(prompts, once), 0)
with torch.no_grad():
    out["logps_equal"] = torch.equal(models.token_logps(sharded, batch)[0], models.token_logps(plain, batch)[0])
torch.manual_seed(0)
lora = peft.get_peft_model(plain, peft.LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights=False))
lora_expected = rollouts.generate(lora, prompts, **how)[0]
lora = shard(lora)
with rollouts.gathered(lora):
    out["lora_equal"] = rollouts.generate(lora, prompts, synced=True, **how)[0] == lora_expected
try:  # PeftModel.generate skips the root unit's forward hook: its weights (the final norm) stay sharded
    rollouts.generate(lora, prompts, synced=True, **how)
    out["lora_alone"] = "ran"
except RuntimeError as e:
    out["lora_alone"] = str(e)
with open(os.path.join(sys.argv[3], f"rank{rank}.json"), "w") as f:
    json.dump(out, f)
dist.destroy_process_group()
import train
train.end_process(0)  # no interpreter teardown of torch's threads (it has aborted finished ranks)
"""


def test_fsdp_gathers_weights_once_per_rollout(tiny_model_dir, tmp_path):
    """2 processes, different prompts, rank 0's first generate call done early: inside gathered(), one all-gather
    per FSDP unit for a whole rollout of 2 generate calls x 6 tokens (the control without it: one per block per
    forward), synced or not (no collective runs inside); greedy completions equal the unsharded model's; afterwards
    the units are resharded with their own reshard-after-forward settings (the root, whose first forward this rollout
    was, keeps its weights as FSDP decides for it), and a forward pass scores like the unsharded model. A sharded LoRA
    model generates inside gathered() only."""
    script = tmp_path / "rollout_fsdp.py"
    script.write_text(FSDP_SCRIPT)
    proc = run_cli("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script), ROOT,
                   tiny_model_dir, str(tmp_path), timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in range(2):
        out = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert out["units"] == 5  # 2 blocks, the untied embedding and head, the root (final norm)
        assert out["gathered"] == out["unsynced_gathered"] == out["units"], out
        assert out["per_token"] == 1 + 4 * 2 * 6, out  # the root once, then the 4 other units at every forward
        assert out["equal"] and out["unsynced_equal"] and out["per_token_equal"] and out["logps_equal"], out
        assert out["lora_equal"] and "DTensor" in out["lora_alone"], out
        assert out["resharded"], out
        assert out["keeps_after_forward"] == [True] + [False] * 4, out  # the root first (modules() order)
    assert json.loads((tmp_path / "rank0.json").read_text())["short"] == 2


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.5, 1.0), (1.0, 0.8)])
def test_row_sampler_draws_from_softmax_within_top_p(temperature, top_p):
    """RowSampler, 20000 rows with their own seeds on one set of logits: the tokens' frequencies are softmax(logits /
    temperature) renormalised within top_p (transformers' nucleus: the smallest set whose mass reaches top_p), to
    within 4 standard errors; a token outside the nucleus is never drawn; each row keeps exactly one token."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]]).repeat(20000, 1)
    sampler = rollouts.RowSampler(range(20000), temperature, top_p, torch.device("cpu"))
    out = sampler(None, logits.clone())
    assert (torch.isfinite(out).sum(1) == 1).all()
    counts = torch.bincount(out.argmax(1), minlength=5).double()
    p = torch.softmax(logits[0].double() / temperature, 0)
    if top_p < 1:  # [0.61, 0.22, 0.14, ...]: the nucleus of 0.8 is the first three tokens
        keep = torch.cumsum(p, 0) - p < top_p
        p = torch.where(keep, p, 0.0) / p[keep].sum()
    stderr = (p * (1 - p) / 20000).sqrt()
    assert ((counts / 20000 - p).abs() <= 4 * stderr + 1e-12).all(), (counts / 20000, p)
    again = rollouts.RowSampler(range(20000), temperature, top_p, torch.device("cpu"))(None, logits.clone())
    assert torch.equal(again, out)  # each row's own generator: the same draws
