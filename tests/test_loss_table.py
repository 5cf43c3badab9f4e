"""The loss table in use (issue 12): every loss.name trains end to end, the table's declarations drive the config
check and the reference, and each kind of loss keeps the guarantees of the pipeline (gradient accumulation, packing,
precomputed reference log-probs, resume, FSDP)."""
import pytest
import torch

import checkpoints
import losses
import models
import train
import utils
from config import load_config
from conftest import TINY, close_updates, params_of

KIND = {"sft": "sft", "dft": "sft"}  # which tiny example a loss trains on; every other loss: the demo pairs


def tiny(name, tmp_path, *overrides):
    """The tiny example for `name` (SFT or the demo pairs) as an in-process trainer; label_smoothing back to null so
    that each loss takes its own default."""
    kind = KIND.get(name, "dpo")
    extra = [] if kind == "sft" else ["loss.label_smoothing=null", "model.reference_dtype=null"]
    cfg = load_config(TINY[kind], [f"loss.name={name}", f"output_dirs={tmp_path}", *extra, *overrides])
    return train.build_trainer(cfg)


EXAMPLES = {"cpo": 464}  # training examples (16 a step) where 160 are too few: CPO's NLL term slows its margin
# DiscoPOP's loss slopes upwards at margin 0 with its default tau 0.05 (d loss / d z = 0.78 there), so it first
# lowers the margin: its loss falls but its reward accuracy does not climb within a short run
NO_ACCURACY = {"discopop"}


def eval_nll(trainer):
    """The policy's mean token NLL on the eval set (SFT-side losses: DFT's own loss is not an NLL)."""
    with torch.no_grad():
        logps = models.token_logps(trainer.policy, trainer.to_batch(trainer.eval_data))[0]
    return -logps.sum().item() / logps.numel()


OFFLINE = sorted(n for n, spec in losses.LOSSES.items() if spec.online is None)  # online ones: tests/test_online.py


@pytest.mark.parametrize("name", OFFLINE)
def test_every_loss_learns_and_its_checkpoint_reloads(name, tmp_path):
    """10 steps on the demo data: the loss falls (SFT-side: the token NLL); where the loss defines paired rewards,
    the held-out reward accuracy climbs above 0.8 (KTO: the desirable examples' rewards end above the undesirable
    ones'); the exported checkpoint loads in transformers with the trained weights."""
    trainer = tiny(name, tmp_path, "n_eval_examples=32", f"n_examples={EXAMPLES.get(name, 160)}", "n_epochs=null",
                   "warmup_steps=2")
    sft_side = losses.LOSSES[name].data == "sft"
    first = eval_nll(trainer) if sft_side else trainer.evaluate()["eval/loss"]
    for examples in trainer.global_batches():
        trainer.train_step(examples)
    last = trainer.evaluate()
    assert (eval_nll(trainer) if sft_side else last["eval/loss"]) < first, (first, last)
    if losses.LOSSES[name].data == "preference" and name not in NO_ACCURACY:
        assert last["eval/rewards/accuracies"] > 0.8, last
    if losses.LOSSES[name].data == "unpaired":
        assert last["eval/rewards/margins"] > 0 and "eval/kl" in last, last
    path = checkpoints.save(trainer, "final")
    reloaded = models.auto_class(losses.LOSSES[name].head).from_pretrained(path)
    want = params_of(trainer.policy)
    assert all(torch.equal(v, want[k]) for k, v in params_of(reloaded).items())
    if name == "reward_model":  # scored by transformers' own pooling: held-out pairs ordered as the eval said
        assert reloaded_accuracy(reloaded, trainer) == pytest.approx(last["eval/rewards/accuracies"])


def reloaded_accuracy(model, trainer):
    """The share of eval pairs whose chosen reply a reloaded reward model (AutoModelForSequenceClassification, its
    own last-non-pad-token pooling over right-padded rows) scores above the rejected one."""
    batch = trainer.to_batch(trainer.eval_data)
    with torch.no_grad():
        scores = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1)
    B = len(trainer.eval_data)
    return (scores[:B] > scores[B:]).float().mean().item()


