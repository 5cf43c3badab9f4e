"""Prefix sharing (prefix_sharing: true, prefix.py): a pair's prompt computed once, the rejected reply kept from seeing
the chosen one. Log-probs and gradients equal to the separate sequences' (padded and packed; gpt_neox, llama, a tied
qwen2; sdpa and eager); one training step equal to the step without it; 1x4 == 4x1 with it; resume exact (FSDP with it
== one process without it: tests/test_fsdp.py)."""
import os

import pytest
import torch

import data
import models
import prefix
import train
from config import load_config
from conftest import ROOT, params_of
from test_fsdp import LLAMA, NEOX, QWEN2_TIED

DPO = os.path.join(ROOT, "example", "tiny-dpo.yml")


def trainer_for(arch, *overrides):
    return train.build_trainer(load_config(DPO, [f"model.from_config={arch}", "n_eval_examples=0", *overrides]))


def test_the_layout_by_hand():
    """prompt [5, 6, 7], chosen [8, 9], rejected [10]: shared [5, 6]; branches [7, 8, 9] and [7, 10] at positions
    2.. each; labels where the next-token rule expects them; the rejected branch never sees the chosen one."""
    ex = {"prompt_input_ids": [5, 6, 7], "chosen_input_ids": [5, 6, 7, 8, 9], "chosen_labels": [-100] * 3 + [8, 9],
          "rejected_input_ids": [5, 6, 7, 10], "rejected_labels": [-100] * 3 + [10]}
    batch = data.collate([ex], pad_token_id=0, prefix_sharing=True)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 7, 10]]
    assert batch["labels"].tolist() == [[-100, -100, -100, 8, 9, -100, 10]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 2, 3]]
    assert batch["seq_ids"].tolist() == [[0, 0, 0, 0, 0, 1, 1]] and batch["n_seqs"] == 2
    mask = batch["attention_mask"][0, 0].int().tolist()
    assert mask[5] == [1, 1, 0, 0, 0, 1, 0] and mask[6] == [1, 1, 0, 0, 0, 1, 1]  # shared + own branch
    assert mask[4] == [1, 1, 1, 1, 1, 0, 0]
    # a one-token prompt has nothing to share: each branch starts with it
    one = {**ex, "chosen_input_ids": [7, 8, 9], "chosen_labels": [-100, 8, 9], "rejected_input_ids": [7, 10],
           "rejected_labels": [-100, 10]}
    assert prefix.group_of(one)[0] == [7, 8, 9, 7, 10]


def examples_of(trainer, n=6):
    return trainer.train_data[:n]


@pytest.mark.parametrize("attn", ["sdpa", "eager", "varlen_attn"])
@pytest.mark.parametrize("arch", [NEOX, LLAMA, QWEN2_TIED], ids=["gpt_neox", "llama", "qwen2-tied"])
def test_logps_and_gradients_equal_the_separate_sequences(arch, attn):
    trainer = trainer_for(arch, f"model.attn_implementation={attn}", "loss.name=dpo")
    policy, examples, pad = trainer.policy, examples_of(trainer), trainer.tokenizer.pad_token_id
    results = {}
    for sharing in (False, True):
        for packing in (False, True):
            batch = data.collate(examples, pad, packing=packing, max_length=256, prefix_sharing=sharing)
            policy.zero_grad()
            logps = models.batch_logps(policy, batch, batch["n_seqs"])
            (logps * torch.linspace(1, 2, len(logps))).sum().backward()
            results[sharing, packing] = logps.detach(), {k: p.grad.clone() for k, p in policy.named_parameters()}
    want, want_grads = results[False, False]
    scale = max(g.abs().max().item() for g in want_grads.values())
    for key, (logps, grads) in results.items():
        torch.testing.assert_close(logps, want, rtol=0, atol=1e-5, msg=str(key))
        for k in grads:
            torch.testing.assert_close(grads[k], want_grads[k], rtol=0, atol=1e-5 * scale, msg=f"{key} {k}")
    shared = data.collate(examples, pad, prefix_sharing=True)
    separate = data.collate(examples, pad)
    assert shared["input_ids"].numel() < separate["input_ids"].numel()  # the prompts once


