"""Speed options end to end, which must not change the maths: packing, precomputed (cached) reference log-probs, the
logit metrics over label positions, length-grouped batches, torch.compile, and a tiny run with every option. (Varlen
attention, log-probs at label positions and the FLOP count are models.py's, in test_models.py.)"""
import contextlib
import io
import os
import shutil
from types import SimpleNamespace

import pytest
import torch

import data
import models
from conftest import TINY, build, close_updates, one_sgd_step, params_of, read_jsonl, run_cli


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_packed_step_matches_padded_step(kind, tiny_model_dir):
    """One SGD step: the same loss, metrics and parameter update (the gradients) with and without packing."""
    padded, m_padded = one_sgd_step(kind, tiny_model_dir, "total_batch_size=8", "gradient_accumulation_steps=2")
    packed, m_packed = one_sgd_step(kind, tiny_model_dir, "total_batch_size=8", "gradient_accumulation_steps=2",
                                    "packing=true", "max_length=128")
    for key in ("loss", "logps/chosen", "rewards/margins", "logits/chosen") if kind == "dpo" else ("loss",):
        assert m_packed[key] == pytest.approx(m_padded[key], rel=1e-5, abs=1e-7), key
    close_updates(packed, padded)


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


@pytest.fixture(scope="module")
def precomputed(tiny_model_dir, tmp_path_factory):
    """One SGD step of a DPO trainer whose reference log-probs were precomputed into a fresh cache folder: what the
    precomputation printed, the cache files it left, the step's metrics and the parameter update."""
    cache_dir = tmp_path_factory.mktemp("reference-cache")
    trainer = build("dpo", tiny_model_dir, "optimizer=SGD", "lr=1.0", "warmup_steps=0", "max_grad_norm=0",
                    "total_batch_size=4", "precompute_reference_logps=true", f"reference_cache_dir={cache_dir}",
                    "n_examples=40", "n_epochs=null")
    before = params_of(trainer.policy)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        trainer.precompute_reference_logps()
    metrics, *_ = trainer.train_step(next(trainer.global_batches()))
    update = {k: v - before[k] for k, v in params_of(trainer.policy).items()}
    return SimpleNamespace(cache_dir=cache_dir, out=printed.getvalue(), files=sorted(os.listdir(cache_dir)),
                           metrics=metrics, update=update)


def copy_of_cache(precomputed, tmp_path):
    """The fixture's cache folder, copied for one test to read or damage."""
    return shutil.copytree(precomputed.cache_dir, tmp_path / "cache")


def test_precomputed_reference_is_the_same_maths(precomputed, tiny_model_dir):
    online, m_online = one_sgd_step("dpo", tiny_model_dir)
    assert precomputed.metrics["loss"] == pytest.approx(m_online["loss"], rel=1e-5)  # log 2 only if reference == policy at step 1
    close_updates(precomputed.update, online)
    assert "40 computed" in precomputed.out and len(precomputed.files) == 1


def test_precomputed_reference_logps_come_from_the_cache(precomputed, tiny_model_dir, tmp_path, capsys):
    cache = f"reference_cache_dir={copy_of_cache(precomputed, tmp_path)}"
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


def test_other_reference_weights_or_truncation_use_another_cache_file(precomputed, tiny_model_dir, tmp_path, capsys):
    cache_dir = copy_of_cache(precomputed, tmp_path)
    cache = f"reference_cache_dir={cache_dir}"
    # other reference weights or other truncation: another cache file, computed afresh
    for overrides, change_weights in (([], True), (["max_length=120"], False)):
        trainer = build("dpo", tiny_model_dir, "precompute_reference_logps=true", cache, "n_examples=40",
                        "n_epochs=null", *overrides)
        if change_weights:
            with torch.no_grad():
                trainer.reference.model.model.norm.weight.mul_(1.5)
        trainer.precompute_reference_logps()
        assert "0 from the cache, 40 computed" in capsys.readouterr().out
    assert len(os.listdir(cache_dir)) == 3


def test_corrupt_reference_cache_is_recomputed(precomputed, tiny_model_dir, tmp_path, capsys):
    cache_dir = copy_of_cache(precomputed, tmp_path)
    cache = f"reference_cache_dir={cache_dir}"
    # a corrupt cache file costs a recomputation (and a warning), never the run
    for name in os.listdir(cache_dir):
        (cache_dir / name).write_bytes(b"not a cache")
    trainer = build("dpo", tiny_model_dir, "precompute_reference_logps=true", cache, "n_examples=40", "n_epochs=null")
    trainer.precompute_reference_logps()
    out = capsys.readouterr().out
    assert "is unreadable (UnpicklingError): recomputing it" in out and "0 from the cache, 40 computed" in out


def test_unwritable_reference_cache_folder_is_not_fatal(tiny_model_dir, tmp_path, capsys):
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
    order = grouped.source.epoch_order(0)
    assert sorted(order) == list(range(len(grouped.train_data))) and order == grouped.source.epoch_order(0)
    assert order != grouped.source.epoch_order(1) and order != plain.source.epoch_order(0)

    def spread(trainer, order):  # mean (longest - shortest) within a global batch: the padding it costs
        lengths = [data.example_length(trainer.train_data[i]) for i in order]
        batches = [lengths[i:i + 4] for i in range(0, len(lengths) - 3, 4)]
        return sum(max(b) - min(b) for b in batches) / len(batches)
    assert spread(grouped, order) < 0.3 * spread(plain, plain.source.epoch_order(0))
    first = [data.example_length(grouped.train_data[i]) for i in order[:64 * 4:4]]
    assert first != sorted(first, reverse=True)  # the batches themselves still come in random order


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




def test_adam_runs_fused_unless_chosen():
    """Adam/AdamW get torch's fused kernel (transformers' default optimizer) unless optimizer_kwargs choose fused or
    foreach; other optimizers get nothing added. The fused update is the for-loop's to float32 rounding."""
    from trainers import build_optimizer

    torch.manual_seed(0)
    models_ = [torch.nn.Linear(16, 8) for _ in range(2)]
    models_[1].load_state_dict(models_[0].state_dict())
    fused = build_optimizer(models_[0], "AdamW", 1e-2, 0.1, {})
    loop = build_optimizer(models_[1], "AdamW", 1e-2, 0.1, {"fused": False})
    assert fused.defaults["fused"] is True and not loop.defaults["fused"]
    assert build_optimizer(models_[0], "Adam", 1e-2, 0.0, {}).defaults["fused"] is True
    chosen = build_optimizer(models_[0], "AdamW", 1e-2, 0.0, {"foreach": True}).defaults
    assert chosen["foreach"] is True and not chosen["fused"]
    assert not build_optimizer(models_[0], "SGD", 1e-2, 0.0, {}).defaults.get("fused")
    x, start = torch.randn(4, 16), models_[0].weight.detach().clone()
    for _ in range(3):
        for model, opt in zip(models_, (fused, loop)):
            opt.zero_grad()
            model(x).square().sum().backward()
            opt.step()
    for a, b in zip(models_[0].parameters(), models_[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert (models_[0].weight - start).abs().min() > 1e-3  # 3 steps of lr 1e-2 moved every weight
