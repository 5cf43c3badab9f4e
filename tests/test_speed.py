"""Speed features that must not change the maths: packing, precomputed (cached) reference log-probs, log-probs at
label positions only, length-grouped batches, torch.compile; and the FLOP count behind the logged MFU."""
import os

import pytest
import torch

import data
import models
import utils
from conftest import run_cli
from test_train import TINY, build, one_sgd_step, params_of, read_jsonl


def close_updates(a, b, rtol=1e-4):
    largest = max(v.abs().max().item() for v in b.values())
    for k in b:
        assert (a[k] - b[k]).abs().max().item() <= rtol * largest, k


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_packed_log_probs_equal_padded(kind, tiny_model_dir):
    """Per-sequence log-probs of 8 examples: packed rows (no mask, restarting positions) == one padded row each."""
    trainer = build(kind, tiny_model_dir, "max_length=128")
    examples = trainer.train_data[:8]
    n_seqs = len(data.sequences_of(examples))
    pad = trainer.tokenizer.pad_token_id
    padded = data.collate(examples, pad)
    packed = data.collate(examples, pad, packing=True, max_length=128)
    assert packed["input_ids"].shape[0] <= n_seqs // 2  # really packed: several sequences share each row
    with torch.no_grad():
        want = models.batch_logps(trainer.policy, padded, n_seqs)
        got = models.batch_logps(trainer.policy, packed, n_seqs)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        # the control: the same packed rows with a plain causal mask attend across sequences, and the test sees it
        leaky = {**{k: v for k, v in packed.items() if k != "position_ids"}, "attention_mask": torch.ones_like(packed["input_ids"])}
        assert (models.batch_logps(trainer.policy, leaky, n_seqs) - want).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_packed_step_matches_padded_step(kind, tiny_model_dir):
    """One SGD step: the same loss, metrics and parameter update (the gradients) with and without packing."""
    padded, m_padded = one_sgd_step(kind, tiny_model_dir, "total_batch_size=8", "gradient_accumulation_steps=2")
    packed, m_packed = one_sgd_step(kind, tiny_model_dir, "total_batch_size=8", "gradient_accumulation_steps=2",
                                    "packing=true", "max_length=128")
    for key in ("loss", "logps/chosen", "rewards/margins", "logits/chosen") if kind == "dpo" else ("loss",):
        assert m_packed[key] == pytest.approx(m_padded[key], rel=1e-5, abs=1e-7), key
    close_updates(packed, padded)


def test_logits_only_at_label_positions_and_no_float32_copy(tiny_model_dir):
    """bfloat16 DPO step: the vocabulary projection runs only where the next token is a label, and autograd keeps no
    float32 tensor of vocabulary width (the chunked log-softmax recomputes it in backward)."""
    trainer = build("dpo", tiny_model_dir, "model.policy_dtype=bfloat16", "total_batch_size=4")
    examples = next(trainer.global_batches())
    batch = trainer.to_batch(examples)
    n_labels = int((batch["labels"][:, 1:] != -100).sum())
    assert n_labels < 0.7 * batch["input_ids"].numel()
    vocab = trainer.policy.config.vocab_size
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append((t.dtype, tuple(t.shape))) or t, lambda t: t):
        trainer.train_step(examples)
    hidden = trainer.policy.config.hidden_size
    wide = [s for s in saved if s[1] and s[1][-1] == vocab and s[1] != (hidden, vocab)]  # not the head's weight
    assert wide and all(dtype == torch.bfloat16 and shape[0] == n_labels for dtype, shape in wide), wide


