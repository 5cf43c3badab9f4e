"""LoRA (model.lora) on BasicTrainer: only the adapter trains, the reference is the base (adapter off, no copy),
checkpoints hold the adapter (and final/ the merged model), resume is exact, the reference cache is shared with a
full run on the same base, FLOPs, one-line errors, the example and the full-config listing."""
import os
import re

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import adapters
import checkpoints
import flops
import models
import train
import config
from config import load_config
from conftest import (ROOT, SGD_STEP, TIED, TINY, assert_one_line_error, build, local_model_overrides, read_jsonl,
                      run_cli, sgd_update)
from utils import UserError

TINY_LORA = os.path.join(ROOT, "example", "tiny-lora-dpo.yml")
LORA = ["model.lora={}", "model.reference_dtype=null"]  # defaults: r 8, alpha 16, all-linear
FAST = ["optimizer=AdamW", "lr=1e-2", "warmup_steps=0", "total_batch_size=8"]


def clone(state):
    return {k: v.detach().clone() for k, v in state.items()}


def some_batch(trainer, n=6):
    examples = trainer.train_data[:n]
    return trainer.to_batch(examples), 2 * n


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, tmp_path_factory):
    """A 2-step LoRA DPO run on the local tiny model, trained through train.main: its run folder."""
    run_dir = tmp_path_factory.mktemp("lora-run")
    assert train.main(TINY["dpo"], [*local_model_overrides(tiny_model_dir), *LORA, *FAST, "n_eval_examples=0",
                                   "n_epochs=null", "n_examples=16", f"output_dirs={run_dir}"]) == 0
    return run_dir


def test_only_the_adapter_trains_and_the_reference_is_the_base(tiny_model_dir, monkeypatch):
    """No second model (build_models makes no deepcopy); the optimizer holds only adapter weights; after 3 AdamW steps
    the base is bit-identical and the adapter moved; the reference log-probs (adapter off) are a separately loaded
    base model's, before and after the steps."""
    real = models.copy.deepcopy

    def no_model_copies(obj, *args, **kwargs):
        assert not isinstance(obj, torch.nn.Module), "build_models copied a model"
        return real(obj, *args, **kwargs)
    monkeypatch.setattr(models.copy, "deepcopy", no_model_copies)
    trainer = build("dpo", tiny_model_dir, *LORA, *FAST)
    assert isinstance(trainer.reference, models.AdapterOffReference) and trainer.reference.model is None
    trainable = {id(p) for n, p in trainer.policy.named_parameters() if p.requires_grad}
    assert trainable == {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert all(adapters.LORA_MARK in n for n, p in trainer.policy.named_parameters() if p.requires_grad)
    assert {p.dtype for p in trainer.policy.parameters()} == {torch.float32}
    base, adapter = clone(adapters.base_state(trainer.policy.state_dict())), clone(adapters.adapter_state(trainer.policy))
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    assert base.keys() == plain.state_dict().keys()  # the plain model's own names
    batch, n_seqs = some_batch(trainer)
    with torch.no_grad():
        want = models.batch_logps(plain, batch, n_seqs)
    torch.testing.assert_close(trainer.reference.logps(batch, n_seqs), want, rtol=0, atol=1e-6)
    batches = trainer.global_batches()
    for _ in range(3):
        trainer.train_step(next(batches))
    after = adapters.base_state(trainer.policy.state_dict())
    assert all(torch.equal(base[k], after[k]) for k in base)
    moved = adapters.adapter_state(trainer.policy)
    assert all(not torch.equal(adapter[k], moved[k]) for k in adapter if "lora_B" in k)
    torch.testing.assert_close(trainer.reference.logps(batch, n_seqs), want, rtol=0, atol=1e-6)
    with torch.no_grad():  # and the policy itself is no longer the base
        assert (models.batch_logps(trainer.policy, batch, n_seqs) - want).abs().max() > 1e-3


def test_half_precision_base_and_float32_adapter(tiny_model_dir):
    trainer = build("dpo", tiny_model_dir, *LORA, *FAST, "model.policy_dtype=bfloat16")
    dtypes = {adapters.LORA_MARK in n: p.dtype for n, p in trainer.policy.named_parameters()}
    assert dtypes == {True: torch.float32, False: torch.bfloat16}
    adapter = clone(adapters.adapter_state(trainer.policy))
    metrics, *_ = trainer.train_step(next(trainer.global_batches()))  # autocast computes in bfloat16
    assert metrics["loss"] == pytest.approx(0.6931, abs=1e-3)  # step 1: the adapter is 0, policy == reference
    moved = adapters.adapter_state(trainer.policy)
    assert all(moved[k].dtype == torch.float32 for k in moved) and any(not torch.equal(adapter[k], moved[k]) for k in moved)


def test_checkpoints_hold_the_adapter_and_final_the_merged_model(lora_run, tiny_model_dir):
    """step-N/ and final/: adapter/ (peft), tokenizer, config.yaml, trainer_state.json, training_state.pt (with the
    adapter's float32 weights); final/ also the merged model, whose log-probs are the adapted model's."""
    import peft
    final = lora_run / "final"
    assert {"adapter", "config.yaml", "trainer_state.json", "training_state.pt", "tokenizer.json",
            "model.safetensors", "config.json"} <= set(os.listdir(final))
    assert {"adapter_model.safetensors", "adapter_config.json"} <= set(os.listdir(final / "adapter"))
    masters = torch.load(final / "training_state.pt", weights_only=True)["master_weights"]
    assert masters and all(adapters.LORA_MARK in k and v.dtype == torch.float32 for k, v in masters.items())
    merged = AutoModelForCausalLM.from_pretrained(final).eval()  # the adapter/ subfolder does not confuse it
    adapted = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), final / "adapter")
    trainer = build("dpo", tiny_model_dir, *FAST)  # data and collation only
    batch, n_seqs = some_batch(trainer)
    with torch.no_grad():
        want = models.batch_logps(adapted.eval(), batch, n_seqs)
        base = models.batch_logps(trainer.policy, batch, n_seqs)
        torch.testing.assert_close(models.batch_logps(merged, batch, n_seqs), want, rtol=0, atol=1e-5)
    assert (want - base).abs().max() > 1e-3  # the adapter was trained: the test compares something