def test_hyperparameter_defaults_come_from_the_table_and_unused_keys_are_noted_and_dropped():
    notes = []
    cfg = load_config(TINY["dpo"], ["loss.name=simpo", "loss.label_smoothing=null", "loss.beta=null"], notes)
    assert (cfg.loss.beta, cfg.loss.simpo_gamma, cfg.loss.nll_weight) == (2.0, 1.0, 0.0) and notes == []  # SimPO's paper
    assert cfg.loss.discopop_tau is None  # not simpo's: stays null
    cfg = load_config(TINY["dpo"], ["loss.name=cpo", "loss.label_smoothing=null"])
    assert cfg.loss.nll_weight == 1.0  # CPO's NLL term (TRL's cpo_alpha)
    cfg = load_config(TINY["dpo"], ["loss.name=simpo", "loss.beta=null", "loss.discopop_tau=0.1"], notes)
    assert notes == ["warning: loss.discopop_tau=0.1 is not used by loss.name=simpo and is ignored (it takes "
                     "loss.beta, loss.simpo_gamma, loss.label_smoothing, loss.nll_weight, loss.length_normalize, "
                     "loss.online)"]
    assert cfg.loss.discopop_tau is None  # the saved config does not claim that it ran
    notes.clear()
    cfg = load_config(TINY["sft"], ["loss.beta=0.1", "loss.label_smoothing=0"], notes)  # the seed's `beta: 0.1`
    assert notes == ["warning: loss.beta=0.1 is not used by loss.name=sft and is ignored (it takes no loss.* keys)"]
    assert cfg.loss.beta is None and cfg.loss.label_smoothing is None  # 0 is neutral: dropped without a note
    notes.clear()
    cfg = load_config(TINY["dpo"], ["loss.name=orpo", "loss.label_smoothing=null", "loss.reference_free=true"], notes)
    assert "loss.reference_free=True is not used by loss.name=orpo" in notes[0] and not cfg.loss.reference_free
    with pytest.raises(utils.UserError, match=r"unknown key 'loss.betta' \(did you mean 'beta'\?\)"):
        load_config(TINY["sft"], ["loss.betta=0.1"])  # an unknown key stays an error


@pytest.mark.parametrize("name, beta, noted", [("simpo", 0.1, True), ("simpo", 2.5, False), ("dpo", 0.1, False),
                                                ("dpo", 5.0, True), ("orpo", 0.5, False), ("kto", 0.001, True)])
def test_a_beta_far_from_the_losses_paper_is_noted(name, beta, noted):
    """`loss.name=simpo` on a DPO config keeps DPO's beta 0.1, twenty times below SimPO's 2.0: noted, with the
    default; a default value (null) is never noted."""
    notes = []
    cfg = load_config(TINY["dpo"], [f"loss.name={name}", f"loss.beta={beta}", "loss.label_smoothing=null"], notes)
    assert cfg.loss.beta == beta
    assert bool(notes) == noted and all(f"loss.beta={beta} is far from what {name}'s paper uses" in n for n in notes)
    notes.clear()
    load_config(TINY["dpo"], [f"loss.name={name}", "loss.beta=null", "loss.label_smoothing=null"], notes)
    assert notes == []


@pytest.mark.parametrize("name", [n for n in OFFLINE if not losses.LOSSES[n].reference])
def test_a_reference_free_loss_never_builds_a_reference(name, tmp_path, monkeypatch):
    import types

    def no_copies(*args):
        raise AssertionError("a reference copy was made")
    monkeypatch.setattr(models, "copy", types.SimpleNamespace(deepcopy=no_copies))
    trainer = tiny(name, tmp_path)
    assert isinstance(trainer.reference, models.NoReference) and trainer.reference.model is None
    assert not trainer.reference.runs_forward


def step_update(name, tmp_path, accumulation, *overrides):
    trainer = tiny(name, tmp_path, "optimizer=SGD", "lr=1.0", "warmup_steps=0", "max_grad_norm=0",
                   "total_batch_size=8", f"gradient_accumulation_steps={accumulation}", "n_eval_examples=0", *overrides)
    before = params_of(trainer.policy)
    metrics, *_ = trainer.train_step(next(trainer.global_batches()))
    return {k: v - before[k] for k, v in params_of(trainer.policy).items()}, metrics


