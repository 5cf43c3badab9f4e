"""attention.py: varlen_attn (the segments of a packed batch, no mask) is the same maths as SDPA on padded batches,
keeps sequences apart, passes the CUDA kernel what each torch version takes, refuses what it cannot run, and traces
without graph breaks."""
import os

import pytest
import torch

import attention
import data
import models
import train
import utils
from config import load_config
from conftest import TINY, build, close_updates, one_sgd_step


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_varlen_attention_is_the_same_maths(kind, tiny_model_dir):
    """model.attn_implementation=varlen_attn (attention over each segment, no mask): one SGD step, packed and padded,
    gives the loss and update of the SDPA padded step; generate (no segments: SDPA with the mask) is unchanged."""
    common = ("total_batch_size=8", "max_length=128")
    sdpa, m_sdpa = one_sgd_step(kind, tiny_model_dir, *common)
    for packing in ("false", "true"):
        varlen, m = one_sgd_step(kind, tiny_model_dir, *common, "model.attn_implementation=varlen_attn", f"packing={packing}")
        assert m["loss"] == pytest.approx(m_sdpa["loss"], rel=1e-5), packing
        close_updates(varlen, sdpa)
    trainers_ = [build(kind, tiny_model_dir, *common, *extra) for extra in ([], ["model.attn_implementation=varlen_attn"])]
    batch = data.collate(trainers_[0].train_data[:4], trainers_[0].tokenizer.pad_token_id)
    outputs = [t.policy.generate(batch["prompt_input_ids"], attention_mask=batch["prompt_attention_mask"], do_sample=False,
                                 max_new_tokens=8, pad_token_id=t.tokenizer.pad_token_id) for t in trainers_]
    assert torch.equal(outputs[0], outputs[1])


def test_varlen_attention_keeps_sequences_apart(tiny_model_dir):
    """The same packed rows given as one segment per row attend across sequences: the test would see a leak."""
    trainer = build("dpo", tiny_model_dir, "model.attn_implementation=varlen_attn", "max_length=128")
    examples = trainer.train_data[:8]
    n_seqs = len(data.sequences_of(examples))
    packed = data.collate(examples, trainer.tokenizer.pad_token_id, packing=True, max_length=128)
    R, T = packed["input_ids"].shape
    rows = {**packed, "cu_seq_lens": torch.arange(0, R * T + 1, T, dtype=torch.int32), "max_seq_len": T}
    with torch.no_grad():
        want = models.batch_logps(trainer.policy, data.collate(examples, trainer.tokenizer.pad_token_id), n_seqs)
        torch.testing.assert_close(models.batch_logps(trainer.policy, packed, n_seqs), want, rtol=0, atol=1e-5)
        assert (models.batch_logps(trainer.policy, rows, n_seqs) - want).abs().max() > 1e-3


def test_varlen_batches_are_one_row_and_build_no_mask(tiny_model_dir):
    """With varlen_attn the segments keep sequences apart, so a packed batch is one row of every sequence (no row
    ends, no padding) with the log-probs of the padded batch, and the forward builds no [T, T] mask (varlen_mask:
    none without a padding mask or a cache; SDPA's with one, as generate needs)."""
    trainer = build("sft", tiny_model_dir, "packing=true", "max_length=128")
    examples = trainer.train_data[:8]
    batch = trainer.to_batch(examples)
    lengths = [len(ids) for ids, _ in data.sequences_of(examples)]
    assert trainer.policy.config._attn_implementation == attention.VARLEN_ATTN
    assert batch["input_ids"].shape == (1, sum(lengths)) and sum(lengths) > 128
    with torch.no_grad():
        want = models.batch_logps(trainer.policy, data.collate(examples, trainer.tokenizer.pad_token_id), len(lengths))
        torch.testing.assert_close(models.batch_logps(trainer.policy, batch, len(lengths)), want, rtol=0, atol=1e-5)
    assert attention.varlen_mask(batch_size=1, q_length=6, kv_length=6) is None
    padding = torch.tensor([[0, 1, 1, 1, 1, 1]], dtype=torch.bool)
    mask = attention.varlen_mask(batch_size=1, q_length=6, kv_length=6, attention_mask=padding)
    assert mask.shape == (1, 1, 6, 6) and not mask[0, 0, :, 0].any() and mask[0, 0, 5, 1:].all()
    cached = attention.varlen_mask(batch_size=1, q_length=2, kv_length=6, q_offset=4, allow_is_causal_skip=False)
    assert cached[0, 0].tolist() == [[True] * 5 + [False], [True] * 6]  # 2 queries after 4 cached keys: SDPA's mask


def fake_varlen_attn(new_signature):
    """A CPU stand-in for torch.nn.attention.varlen.varlen_attn (a CUDA kernel), with the arguments of torch >= 2.11
    (window_size, scale, enable_gqa) or of torch 2.10 (is_causal only), checking them as the kernel does."""
    def attend(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, gqa):
        assert q.shape[1] == k.shape[1] or gqa, "GQA without enable_gqa"
        assert torch.equal(cu_q, cu_k) and cu_q.dtype == torch.int32 and max_q == max_k == int(cu_q.diff().max())
        b = cu_q.tolist()
        return torch.cat([torch.nn.functional.scaled_dot_product_attention(
            *(x[s:e].transpose(0, 1) for x in (q, k, v)), is_causal=causal, scale=scale, enable_gqa=gqa).transpose(0, 1)
            for s, e in zip(b[:-1], b[1:])])
    if new_signature:
        return lambda q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False: attend(
            q, k, v, cu_q, cu_k, max_q, max_k, tuple(window_size) == (-1, 0), scale, enable_gqa)
    return lambda q, k, v, cu_q, cu_k, max_q, max_k, is_causal=False: attend(
        q, k, v, cu_q, cu_k, max_q, max_k, is_causal, None, False)