def test_tied_embedding_model_exports_the_merged_model(tmp_path):
    """A tied-embedding Llama: final/'s merged model (one shared embedding / head tensor) has the trained policy's
    log-probs, and saving left the policy untouched. (all-linear leaves the tied head out: peft skips the output
    layer.)"""
    trainer = train.build_trainer(load_config(TINY_LORA, [f"model.from_config={TIED}", "n_eval_examples=0",
                                                                *FAST, f"output_dirs={tmp_path}"]))
    assert not any("lm_head" in n for n in adapters.adapter_state(trainer.policy))
    trainer.train_step(next(trainer.global_batches()))
    before = clone(trainer.policy.state_dict())
    checkpoints.save(trainer, "final")
    assert all(torch.equal(before[k], v) for k, v in trainer.policy.state_dict().items())
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "final").eval()
    assert merged.lm_head.weight.data_ptr() == merged.model.embed_tokens.weight.data_ptr()
    batch, n_seqs = some_batch(trainer)
    with torch.no_grad():
        torch.testing.assert_close(models.batch_logps(merged, batch, n_seqs),
                                   models.batch_logps(trainer.policy.eval(), batch, n_seqs), rtol=0, atol=1e-5)


def test_adapter_folder_as_archive(lora_run, tiny_model_dir):
    """model.archive = an adapter folder: with model.lora the adapter continues from its weights; without, the
    adapter is merged into the base and every weight trains."""
    folder = str(lora_run / "final" / "adapter")
    saved = load_file(os.path.join(folder, "adapter_model.safetensors"))
    continued = build("dpo", tiny_model_dir, *LORA, *FAST, f"model.archive={folder}")
    live = {k.replace(".default", ""): v for k, v in adapters.adapter_state(continued.policy).items()}
    assert live.keys() == saved.keys() and all(torch.equal(live[k], saved[k]) for k in saved)
    with pytest.raises(UserError, match="does not fit model.lora"):
        build("dpo", tiny_model_dir, *LORA, *FAST, f"model.archive={folder}", "model.lora.r=4")
    full = build("dpo", tiny_model_dir, *FAST, f"model.archive={folder}")
    merged = load_file(str(lora_run / "final" / "model.safetensors"))
    state = full.policy.state_dict()
    assert all(p.requires_grad for p in full.policy.parameters())
    assert max((state[k] - merged[k]).abs().max().item() for k in merged) < 1e-6