@pytest.mark.parametrize("name, overrides", [("simpo", []), ("cpo", []), ("dpo", ["loss.nll_weight=0.5"]),
                                             ("kto", []), ("dft", []),
                                             ("reward_model", ["loss.center_rewards_coefficient=0.01"])])
def test_gradient_accumulation_1x8_equals_8x1(name, overrides, tmp_path):
    """A reference-free loss, NLL-mixing ones (CPO, RPO) and the unpaired one (its KL estimate over the whole global
    batch): the same update and metrics whether the batch of 8 is one micro-batch or eight."""
    whole, m1 = step_update(name, tmp_path, 1, *overrides)
    split, m8 = step_update(name, tmp_path, 8, *overrides)
    close_updates(split, whole)
    for key in m1:
        if key not in ("grad_norm",):
            assert m8[key] == pytest.approx(m1[key], rel=1e-5, abs=1e-7), key
    if "nll_loss" in m1:
        assert m1["nll_loss"] > 0


@pytest.mark.parametrize("name", ["simpo", "kto", "reward_model"])
def test_packed_step_equals_padded_step(name, tmp_path):
    padded, mp = step_update(name, tmp_path, 1)
    packed, mk = step_update(name, tmp_path, 1, "packing=true")
    close_updates(packed, padded)
    assert mk["loss"] == pytest.approx(mp["loss"], rel=1e-5)


@pytest.mark.parametrize("name", ["ipo", "kto"])
def test_precomputed_reference_is_the_same_step(name, tmp_path):
    """KTO's KL sequences included: precomputed and cached reference log-probs give the online step."""
    online, m_online = step_update(name, tmp_path, 1)
    trainer = tiny(name, tmp_path, "optimizer=SGD", "lr=1.0", "warmup_steps=0", "max_grad_norm=0",
                   "total_batch_size=8", "n_eval_examples=0", "precompute_reference_logps=true",
                   f"reference_cache_dir={tmp_path}/cache", "n_examples=16", "n_epochs=null")
    before = params_of(trainer.policy)
    trainer.precompute_reference_logps()
    assert isinstance(trainer.reference, models.PrecomputedReference)
    metrics, *_ = trainer.train_step(next(trainer.global_batches()))
    close_updates({k: v - before[k] for k, v in params_of(trainer.policy).items()}, online)
    assert metrics["loss"] == pytest.approx(m_online["loss"], rel=1e-5)


