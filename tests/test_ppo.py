"""PPO with a critic (loss.name: ppo): GAE, the value loss and the adaptive KL against hand-computed values (and
verl's functions, when installed); one step the same for any micro-batch split (policy and critic); the critic's
initialisation; FSDP == one process; exact resume after SIGKILL; a run that learns against a trained reward model;
final/critic loading in transformers; mistakes."""
import json
import os

import pytest
import torch

import rl_losses
import train
from config import load_config
from conftest import ROOT, params_of, run_cli
from test_online import GRPO, STEP, killed_and_resumed, weights

PPO = os.path.join(ROOT, "example", "tiny-ppo.yml")
RM_EXAMPLE = os.path.join(ROOT, "example", "tiny-reward-model.yml")
FUNCTION = "rewards=[{function: example/rewards.py:write_what_is_asked}]"  # no reward model needed


# ---------------------------------------------------------------------------------------------------------------------
# The maths, by hand
# ---------------------------------------------------------------------------------------------------------------------
def test_gae_by_hand():
    """Two completions (3 and 2 tokens), gamma 0.9, lam 0.5:
    row 0: r = [0, 0, 1], V = [0.5, 0.6, 0.7]: delta_2 = 1 - 0.7 = 0.3, delta_1 = 0.9*0.7 - 0.6 = 0.03,
    delta_0 = 0.9*0.6 - 0.5 = 0.04; A_2 = 0.3, A_1 = 0.03 + 0.45*0.3 = 0.165, A_0 = 0.04 + 0.45*0.165 = 0.11425.
    row 1: r = [0, 2], V = [1, 1]: delta_1 = 1, delta_0 = 0.9 - 1 = -0.1; A_1 = 1, A_0 = -0.1 + 0.45 = 0.35."""
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 0.0]], dtype=torch.float64)
    values = torch.tensor([[0.5, 0.6, 0.7], [1.0, 1.0, 9.0]], dtype=torch.float64)  # 9: past the end, unused
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]], dtype=torch.float64)
    adv, returns = rl_losses.gae(rewards, values, mask, gamma=0.9, lam=0.5)
    want = torch.tensor([[0.11425, 0.165, 0.3], [0.35, 1.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(adv, want)
    torch.testing.assert_close(returns, (want + values) * mask)


def test_gae_matches_the_recursion_on_random_rollouts():
    """Against the definition A_t = sum_l (gamma lam)^l delta_{t+l}, written out per row in plain Python."""
    g = torch.Generator().manual_seed(0)
    lengths = [5, 1, 3, 7]
    rewards, values = torch.randn(4, 7, generator=g, dtype=torch.float64), torch.randn(4, 7, generator=g, dtype=torch.float64)
    mask = (torch.arange(7) < torch.tensor(lengths)[:, None]).double()
    adv, _ = rl_losses.gae(rewards * mask, values, mask, gamma=0.97, lam=0.8)
    for i, n in enumerate(lengths):
        r, v = rewards[i, :n].tolist(), values[i, :n].tolist() + [0.0]
        deltas = [r[t] + 0.97 * v[t + 1] - v[t] for t in range(n)]
        for t in range(n):
            want = sum((0.97 * 0.8) ** k * deltas[t + k] for k in range(n - t))
            assert adv[i, t].item() == pytest.approx(want, abs=1e-12)
        assert adv[i, n:].abs().sum() == 0


def test_critic_advantages_fold_the_kl_in_and_whiten_over_the_global_batch():
    """k1 shaping per token, the reward at the last token, GAE, then whitening; two halves whose statistics are
    summed by `reduce` (two processes) give what the whole gives."""
    method = rl_losses.ONLINE["ppo"]
    g = torch.Generator().manual_seed(1)
    rewards, values = torch.randn(4, generator=g), torch.randn(4, 5, generator=g)
    kl = torch.randn(4, 5, generator=g)
    mask = (torch.arange(5) < torch.tensor([5, 2, 4, 3])[:, None]).float()
    adv, returns = rl_losses.critic_advantages(method, rewards, values, mask, kl, 0.1, 1.0, 0.95)
    per_token = -0.1 * kl * mask
    per_token[torch.arange(4), torch.tensor([4, 1, 3, 2])] += rewards
    raw, want_returns = rl_losses.gae(per_token, values, mask, 1.0, 0.95)
    picked = raw[mask.bool()]
    want = (raw - picked.mean()) / (picked.var() + 1e-8).sqrt() * mask  # unbiased variance, as verl's masked_whiten
    torch.testing.assert_close(adv, want, atol=1e-6, rtol=0)
    torch.testing.assert_close(returns, want_returns)
    halves = [(slice(0, 2)), (slice(2, 4))]
    stats = sum(rl_losses.whiten_stats(raw[h], mask[h]) for h in halves)
    parts = [rl_losses.critic_advantages(method, rewards[h], values[h], mask[h], kl[h], 0.1, 1.0, 0.95,
                                         reduce=lambda s: stats)[0] for h in halves]
    torch.testing.assert_close(torch.cat(parts), adv, atol=1e-6, rtol=0)


def test_value_loss_by_hand():
    """V_old = 0, clip 0.2, returns 1: V = 0.5 is clipped to 0.2 -> max(0.25, 0.64) = 0.64 (clipped larger);
    V = 0.1 is inside the clip -> 0.81; V = 2.0 with return 1 -> max(1, 0.64) = 1. Half the token mean over the
    global batch's 4 tokens: (0.64 + 0.81 + 1) / 2 / 4; the clipped term is larger on 1 of 4 tokens."""
    values = torch.tensor([[0.5, 0.1, 2.0]], requires_grad=True)
    loss, metrics = rl_losses.value_loss(values, torch.zeros(1, 3), torch.ones(1, 3), torch.ones(1, 3), 0.2,
                                         {"tokens": 4})
    assert loss.item() == pytest.approx((0.64 + 0.81 + 1.0) / 2 / 4)
    assert metrics["value_clipfrac"].item() == pytest.approx(1 / 4)
    loss.backward()  # the clipped token has no gradient; the others (V - R) / 4
    torch.testing.assert_close(values.grad, torch.tensor([[0.0, -0.9 / 4, 1.0 / 4]]))


def test_gae_whitening_and_value_loss_match_verl():
    """verl's compute_gae_advantage_return (whitened advantages, returns) and compute_value_loss (token mean) on the
    same random tensors (an optional oracle: `pip install --no-deps verl==0.9.1 ray tensordict orjson torchdata`)."""
    core = pytest.importorskip("verl.trainer.ppo.core_algos")
    g = torch.Generator().manual_seed(3)
    rewards, values = torch.randn(5, 9, generator=g), torch.randn(5, 9, generator=g)
    mask = (torch.arange(9) < torch.tensor([9, 3, 6, 1, 8])[:, None]).float()
    want_adv, want_returns = core.compute_gae_advantage_return(rewards * mask, values, mask, 1.0, 0.95)
    raw, returns = rl_losses.gae(rewards * mask, values, mask, 1.0, 0.95)
    adv = rl_losses.whiten(raw, mask, rl_losses.whiten_stats(raw, mask))
    torch.testing.assert_close(adv, want_adv * mask, atol=1e-5, rtol=0)
    torch.testing.assert_close(returns, want_returns * mask, atol=1e-5, rtol=0)
    vpreds = values + 0.4 * torch.randn(5, 9, generator=g)
    want_loss, want_clipfrac = core.compute_value_loss(vpreds, returns, values, mask, 0.2)
    loss, metrics = rl_losses.value_loss(vpreds, values, returns, mask, 0.2, {"tokens": mask.sum()})
    assert loss.item() == pytest.approx(float(want_loss), abs=1e-6)
    assert metrics["value_clipfrac"].item() == pytest.approx(float(want_clipfrac), abs=1e-6)


def test_adaptive_kl_by_hand():
    """KL 2x the target: the error clips at +0.2, beta grows by 0.2 * n / horizon; at the target it stays."""
    assert rl_losses.adaptive_kl(0.05, 12.0, 6.0, 10000, 500) == pytest.approx(0.05 * (1 + 0.2 * 500 / 10000))
    assert rl_losses.adaptive_kl(0.05, 5.4, 6.0, 10000, 500) == pytest.approx(0.05 * (1 - 0.1 * 500 / 10000))
    assert rl_losses.adaptive_kl(0.05, 6.0, 6.0, 10000, 500) == 0.05


# ---------------------------------------------------------------------------------------------------------------------
# One step, the critic, FSDP, resume
# ---------------------------------------------------------------------------------------------------------------------
def ppo_trainer(*overrides):
    return train.build_trainer(load_config(GRPO, ["loss.name=ppo", *STEP, *overrides]))


def test_one_step_is_the_same_for_any_micro_batch_split():
    """Policy and critic: the same update from 1 micro-batch and from 4 (two passes: the ratio and the value clip are
    off-policy in the second), the same loss and value loss."""
    updates, metrics = [], []
    for accumulation in (1, 4):
        trainer = ppo_trainer(f"gradient_accumulation_steps={accumulation}", "rollout.num_iterations=2",
                              "critic.lr=0.5")
        before = {**params_of(trainer.policy), **{f"critic.{k}": v for k, v in params_of(trainer.critic).items()}}
        step_metrics, *_ = trainer.train_step(next(trainer.global_batches()))
        after = {**params_of(trainer.policy), **{f"critic.{k}": v for k, v in params_of(trainer.critic).items()}}
        updates.append({k: after[k] - before[k] for k in before})
        metrics.append(step_metrics)
    for part in ("critic.", "model."):
        largest = max(u.abs().max().item() for k, u in updates[0].items() if k.startswith(part))
        assert largest > 1e-4, f"the step changed nothing in {part}"
    largest = max(u.abs().max().item() for u in updates[0].values())
    for k in updates[0]:
        torch.testing.assert_close(updates[1][k], updates[0][k], rtol=0, atol=2e-5 * largest)
    for k in ("loss", "policy_loss", "value_loss", "value_clipfrac", "kl", "critic/values_mean", "critic/grad_norm"):
        assert metrics[1][k] == pytest.approx(metrics[0][k], rel=1e-4, abs=1e-6), k
    assert metrics[0]["kl_coef"] == 0.05 and metrics[0]["value_clipfrac"] > 0


def test_the_default_critic_is_the_policy_with_a_zero_head_and_trains_fully_beside_lora():
    """critic.name_or_path null: the policy's transformer under a zero scalar head (its first values are 0). With
    model.lora the policy trains its adapter only, the critic all of its weights."""
    trainer = ppo_trainer("model.lora={r: 4}")
    policy = params_of(trainer.policy.get_base_model())
    critic = params_of(trainer.critic)
    shared = [k for k in critic if k.startswith("model.")]
    assert shared and all(torch.equal(critic[k], policy[k.replace(".weight", ".base_layer.weight")]
                                      if k.replace(".weight", ".base_layer.weight") in policy else policy[k])
                          for k in shared)
    assert critic["score.weight"].abs().sum() == 0
    work = trainer.objective.prepare(trainer, *[next(trainer.global_batches())] * 2)
    assert work.stats["values"].abs().max() == 0
    before_policy, before_critic = params_of(trainer.policy), params_of(trainer.critic)
    batches = trainer.global_batches()
    trainer.train_step(next(batches))
    trainer.train_step(next(batches))  # the zero head passes no gradient to the transformer in the first step
    changed = {k for k, v in params_of(trainer.policy).items() if not torch.equal(v, before_policy[k])}
    assert changed and all("lora_" in k for k in changed)
    assert all(not torch.equal(v, before_critic[k]) for k, v in params_of(trainer.critic).items())


@pytest.mark.parametrize("with_reward_model", [False, True], ids=["function-policy-critic", "reward-model"])
def test_fsdp_two_processes_match_one(with_reward_model, tmp_path, request):
    """FSDPTrainer, 2 gloo processes, policy and critic sharded, against BasicTrainer: the same policy and critic
    (final/critic/) to 1e-5 of the update after 2 steps. With the reward model as reward (sharded too: each forward
    collective, also on a process with fewer completions to score) and as the critic's start."""
    common = ["loss.name=ppo", *STEP, "n_examples=8", "n_epochs=null", "critic.lr=0.5"]
    if with_reward_model:
        rm = request.getfixturevalue("reward_model")
        common += [f"rewards=[{{model: {rm}}}]", f"critic.name_or_path={rm}"]
    basic = tmp_path / "basic"
    assert train.main(GRPO, [*common, f"output_dirs={basic}"]) == 0
    proc = run_cli("train.py", GRPO, "--overrides", "trainer=FSDPTrainer", f"output_dirs={tmp_path / 'fsdp'}", *common)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fresh = ppo_trainer(*common[len(STEP) + 1:])
    for sub, initial in (("", params_of(fresh.policy)), ("critic", params_of(fresh.critic))):
        one, two = weights(basic / "final" / sub), weights(tmp_path / "fsdp" / "final" / sub)
        assert one.keys() == two.keys()
        largest = max((one[k] - initial[k]).abs().max().item() for k in one if k in initial)
        assert largest > 1e-4, sub
        for k in one:
            torch.testing.assert_close(two[k], one[k], rtol=0, atol=1e-5 * largest)


def test_killed_run_resumes_exactly(tmp_path):
    """SIGKILL after the step-2 checkpoint, then resume=auto: the policy, the critic and the adaptive KL coefficient
    end bit-identical to an uninterrupted run's."""
    whole, run = killed_and_resumed(["loss.name=ppo", *STEP, "n_examples=24", "n_epochs=null", "save_model_step=2",
                                     "lr=0.05", "loss.kl_target=0.01", "loss.kl_horizon=10"], tmp_path)
    for sub in ("", "critic"):
        a, b = weights(whole / "final" / sub), weights(run / "final" / sub)
        assert a and all(torch.equal(a[k], b[k]) for k in a), sub
    coefs = [[r["kl_coef"] for r in map(json.loads, open(folder / "metrics.jsonl")) if "kl_coef" in r]
             for folder in (whole, run)]
    assert coefs[0][-1] == coefs[1][-1] and coefs[0][-1] != 0.05  # adapted, and resumed from its saved value


# ---------------------------------------------------------------------------------------------------------------------
# The three steps of RLHF: a reward model, then PPO against it with a critic that starts from it
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reward_model(tmp_path_factory):
    """example/tiny-reward-model.yml as it is (20 steps; eval accuracy 1.0)."""
    run = tmp_path_factory.mktemp("rlhf") / "rm"
    assert train.main(RM_EXAMPLE, [f"output_dirs={run}", "report_to_tensorboard=false"]) == 0
    return run / "final"


def test_ppo_against_a_reward_model_raises_the_reward(reward_model, tmp_path):
    """example/tiny-ppo.yml (40 steps, the reward model as reward and as the critic's start): the greedy reward of
    the held-out prompts and the mean training reward rise; final/critic/ loads in transformers and gives the
    trained critic's values."""
    from transformers import AutoModelForSequenceClassification

    run = tmp_path / "ppo"
    overrides = [f"rewards=[{{model: {reward_model}}}]", f"critic.name_or_path={reward_model}", f"output_dirs={run}",
                 "report_to_tensorboard=false", "sample_during_eval=false", "eval_num_generations=1",
                 "eval_every_steps=40"]
    assert train.main(PPO, overrides) == 0
    rows = list(map(json.loads, open(run / "metrics.jsonl")))
    evals = [r["eval/reward"] for r in rows if "eval/reward" in r]
    train_rewards = [r["reward"] for r in rows if "reward" in r]
    assert evals[-1] > evals[0] + 0.3, evals
    later = train_rewards[len(train_rewards) // 2:]
    assert sum(later) / len(later) > train_rewards[0] + 0.15, train_rewards
    critic = AutoModelForSequenceClassification.from_pretrained(run / "final" / "critic")
    saved = torch.load(run / "final" / "training_state.pt", weights_only=True)["critic"]["weights"]
    assert all(torch.equal(v, saved[k]) for k, v in critic.state_dict().items())


@pytest.mark.parametrize("overrides, needle", [
    (["critic.name_or_path=/nowhere/critic"], "critic.name_or_path: '/nowhere/critic' does not exist"),
    (["critic.name_or_path=OTHER"], "has another tokenizer than the policy"),
])
def test_critic_mistakes_are_one_line(overrides, needle, reward_model, tmp_path, capsys):
    """A missing critic; a critic whose tokenizer is not the policy's (a token added to the reward model's)."""
    from transformers import AutoTokenizer
    other = tmp_path / "other"
    if "critic.name_or_path=OTHER" in overrides:
        import shutil
        shutil.copytree(reward_model, other)
        tokenizer = AutoTokenizer.from_pretrained(other)
        tokenizer.add_tokens(["<not-the-policy's>"])
        tokenizer.save_pretrained(other)
    code = train.cli([GRPO, "--overrides", "loss.name=ppo", FUNCTION, f"output_dirs={tmp_path / 'run'}",
                      *[o.replace("OTHER", str(other)) for o in overrides]])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and needle in err[0], err
