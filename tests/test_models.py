"""models.py: loading (archives, dropout), length rounding, the forward to log-probs (packed equals
padded, logits only at label positions), the FSDP block class, the tied export, and the FLOP count behind the MFU."""
import os
import pickle

import pytest
import torch
from transformers import AutoModelForCausalLM

import checkpoints
import data
import flops
import models
import sharding
import train
from config import load_config
from utils import UserError
from conftest import TIED, TINY, assert_one_line_error, build, local_model_overrides, run_cli


# ---- loading: archives, dropout ----
def test_archive_pt_state_dict_and_malicious_pickle(tmp_path, tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
    good = tmp_path / "policy.pt"
    torch.save({"state": model.state_dict(), "step_idx": 3}, good)  # the original project's archive layout
    trainer = build("dpo", tiny_model_dir, f"model.archive={good}")
    for k, v in model.state_dict().items():
        assert torch.equal(trainer.policy.state_dict()[k], v) and torch.equal(trainer.reference.model.state_dict()[k], v)

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path}/pwned",))
    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as f:
        pickle.dump({"state": Exploit()}, f)
    proc = run_cli("train.py", "example/tiny-dpo.yml", "--overrides", f"model.archive={evil}",
                   f"output_dirs={tmp_path}/run", *local_model_overrides(tiny_model_dir))
    assert_one_line_error(proc, str(evil), "refused")
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "run").exists()


def test_dropout_is_disabled(tmp_path):
    """A config asking for dropout still trains deterministically: two train-mode forwards agree exactly."""
    cfg = load_config(TINY["dpo"], ["model.from_config.attention_dropout=0.5", "n_eval_examples=0",
                                          f"output_dirs={tmp_path}"])
    trainer = train.build_trainer(cfg)
    assert trainer.policy.config.attention_dropout == 0.0
    trainer.policy.train()
    batch = trainer.to_batch(trainer.train_data[:4])
    with torch.no_grad():
        first, second = (trainer.policy(input_ids=batch["input_ids"], use_cache=False).logits for _ in range(2))
    assert torch.equal(first, second)


def test_batch_lengths_rounded_where_kernels_plan_per_shape(tiny_model_dir):
    """GPUs with SDPA: lengths rounded to 64 (cuDNN plans per shape); with varlen_attn, or on a CPU, not rounded."""
    gpu, cpu = torch.device("cuda"), torch.device("cpu")  # device objects only: no GPU is touched
    sdpa = build("sft", tiny_model_dir).policy
    varlen = build("sft", tiny_model_dir, "model.attn_implementation=varlen_attn").policy
    assert [models.length_multiple(d, m) for d, m in ((gpu, sdpa), (gpu, varlen), (cpu, sdpa))] == [64, 1, 1]


# ---- forward to log-probs ----
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