def test_logit_metrics_are_mean_logits_over_label_positions(tiny_model_dir):
    """logits/chosen and logits/rejected (TRL's names): the mean logit over the label positions of each side, checked
    against a plain full-vocabulary forward of the padded rows."""
    trainer = build("dpo", tiny_model_dir, "total_batch_size=4", "packing=true")
    examples = next(trainer.global_batches())
    padded = data.collate(examples, trainer.tokenizer.pad_token_id)
    with torch.no_grad():
        logits = trainer.policy(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits.double()
    scored = padded["labels"][:, 1:] != -100
    want = {side: logits[rows, :-1][scored[rows]].mean().item() for side, rows in (("chosen", slice(0, 4)), ("rejected", slice(4, 8)))}
    metrics, *_ = trainer.train_step(examples)
    assert metrics["logits/chosen"] == pytest.approx(want["chosen"], rel=1e-5)
    assert metrics["logits/rejected"] == pytest.approx(want["rejected"], rel=1e-5)


def test_precomputed_reference_is_the_same_maths_and_cached(tiny_model_dir, tmp_path, capsys):
    cache = f"reference_cache_dir={tmp_path}"
    online, m_online = one_sgd_step("dpo", tiny_model_dir)
    trainer = build("dpo", tiny_model_dir, "optimizer=SGD", "lr=1.0", "warmup_steps=0", "max_grad_norm=0",
                    "total_batch_size=4", "precompute_reference_logps=true", cache, "n_examples=40", "n_epochs=null")
    before = params_of(trainer.policy)
    trainer.precompute_reference_logps()
    m_pre, *_ = trainer.train_step(next(trainer.global_batches()))
    precomputed = {k: v - before[k] for k, v in params_of(trainer.policy).items()}
    assert m_pre["loss"] == pytest.approx(m_online["loss"], rel=1e-5)  # log 2 only if reference == policy at step 1
    close_updates(precomputed, online)
    assert "40 computed" in capsys.readouterr().out and len(os.listdir(tmp_path)) == 1

    trainer = build("dpo", tiny_model_dir, "precompute_reference_logps=true", cache, "n_examples=40", "n_epochs=null")
    reference = trainer.reference.model
    trainer.precompute_reference_logps()
    assert trainer.reference.model is None  # freed
    assert "40 from the cache, 0 computed" in capsys.readouterr().out
    used = [ex for ex in trainer.train_data if "reference_logps" in ex]
    assert len(used) == 40
    batch = data.collate(used[:5], trainer.tokenizer.pad_token_id)
    with torch.no_grad():
        direct = models.batch_logps(reference, batch, 10)
    torch.testing.assert_close(torch.tensor([ex["reference_logps"] for ex in used[:5]]).T.flatten(), direct,
                               rtol=0, atol=1e-5)

    # other reference weights or other truncation: another cache file, computed afresh
    for overrides, change_weights in (([], True), (["max_length=120"], False)):
        trainer = build("dpo", tiny_model_dir, "precompute_reference_logps=true", cache, "n_examples=40",
                        "n_epochs=null", *overrides)
        if change_weights:
            with torch.no_grad():
                trainer.reference.model.model.norm.weight.mul_(1.5)
        trainer.precompute_reference_logps()
        assert "0 from the cache, 40 computed" in capsys.readouterr().out
    assert len(os.listdir(tmp_path)) == 3

    # a corrupt cache file costs a recomputation (and a warning), never the run
    for name in os.listdir(tmp_path):
        (tmp_path / name).write_bytes(b"not a cache")
    trainer = build("dpo", tiny_model_dir, "precompute_reference_logps=true", cache, "n_examples=40", "n_epochs=null")
    trainer.precompute_reference_logps()
    out = capsys.readouterr().out
    assert "is unreadable (UnpicklingError): recomputing it" in out and "0 from the cache, 40 computed" in out

    # nor does a cache folder that cannot be written (here: a file stands where the folder should be)
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    trainer = build("dpo", tiny_model_dir, "precompute_reference_logps=true", f"reference_cache_dir={blocked}",
                    "n_examples=40", "n_epochs=null")
    trainer.precompute_reference_logps()
    assert "could not write the reference log-prob cache" in capsys.readouterr().out and trainer.reference.model is None
    assert sum("reference_logps" in ex for ex in trainer.train_data) == 40  # the run goes on with the computed values


def test_group_by_length_is_a_deterministic_shuffle_of_similar_lengths(tiny_model_dir):
    plain = build("sft", tiny_model_dir, "total_batch_size=4")
    grouped = build("sft", tiny_model_dir, "total_batch_size=4", "group_by_length=true")
    order = grouped.epoch_order(0)
    assert sorted(order) == list(range(len(grouped.train_data))) and order == grouped.epoch_order(0)
    assert order != grouped.epoch_order(1) and order != plain.epoch_order(0)

    def spread(trainer, order):  # mean (longest - shortest) within a global batch: the padding it costs
        lengths = [data.example_length(trainer.train_data[i]) for i in order]
        batches = [lengths[i:i + 4] for i in range(0, len(lengths) - 3, 4)]
        return sum(max(b) - min(b) for b in batches) / len(batches)
    assert spread(grouped, order) < 0.3 * spread(plain, plain.epoch_order(0))
    first = [data.example_length(grouped.train_data[i]) for i in order[:64 * 4:4]]
    assert first != sorted(first, reverse=True)  # the batches themselves still come in random order


def test_model_flops_hand_computed(tiny_model_dir):
    trainer = build("dpo", tiny_model_dir)
    V = trainer.policy.config.vocab_size
    # llama, hidden 32, kv 2 x 8 dims, MLP 64, 2 layers, untied head: per layer q, o 32x32; k, v 32x16; MLP 3 x 32x64;
    # two norms of 32. Plus the final norm.
    body = 2 * (2 * 32 * 32 + 2 * 32 * 16 + 3 * 32 * 64 + 2 * 32) + 32
    assert trainer.flop_shape == (body, V * 32, 2, 32)
    examples = [{"chosen_input_ids": [1, 2, 3], "chosen_labels": [-100, -100, 5],
                 "rejected_input_ids": [1, 4], "rejected_labels": [-100, 6]}]
    # 5 real tokens, 2 labels, sequence lengths 3 and 2
    forward = 2 * body * 5 + 2 * V * 32 * 2 + 2 * 2 * 32 * (3 ** 2 + 2 ** 2)
    seqs = data.sequences_of(examples)
    assert models.model_flops(trainer.flop_shape, seqs, with_reference=False) == (5, 3 * forward)
    assert models.model_flops(trainer.flop_shape, seqs, with_reference=True) == (5, 4 * forward)


def test_peak_flops_known_gpus_only(monkeypatch):
    assert models.peak_flops(torch.device("cpu"), torch.bfloat16) is None
    for name, want in (("NVIDIA H100 80GB HBM3", 989.4e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA A100-SXM4-80GB", 312e12),
                       ("Some Future GPU", None)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device, name=name: name)
        assert models.peak_flops(torch.device("cuda"), torch.bfloat16) == want
    assert models.peak_flops(torch.device("cuda"), torch.float32) is None  # no tensor-core peak to divide by


def test_compile_option_compiles_policy_and_reference_in_place(tiny_model_dir):
    """compile=true: both models compiled in place (same classes, so saving is unchanged). A compiled step takes ~100 s
    to compile on this CPU, so its numbers are checked in bench/gpu.py rather than here."""
    plain, compiled = build("dpo", tiny_model_dir), build("dpo", tiny_model_dir, "compile=true")
    assert plain.policy._compiled_call_impl is None and plain.reference.model._compiled_call_impl is None
    assert compiled.policy._compiled_call_impl is not None and compiled.reference.model._compiled_call_impl is not None
    assert type(compiled.policy) is type(plain.policy)


def test_tiny_dpo_learns_with_every_speed_option(tmp_path):
    run = tmp_path / "run"
    proc = run_cli("train.py", TINY["dpo"], "--overrides", f"output_dirs={run}", "packing=true", "group_by_length=true",
                   "precompute_reference_logps=true", f"reference_cache_dir={tmp_path / 'cache'}",
                   "model.policy_dtype=bfloat16", "model.reference_dtype=bfloat16")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "reference log-probs: 0 from the cache, 500 computed" in proc.stdout
    metrics = read_jsonl(run / "metrics.jsonl")
    assert [m for m in metrics if "eval/rewards/accuracies" in m][-1]["eval/rewards/accuracies"] >= 0.9
    assert all(m["tokens_per_second"] > 0 and "mfu" not in m for m in metrics if "loss" in m)  # no peak known on CPU


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


def test_batch_lengths_rounded_where_kernels_plan_per_shape(tiny_model_dir):
    """GPUs with SDPA: lengths rounded to 64 (cuDNN plans per shape); with varlen_attn, or on a CPU, not rounded."""
    gpu, cpu = torch.device("cuda"), torch.device("cpu")  # device objects only: no GPU is touched
    sdpa = build("sft", tiny_model_dir).policy
    varlen = build("sft", tiny_model_dir, "model.attn_implementation=varlen_attn").policy
    assert [models.length_multiple(d, m) for d, m in ((gpu, sdpa), (gpu, varlen), (cpu, sdpa))] == [64, 1, 1]


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
    """models.flash_varlen (the CUDA path of varlen_attn): causal, the model's scale, GQA, for either kernel signature,
    against attention computed by hand over each segment."""
    import inspect

    fake = fake_varlen_attn(new_signature)
    monkeypatch.setattr(models, "varlen_attn", fake)  # a test-only stand-in for the CUDA kernel
    monkeypatch.setattr(models, "VARLEN_PARAMS", frozenset(inspect.signature(fake).parameters))
    torch.manual_seed(0)
    lengths, heads, kv_heads, dim, scale = [3, 5, 1, 7], 4, 2, 8, 0.3
    q, k, v = torch.randn(sum(lengths), heads, dim), torch.randn(sum(lengths), kv_heads, dim), torch.randn(sum(lengths), kv_heads, dim)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    got = models.flash_varlen(q, k, v, cu, max(lengths), scale)
    want = []
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        kk, vv = (x[s:e].repeat_interleave(heads // kv_heads, dim=1) for x in (k, v))
        scores = torch.einsum("ihd,jhd->hij", q[s:e], kk) * scale
        scores = scores.masked_fill(torch.ones(e - s, e - s, dtype=torch.bool).triu(1), float("-inf"))
        want.append(torch.einsum("hij,jhd->ihd", scores.softmax(-1), vv))
    torch.testing.assert_close(got, torch.cat(want), rtol=1e-5, atol=1e-5)


def test_varlen_attention_refuses_what_it_cannot_run(tmp_path):
    import train
    with pytest.raises(utils.UserError, match="model.policy_dtype=bfloat16, or use sdpa"):
        models.register_varlen_attention(torch.device("cuda"), "float32")  # refused before any GPU is touched
    sliding = ("model.from_config={model_type: qwen2, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, "
               "num_attention_heads: 4, num_key_value_heads: 2, use_sliding_window: true, sliding_window: 8, "
               "max_window_layers: 0}")
    cfg = utils.load_config(TINY["sft"], [sliding, "model.attn_implementation=varlen_attn", f"output_dirs={tmp_path}/run"])
    with pytest.raises(utils.UserError, match="sliding-window attention or softcapping: use sdpa"):
        train.build_trainer(cfg)
    assert not os.path.exists(tmp_path / "run")  # refused before the run folder is written


def test_flash_varlen_traces_without_graph_breaks():
    """compile=true on a GPU keeps whole layers in one graph: dynamo traces the kernel call (shapes on the meta
    device stand in for CUDA tensors; the kernel's fake implementation gives the output shape)."""
    q, kv = (torch.empty(16, h, 8, device="meta", dtype=torch.bfloat16) for h in (4, 2))
    cu = torch.empty(3, device="meta", dtype=torch.int32)
    whole = torch.compile(models.flash_varlen, fullgraph=True, backend="eager")  # fullgraph: a graph break raises
    assert whole(q, kv, kv, cu, 11, 0.3).shape == (16, 4, 8)