def test_precompute_shares_the_cache_with_a_full_run(tiny_model_dir, tmp_path, capsys):
    cache = ["precompute_reference_logps=true", f"reference_cache_dir={tmp_path}", "n_epochs=null", "n_examples=24"]
    build("dpo", tiny_model_dir, *FAST, *cache).precompute_reference_logps()
    assert "0 from the cache, 24 computed" in capsys.readouterr().out
    trainer = build("dpo", tiny_model_dir, *FAST, *LORA, *cache)
    trainer.precompute_reference_logps()
    assert "24 from the cache, 0 computed" in capsys.readouterr().out and len(os.listdir(tmp_path)) == 1
    assert isinstance(trainer.reference, models.PrecomputedReference)
    trainer.train_step(next(trainer.global_batches()))


def test_resume_is_exact(tmp_path):
    """The example (tiny-lora-dpo.yml) for 4 steps, and again resumed from its step-2 checkpoint: the same adapter,
    merged model and metrics, bit for bit."""
    short = ["n_epochs=null", "n_examples=32", "total_batch_size=8", "save_model_step=2", "print_log_step=1",
             "n_eval_examples=8", "eval_every_steps=4", "do_first_eval=false"]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert train.main(TINY_LORA, [*short, f"output_dirs={whole}"]) == 0
    assert train.main(TINY_LORA, [*short, f"output_dirs={resumed}", f"resume={whole / 'step-000002'}"]) == 0
    for name in ("adapter/adapter_model.safetensors", "model.safetensors"):
        expected, got = load_file(whole / "final" / name), load_file(resumed / "final" / name)
        assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)

    def metrics(run_dir):
        return [{k: v for k, v in line.items() if k != "tokens_per_second"} for line in read_jsonl(run_dir / "metrics.jsonl")]
    assert metrics(resumed) == metrics(whole)[2:]
    first, last = metrics(whole)[0]["loss"], metrics(whole)[3]["loss"]
    assert last < first  # the example learns