@pytest.mark.parametrize("new_signature", [True, False])
def test_flash_varlen_passes_what_each_torch_version_needs(new_signature, monkeypatch):
    """attention.flash_varlen (the CUDA path of varlen_attn): causal, the model's scale, GQA, for either kernel signature,
    against attention computed by hand over each segment."""
    import inspect

    fake = fake_varlen_attn(new_signature)
    monkeypatch.setattr(attention, "varlen_attn", fake)  # a test-only stand-in for the CUDA kernel
    monkeypatch.setattr(attention, "VARLEN_PARAMS", frozenset(inspect.signature(fake).parameters))
    torch.manual_seed(0)
    lengths, heads, kv_heads, dim, scale = [3, 5, 1, 7], 4, 2, 8, 0.3
    q, k, v = torch.randn(sum(lengths), heads, dim), torch.randn(sum(lengths), kv_heads, dim), torch.randn(sum(lengths), kv_heads, dim)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    got = attention.flash_varlen(q, k, v, cu, max(lengths), scale)
    want = []
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        kk, vv = (x[s:e].repeat_interleave(heads // kv_heads, dim=1) for x in (k, v))
        scores = torch.einsum("ihd,jhd->hij", q[s:e], kk) * scale
        scores = scores.masked_fill(torch.ones(e - s, e - s, dtype=torch.bool).triu(1), float("-inf"))
        want.append(torch.einsum("hij,jhd->ihd", scores.softmax(-1), vv))
    torch.testing.assert_close(got, torch.cat(want), rtol=1e-5, atol=1e-5)


def test_varlen_attention_refuses_what_it_cannot_run(tmp_path):
    with pytest.raises(utils.UserError, match="model.policy_dtype=bfloat16, or use sdpa"):
        attention.register_varlen_attention(torch.device("cuda"), "float32")  # refused before any GPU is touched
    with pytest.raises(utils.UserError, match="prefix_sharing=true with model.attn_implementation=varlen_attn runs on a "
                                              "CPU only"):
        attention.register_varlen_attention(torch.device("cuda"), "bfloat16", prefix_sharing=True)
    sliding = ("model.from_config={model_type: qwen2, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, "
               "num_attention_heads: 4, num_key_value_heads: 2, use_sliding_window: true, sliding_window: 8, "
               "max_window_layers: 0}")
    cfg = load_config(TINY["sft"], [sliding, "model.attn_implementation=varlen_attn", f"output_dirs={tmp_path}/run"])
    with pytest.raises(utils.UserError, match="sliding-window attention or softcapping: use sdpa"):
        train.build_trainer(cfg)
    assert not os.path.exists(tmp_path / "run")  # refused before the run folder is written


def test_flash_varlen_traces_without_graph_breaks():
    """compile=true on a GPU keeps whole layers in one graph: dynamo traces the kernel call (shapes on the meta
    device stand in for CUDA tensors; the kernel's fake implementation gives the output shape)."""
    q, kv = (torch.empty(16, h, 8, device="meta", dtype=torch.bfloat16) for h in (4, 2))
    cu = torch.empty(3, device="meta", dtype=torch.int32)
    whole = torch.compile(attention.flash_varlen, fullgraph=True, backend="eager")  # fullgraph: a graph break raises
    assert whole(q, kv, kv, cu, 11, 0.3).shape == (16, 4, 8)


def test_null_attention_is_varlen_for_packed_batches_on_a_cpu(tmp_path, tiny_model_dir):
    """model.attn_implementation=null: packed batches on a CPU get varlen_attn (also with prefix_sharing: shared keys
    per branch), not with compile (a graph break per layer), padded batches or a GPU; an explicit value is kept. A model with sliding windows
    falls back to SDPA instead of being refused (the refusal is for an explicit varlen_attn)."""
    cases = {(): None, ("packing=true",): attention.VARLEN_ATTN, ("packing=true", "prefix_sharing=true"): attention.VARLEN_ATTN,
             ("packing=true", "compile=true"): None, ("packing=true", "model.attn_implementation=eager"): "eager"}
    for overrides, want in cases.items():
        assert models.attention(load_config(TINY["sft"], list(overrides))) == want, overrides
    cfg = load_config(TINY["sft"], ["packing=true"])
    cfg.device = "cuda"  # what a GPU machine resolves to (nothing is built here)
    assert models.attention(cfg) is None
    assert build("sft", tiny_model_dir, "packing=true").policy.config._attn_implementation == attention.VARLEN_ATTN
    sliding = ("model.from_config={model_type: qwen2, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, "
               "num_attention_heads: 4, num_key_value_heads: 2, use_sliding_window: true, sliding_window: 8, "
               "max_window_layers: 0}")
    trainer = train.build_trainer(load_config(TINY["sft"], [sliding, "packing=true", f"output_dirs={tmp_path}/run"]))
    assert trainer.policy.config._attn_implementation == "sdpa"