# ---- sharding and export ----
def test_block_class_detected_or_named(tiny_model_dir):
    """In process (the error travels as every UserError does: one line, exit 2, as test_fsdp.py's CLI tests show)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert sharding.find_block_class(model, None).__name__ == "LlamaDecoderLayer"   # from model._no_split_modules
    assert sharding.find_block_class(model, "LlamaMLP").__name__ == "LlamaMLP"
    with pytest.raises(UserError) as e:
        sharding.find_block_class(model, "GPT2Block")
    message = str(e.value)
    assert "\n" not in message and "fsdp.block_class='GPT2Block'" in message and "LlamaDecoderLayer" in message


def test_export_keeps_tied_weights_once(tmp_path):
    """A bf16 export of a tied-embedding model: the same tensors and bytes as a plain save_pretrained of it."""
    from safetensors.torch import load_file
    cfg = load_config(TINY["sft"], ["model.policy_dtype=bfloat16", f"model.from_config={TIED}",
                                          "n_eval_examples=0", f"output_dirs={tmp_path}/run"])
    trainer = train.build_trainer(cfg)
    exported = checkpoints.save(trainer, "final")
    plain = tmp_path / "plain"
    AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).to(torch.bfloat16).save_pretrained(plain)
    ours, theirs = (load_file(os.path.join(p, "model.safetensors")) for p in (exported, plain))
    assert sorted(ours) == sorted(theirs) and "lm_head.weight" not in ours
    assert os.path.getsize(os.path.join(exported, "model.safetensors")) == os.path.getsize(plain / "model.safetensors")
    reloaded = AutoModelForCausalLM.from_pretrained(exported)
    assert reloaded.get_output_embeddings().weight is reloaded.get_input_embeddings().weight


# ---- FLOPs ----
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
    assert flops.model_flops(trainer.flop_shape, seqs, with_reference=False) == (5, 3 * forward)
    assert flops.model_flops(trainer.flop_shape, seqs, with_reference=True) == (5, 4 * forward)
    assert flops.model_flops(trainer.flop_shape, seqs, with_reference=True, backward=False) == (5, 2 * forward)  # no grad


def test_peak_flops_known_gpus_only(monkeypatch):
    assert flops.peak_flops(torch.device("cpu"), torch.bfloat16) is None
    for name, want in (("NVIDIA H100 80GB HBM3", 989.4e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA A100-SXM4-80GB", 312e12),
                       ("Some Future GPU", None)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device, name=name: name)
        assert flops.peak_flops(torch.device("cuda"), torch.bfloat16) == want
    assert flops.peak_flops(torch.device("cuda"), torch.float32) is None  # no tensor-core peak to divide by


def test_checkpoint_names_revert_renames_and_refuse_tensor_conversions():
    """sharding.checkpoint_names (the sharded export's names): a tie kept once; GPT-NeoX's head under its published
    name; None (gather instead) for a model whose published format transformers converts tensor by tensor (Mixtral's
    experts, fused on load)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=64,
                 pad_token_id=0, bos_token_id=1, eos_token_id=2)
    built = {}
    for name, extra in (("llama", dict(tie_word_embeddings=True)), ("gpt_neox", {}),
                        ("mixtral", dict(num_local_experts=2, num_experts_per_tok=1))):
        built[name] = AutoModelForCausalLM.from_config(AutoConfig.for_model(name, **small, **extra))
    tied = dict(built["llama"].named_parameters(remove_duplicate=False))  # both names, as a sharded state dict has
    assert tied["lm_head.weight"] is tied["model.embed_tokens.weight"]
    n_tied = len(tied)
    names = sharding.checkpoint_names(built["llama"], tied)
    assert len(names) == n_tied - 1 and ("lm_head.weight" in names) != ("model.embed_tokens.weight" in names)
    neox = sharding.checkpoint_names(built["gpt_neox"], built["gpt_neox"].state_dict())
    assert "embed_out.weight" in neox and "lm_head.weight" not in neox
    assert sharding.checkpoint_names(built["mixtral"], built["mixtral"].state_dict()) is None


@pytest.mark.parametrize("head, lora", [("sequence_classification", False), ("sequence_classification", True),
                                        ("token_classification", False)])
def test_models_are_built_with_the_head_their_loss_trains(head, lora, tmp_path, tiny_model_dir):
    """Building, LoRA and export take the head kind (models.HEADS): a scalar head (a reward per sequence, a value
    per token) on the same base, saved as a folder that its transformers Auto class loads with the same outputs."""
    import transformers
    from adapters import apply_lora
    cfg = load_config(TINY["dpo"], [*local_model_overrides(tiny_model_dir), "model.lora={r: 4}" if lora else "seed=0"])
    tokenizer = models.build_tokenizer(cfg)
    model = models.load_policy(cfg, tokenizer, head=head)
    assert type(model).__name__.endswith({"sequence_classification": "ForSequenceClassification",
                                          "token_classification": "ForTokenClassification"}[head])
    if lora:
        model = apply_lora(model, cfg.model.lora, torch.float32, head=head)
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        assert any("score" in n for n in trainable) and any("lora_" in n for n in trainable)  # the new head trains
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    out = model(input_ids=ids).logits
    assert out.shape == ((2, 1) if head == "sequence_classification" else (2, 4, 1))
    export = model.merge_and_unload() if lora else model
    export.save_pretrained(tmp_path)
    reloaded = getattr(transformers, models.HEADS[head]).from_pretrained(tmp_path)
    torch.testing.assert_close(reloaded(input_ids=ids).logits, out, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("lora", [False, True])
def test_reference_gives_per_token_log_probs_that_sum_to_its_sequence_log_probs(lora, tiny_model_dir):
    import logprobs
    trainer = build("dpo", tiny_model_dir, *(["model.lora={r: 4}"] if lora else []))
    examples = next(trainer.global_batches())[:4]
    batch = trainer.to_batch(examples)
    per_token = trainer.reference.token_logps(batch)
    _, seq_ids, _ = models.token_logps(trainer.policy, batch)
    assert per_token.shape == seq_ids.shape
    torch.testing.assert_close(logprobs.sequence_logps(per_token, seq_ids, batch["n_seqs"]),
                               trainer.reference.logps(batch, batch["n_seqs"]))