def test_unknown_target_module_is_one_line_listing_the_linear_layers(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli("train.py", TINY_LORA, "--overrides", "model.lora.target_modules=[q_proj,qkv]",
                   f"output_dirs={run_dir}")
    line = assert_one_line_error(proc, "model.lora.target_modules", "'qkv'", "q_proj", "k_proj", "v_proj", "o_proj",
                                 "gate_proj", "up_proj", "down_proj", "lm_head")
    assert "'q_proj'" not in line and not run_dir.exists()  # nothing written


@pytest.mark.parametrize("override, needle", [
    ("model.lora.alpah=4", "unknown key 'model.lora.alpah' (did you mean 'alpha'?)"),
    ("model.lora.r=0", "model.lora.r must be >= 1"),
    ("model.lora.dropout=1.0", "model.lora.dropout must be >= 0 and < 1"),
    ("model.lora.target_modules=7", "model.lora.target_modules must be all-linear or a list"),
    ("model.reference_dtype=bfloat16", "model.reference_dtype=bfloat16 does not apply with model.lora"),
])
def test_bad_lora_config_is_one_line(override, needle):
    with pytest.raises(UserError) as e:
        load_config(TINY_LORA, [override])
    assert needle in str(e.value) and "\n" not in str(e.value)


# ---- LoRA with the other options: activation checkpointing, compile, float16, an adapter on lm_head ----

def lora_sgd_step(model_dir, *overrides):
    """One SGD step (lr 1, no clipping) of a LoRA DPO run whose lora_B start random, not 0 (so that lora_A gets a
    gradient too): the parameter update, the step's metrics plus saved_elements (autograd's saved tensors), and the
    trainer."""
    trainer = build("dpo", model_dir, *LORA, *SGD_STEP, *overrides)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in trainer.policy.named_parameters():
            if "lora_B" in name:
                param.copy_(0.05 * torch.randn(param.shape, generator=generator))
    return (*sgd_update(trainer), trainer)


def test_activation_checkpointing_gives_the_same_adapter_update(tiny_model_dir):
    """activation_checkpointing=true (transformers' non-reentrant checkpointing, enabled on the base before peft wraps
    it): gradients reach lora_A and lora_B through the recomputed layers of the frozen base, and the update is the
    one without checkpointing (measured: identical, max difference 0.0)."""
    plain, m1, _ = lora_sgd_step(tiny_model_dir)
    checkpointed, m2, trainer = lora_sgd_step(tiny_model_dir, "activation_checkpointing=true")
    assert trainer.policy.get_base_model().is_activation_checkpointing
    assert m2["saved_elements"] < 0.8 * m1["saved_elements"]  # activations really were recomputed
    assert m2["loss"] == pytest.approx(m1["loss"], rel=1e-6)
    adapter = [k for k in plain if adapters.LORA_MARK in k]
    assert any("lora_A" in k for k in adapter) and all(plain[k].abs().max() > 0 for k in adapter)
    assert all(not checkpointed[k].any() for k in checkpointed if k not in adapter)  # the base did not move
    assert max((checkpointed[k] - plain[k]).abs().max().item() for k in plain) <= 1e-6


def test_compile_compiles_the_lora_policy_in_place(tiny_model_dir):
    """compile=true with LoRA: the peft policy is compiled in place (same class, so the adapter save and the merged
    export are unchanged); the reference (adapter off) runs that same compiled module, nothing else is compiled.
    Measured off the suite (`python bench/compile_check.py 'model.lora={}' model.reference_dtype=null`, and one DPO
    SGD step as in lora_sgd_step): compiled matches eager to 2.7e-7 (SFT) and 4.0e-7 / 4.4e-7 (DPO) of the largest
    update, but the first compiled step takes 2.5-7 minutes on this 2-vCPU machine, so the numbers are not checked
    here."""
    import peft
    trainer = build("dpo", tiny_model_dir, *LORA, *FAST, "compile=true")
    assert isinstance(trainer.policy, peft.PeftModel) and trainer.policy._compiled_call_impl is not None
    assert isinstance(trainer.reference, models.AdapterOffReference) and trainer.reference.policy is trainer.policy


def test_float16_base_with_grad_scaling_trains_only_the_float32_adapter(tiny_model_dir):
    """policy_dtype=float16 on the CPU: the base is stored in float16, the adapter in float32, the GradScaler is on;
    3 steps have finite losses and none is skipped, the base stays bit-identical and the adapter moves."""
    trainer = build("dpo", tiny_model_dir, *LORA, *FAST, "total_batch_size=4", "model.policy_dtype=float16")
    dtypes = {adapters.LORA_MARK in n: p.dtype for n, p in trainer.policy.named_parameters()}
    assert dtypes == {True: torch.float32, False: torch.float16} and trainer.scaler.is_enabled()
    base, adapter = clone(adapters.base_state(trainer.policy.state_dict())), clone(adapters.adapter_state(trainer.policy))
    batches = trainer.global_batches()
    losses = [trainer.train_step(next(batches))[0]["loss"] for _ in range(3)]
    assert losses[0] == pytest.approx(0.6931, abs=1e-3) and all(torch.isfinite(torch.tensor(losses)))
    assert losses[2] < losses[0]
    assert trainer.scaler.get_scale() == 2.0 ** 16  # a skipped step (inf gradient) would have halved it
    after = adapters.base_state(trainer.policy.state_dict())
    assert all(after[k].dtype == torch.float16 and torch.equal(base[k], after[k]) for k in base)
    moved = adapters.adapter_state(trainer.policy)
    assert all(moved[k].dtype == torch.float32 and not torch.equal(adapter[k], moved[k]) for k in adapter)


def test_lm_head_adapter_on_tied_embeddings_is_one_line(tmp_path):
    """A tied model's lm_head IS its input embedding: an adapter on the head alone has no tied merged form."""
    cfg = load_config(TINY_LORA, [f"model.from_config={TIED}", "model.lora.target_modules=[q_proj,lm_head]",
                                        "n_eval_examples=0", f"output_dirs={tmp_path / 'run'}"])
    with pytest.raises(UserError) as e:
        train.build_trainer(cfg)
    message = str(e.value)
    assert "\n" not in message and not (tmp_path / "run").exists()
    assert "config: model.lora.target_modules names lm_head" in message and "tie_word_embeddings" in message


def test_lm_head_adapter_on_an_untied_model_is_in_the_merged_export(tmp_path):
    """target_modules with lm_head on an untied model: final/'s merged model has the adapted head (the input
    embedding unchanged) and the trained policy's log-probs; the adapter file holds only adapter weights."""
    trainer = train.build_trainer(load_config(TINY_LORA, ["model.lora.target_modules=[q_proj,lm_head]",
                                                                "n_eval_examples=0", *FAST, f"output_dirs={tmp_path}"]))
    trainer.train_step(next(trainer.global_batches()))
    before = clone(trainer.policy.state_dict())
    checkpoints.save(trainer, "final")
    assert all(torch.equal(before[k], v) for k, v in trainer.policy.state_dict().items())
    saved = load_file(tmp_path / "final" / "adapter" / "adapter_model.safetensors")
    assert all(adapters.LORA_MARK in k for k in saved) and any("lm_head" in k for k in saved)
    merged, base = AutoModelForCausalLM.from_pretrained(tmp_path / "final").eval(), adapters.base_state(before)
    assert (merged.lm_head.weight - base["lm_head.weight"]).abs().max() > 1e-4
    assert torch.equal(merged.model.embed_tokens.weight, base["model.embed_tokens.weight"])
    batch, n_seqs = some_batch(trainer)
    with torch.no_grad():  # sums of ~100 nats: float32 rounding of the merged head (measured 1.5e-5, 1.1e-7 relative)
        torch.testing.assert_close(models.batch_logps(merged, batch, n_seqs),
                                   models.batch_logps(trainer.policy.eval(), batch, n_seqs), rtol=1e-6, atol=1e-5)


def test_lora_flops_hand_counted(tiny_model_dir):
    """Tiny model (hidden 32, mlp 64, 2 layers, 4 heads of 8, 2 kv heads), r=8 on every linear layer but the head:
    per layer q 32x32, k/v 32x16, o 32x32, gate/up/down 32x64 = 9216 base weights and 8 x (in + out) adapter
    weights per module: q 512, k/v 384, o 512, gate/up/down 768 = 4096."""
    trainer = build("dpo", tiny_model_dir, *LORA, *FAST)
    V = trainer.policy.config.vocab_size
    body, adapter = 2 * (9216 + 2 * 32) + 32, 2 * 4096  # + 2 norms per layer and the final norm (counted as before)
    assert trainer.flop_shape == (body, V * 32, 2, 32, adapter)
    seqs = [([1, 2, 3], [-100, 2, 3]), ([4, 5], [-100, 5])]  # 5 tokens, 3 labels, lengths 3 and 2
    base = 2 * body * 5 + 2 * V * 32 * 3
    attention = 2 * 2 * 32 * (9 + 4)
    lora = 2 * adapter * 5
    assert flops.model_flops(trainer.flop_shape, seqs, with_reference=False) == (5, 2 * base + 3 * (attention + lora))
    assert flops.model_flops(trainer.flop_shape, seqs, with_reference=True) == \
        (5, 2 * base + 3 * (attention + lora) + base + attention)


def test_full_config_lists_the_lora_keys_with_their_defaults():
    """model.lora is null by default; full-config.yml lists its keys as a commented block under it."""
    text = open(os.path.join(ROOT, "example", "full-config.yml")).read()
    block = re.search(r"^  lora: null +#.*\n((?:  #   .*\n)+)", text, re.M).group(1)
    listed = {m.group(1): m.group(2) for m in re.finditer(r"#   (\w+): (\S+) +# \S", block)}
    import dataclasses
    defaults = {f.name: f.default for f in dataclasses.fields(config.LoraConfig)}
    assert listed.keys() == defaults.keys()
    assert {k: yaml.safe_load(v) for k, v in listed.items()} == defaults