@pytest.mark.parametrize("loss", ["dpo", "kto", "reward_model"])
def test_a_step_is_the_same_with_and_without_it(loss):
    """One SGD step (lr 1) of the tiny DPO example's model: the same update and metrics; KTO's KL pairs (own prompt,
    another completion) and the reward model's scores share the same way."""
    extra = {"reward_model": ["loss.beta=null"]}  # kto: the pairs split into unpaired examples
    updates, metrics = [], []
    for sharing in ("false", "true"):
        trainer = trainer_for(LLAMA, f"loss.name={loss}", f"prefix_sharing={sharing}", "optimizer=SGD", "lr=1.0",
                              "warmup_steps=0", "max_grad_norm=0", "total_batch_size=4", *extra.get(loss, []))
        before = params_of(trainer.policy)
        step_metrics, *_ = trainer.train_step(next(trainer.global_batches()))
        updates.append({k: v - before[k] for k, v in params_of(trainer.policy).items()})
        metrics.append(step_metrics)
    largest = max(u.abs().max().item() for u in updates[0].values())
    assert largest > 1e-4
    for k in updates[0]:
        torch.testing.assert_close(updates[1][k], updates[0][k], rtol=0, atol=1e-5 * largest)
    assert metrics[1]["loss"] == pytest.approx(metrics[0]["loss"], abs=1e-5)


@pytest.mark.parametrize("packing", ["false", "true"], ids=["padded-sdpa", "packed-varlen"])
def test_gradient_accumulation_with_it(packing):
    updates = []
    for accumulation in (1, 4):
        trainer = trainer_for(LLAMA, "prefix_sharing=true", f"packing={packing}", "optimizer=SGD", "lr=1.0", "warmup_steps=0",
                              "max_grad_norm=0", "total_batch_size=4", f"gradient_accumulation_steps={accumulation}")
        before = params_of(trainer.policy)
        trainer.train_step(next(trainer.global_batches()))
        updates.append({k: v - before[k] for k, v in params_of(trainer.policy).items()})
    largest = max(u.abs().max().item() for u in updates[0].values())
    for k in updates[0]:
        torch.testing.assert_close(updates[1][k], updates[0][k], rtol=0, atol=1e-5 * largest)


def test_null_is_on_where_never_slower():
    """prefix_sharing=null: on for varlen_attn on a CPU (a packed CPU run's default attention: each branch's attention
    no larger than its own sequence's), off with SDPA (padded, or a GPU); an explicit value is kept. A packed DPO
    trainer's batches then hold each pair once, with the shared keys of every rejected branch."""
    from types import SimpleNamespace
    varlen, sdpa = (SimpleNamespace(config=SimpleNamespace(_attn_implementation=a)) for a in ("varlen_attn", "sdpa"))
    cfg, cpu, cuda = load_config(DPO, []), torch.device("cpu"), torch.device("cuda")
    assert cfg.prefix_sharing is None
    assert [models.prefix_sharing(cfg, *case) for case in ((varlen, cpu), (sdpa, cpu), (varlen, cuda))] == \
        [True, False, False]
    assert not models.prefix_sharing(load_config(DPO, ["prefix_sharing=false"]), varlen, cpu)
    assert models.prefix_sharing(load_config(DPO, ["prefix_sharing=true"]), sdpa, cpu)
    trainer = trainer_for(LLAMA, "packing=true")
    batch = trainer.to_batch(examples_of(trainer, 4))
    separate = data.collate(examples_of(trainer, 4), trainer.tokenizer.pad_token_id, packing=True)
    assert trainer.policy.config._attn_implementation == "varlen_attn" and batch["n_seqs"] == 8
    assert (batch["seq_ids"] >= 0).sum() < (separate["seq_ids"] >= 0).sum()
    assert sum(1 for start, length in batch["segment_prefixes"] if length) == 4  # every rejected branch
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch  # varlen: one row, segments, no mask


def test_an_attention_without_masks_is_refused(tmp_path, capsys):
    code = train.cli([DPO, "--overrides", "prefix_sharing=true", "model.attn_implementation=flash_attention_2",
                      f"output_dirs={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "prefix_sharing=true needs an attention that takes a mask" in err[0], err


def test_resume_is_exact_with_it(tmp_path):
    """Continue from step 2 of a 4-step run with prefix sharing: the same final weights, bit for bit."""
    from safetensors.torch import load_file
    common = ["prefix_sharing=true", "n_epochs=null", "n_examples=32", "total_batch_size=8", "save_model_step=2",
              "n_eval_examples=0", "report_to_tensorboard=false"]
    assert train.main(DPO, [*common, f"output_dirs={tmp_path / 'whole'}"]) == 0
    assert train.main(DPO, [*common, f"output_dirs={tmp_path / 'resumed'}",
                            f"resume={tmp_path / 'whole' / 'step-000002'}"]) == 0
    a, b = (load_file(tmp_path / run / "final" / "model.safetensors") for run in ("whole", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