def test_bco_running_mean_is_checkpointed_and_resumes_exactly(tmp_path):
    """bco_pair shifts rewards by their running mean, training state: a run resumed from step 2 ends bit-identical."""
    from safetensors.torch import load_file
    common = ["loss.name=bco_pair", "loss.label_smoothing=null", "n_examples=64", "n_epochs=null",
              "total_batch_size=16", "save_model_step=2", "n_eval_examples=0", "print_log_step=1"]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert train.main(TINY["dpo"], [*common, f"output_dirs={whole}"]) == 0
    state = torch.load(whole / "step-000002" / "training_state.pt", weights_only=True)["loss_state"]
    assert state["reward_mean"] != 0 and state["reward_count"] == pytest.approx(2)
    assert train.main(TINY["dpo"], [*common, f"output_dirs={resumed}", f"resume={whole / 'step-000002'}"]) == 0
    a, b = (load_file(p / "final" / "model.safetensors") for p in (whole, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_reward_model_resumes_exactly(tmp_path):
    """A reward model run resumed from its step-2 checkpoint ends bit-identical to the whole run (the score head and
    its optimizer state are in the checkpoint)."""
    from safetensors.torch import load_file
    common = ["loss.name=reward_model", "loss.beta=null", "loss.label_smoothing=null", "model.reference_dtype=null",
              "n_examples=64", "n_epochs=null", "total_batch_size=16", "save_model_step=2", "n_eval_examples=0"]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert train.main(TINY["dpo"], [*common, f"output_dirs={whole}"]) == 0
    assert train.main(TINY["dpo"], [*common, f"output_dirs={resumed}", f"resume={whole / 'step-000002'}"]) == 0
    a, b = (load_file(p / "final" / "model.safetensors") for p in (whole, resumed))
    assert "score.weight" in a and all(torch.equal(a[k], b[k]) for k in a)


def test_reward_model_with_lora_exports_its_trained_head(tmp_path):
    """LoRA on a reward model trains the adapter and the new score head whole (peft's SEQ_CLS task); final/ holds
    both merged: reloaded by transformers it scores the eval replies as the trained policy does."""
    trainer = tiny("reward_model", tmp_path, "loss.beta=null", "model.lora={r: 8, alpha: 16}", "lr=1e-2",
                   "n_examples=48", "n_epochs=null", "n_eval_examples=16", "warmup_steps=0")
    head_before = dict(trainer.policy.named_parameters())["base_model.model.score.modules_to_save.default.weight"]
    head_before = head_before.detach().clone()
    for examples in trainer.global_batches():
        trainer.train_step(examples)
    path = checkpoints.save(trainer, "final")
    reloaded = models.auto_class("sequence_classification").from_pretrained(path)
    batch = trainer.to_batch(trainer.eval_data)
    with torch.no_grad():
        want, got = models.sequence_scores(trainer.policy, batch), models.sequence_scores(reloaded, batch)
    assert not torch.equal(reloaded.score.weight, head_before)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["simpo", "kto", "reward_model"])
def test_fsdp_matches_one_device(name, tmp_path):
    """A reference-free and the unpaired loss (its KL estimate summed over both processes), and the scalar head,
    under FSDPTrainer with 2 CPU processes: the weights of 3 SGD steps equal BasicTrainer's to 1e-5 of the update."""
    from conftest import run_cli
    common = [f"loss.name={name}", "loss.label_smoothing=null", "model.reference_dtype=null", "optimizer=SGD", "lr=1.0",
              "warmup_steps=0", "max_grad_norm=0", "total_batch_size=8", "gradient_accumulation_steps=2",
              "n_examples=24", "n_epochs=null", "n_eval_examples=0", "report_to_tensorboard=false"]
    proc = run_cli("train.py", TINY["dpo"], "--overrides", "trainer=FSDPTrainer", f"output_dirs={tmp_path}/fsdp", *common)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = load_config(TINY["dpo"], [*common, f"output_dirs={tmp_path}/one"])
    trainer = train.build_trainer(cfg)
    initial = params_of(trainer.policy)
    for examples in trainer.global_batches():
        trainer.train_step(examples)
    sharded = params_of(models.auto_class(losses.LOSSES[name].head).from_pretrained(tmp_path / "fsdp" / "final"))
    one = params_of(trainer.policy)
    close_updates({k: v - initial[k] for k, v in sharded.items()}, {k: v - initial[k] for k, v in one.items()},
                  rtol=1e-5)


def test_kto_micro_batches_forward_the_completions_only(tmp_path):
    """A KTO micro-batch forwards and back-propagates only its completions (its objective's `scored`): its mismatched KL
    sequences are scored once per global batch without grad (batch_kl). The loss, its metrics and the gradient equal
    those of the micro-batch that also carries the KL sequences, to float32 rounding."""
    trainer = tiny("kto", tmp_path, "n_eval_examples=0")
    examples = next(trainer.global_batches())
    objective = trainer.objective
    work = objective.prepare(trainer, examples, examples)
    results = []
    for batch in (trainer.to_batch(examples), trainer.to_batch(objective.scored(examples))):
        trainer.policy.zero_grad(set_to_none=True)
        loss, sums = objective.loss(trainer, batch, work)
        loss.backward()
        results.append((batch["n_seqs"], loss.item(), sums, [p.grad.clone() for p in trainer.policy.parameters()]))
    (n_full, loss_full, sums_full, grads_full), (n_scored, loss_scored, sums_scored, grads_scored) = results
    assert (n_full, n_scored) == (2 * len(examples), len(examples))
    assert loss_scored == pytest.approx(loss_full, rel=1e-6)
    for k, v in sums_full.items():
        assert sums_scored[k].item() == pytest.approx(v.item(), rel=1e-5, abs=1e-6), k
    largest = max(g.abs().max().item() for g in grads_full)
    assert largest > 0 and max((a - b).abs().max().item() for a, b in zip(grads_scored, grads_full)) <= 1e-5 * largest
