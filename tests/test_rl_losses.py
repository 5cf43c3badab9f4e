"""Tests for rl_losses.py (issue 20): advantages, KL estimators and REINFORCE++ returns against hand-computed numbers;
each method's loss value, gradient and clip/KL metrics against TRL 1.16's own loss code on identical float64 tensors;
gradient accumulation (micro-batch contributions sum to the whole-batch loss).

Run: ``OMP_NUM_THREADS=1 python -m pytest -q tests/test_rl_losses.py``

TRL's losses live inside trainer methods: ``GRPOTrainer._compute_loss`` and ``RLOOTrainer._compute_loss`` are called
unbound on a ``types.SimpleNamespace`` stub whose ``_get_per_token_logps_and_entropies`` returns the test's log-probs,
so what is compared is TRL's code, not a re-typing of it.
"""

import collections
import dataclasses
import math
import os
import sys
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import rl_losses  # noqa: E402
from rl_losses import (ONLINE, advantages, group_center, group_zscore, k1, k2, k3, leave_one_out,  # noqa: E402
                       micro_batch_loss, resolve, reward_std, seq_mean_token_mean, token_mean, token_returns,
                       whiten, whiten_stats)

F64 = torch.float64
NAN = math.nan


def t(xs):
    return torch.tensor(xs, dtype=F64)


def close(got, expected, atol=1e-12):
    torch.testing.assert_close(got, t(expected) if not torch.is_tensor(expected) else expected, rtol=0, atol=atol)


# ---------------------------------------------------------------------------------------------------------------------
# 1. Advantages, hand-computed
# ---------------------------------------------------------------------------------------------------------------------
TWO_GROUPS = [1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0]  # G = 4: mean 0.5, Bessel std sqrt(1/3); then no spread
S = math.sqrt(1 / 3)


def test_group_zscore_center_and_leave_one_out_hand_computed():
    r = t(TWO_GROUPS)
    z = 0.5 / (S + 1e-4)
    close(group_zscore(r, 4), [z, -z, -z, z, 0, 0, 0, 0])
    z = 0.5 / (S + 0.5)
    close(group_zscore(r, 4, eps=0.5), [z, -z, -z, z, 0, 0, 0, 0])
    close(group_center(r, 4), [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0])
    # r = 1: baseline (0 + 0 + 1) / 3 = 1/3 -> 2/3; r = 0: baseline 2/3 -> -2/3
    close(leave_one_out(r, 4), [2 / 3, -2 / 3, -2 / 3, 2 / 3, 0, 0, 0, 0])
    close(group_zscore(t([3.0, 1.0]), 2), [1 / (math.sqrt(2) + 1e-4), -1 / (math.sqrt(2) + 1e-4)])  # std of {3, 1}


def test_unscored_rewards_get_zero_advantage_and_leave_the_group_statistics():
    r = t([1.0, NAN, 0.0, 3.0, NAN, NAN, 5.0, NAN])  # group 0: 3 scored (mean 4/3); group 1: 1 scored
    std = math.sqrt(((1 / 3) ** 2 + (4 / 3) ** 2 + (5 / 3) ** 2) / 2)  # sqrt(7/3)
    close(group_zscore(r, 4), [(-1 / 3) / (std + 1e-4), 0, (-4 / 3) / (std + 1e-4), (5 / 3) / (std + 1e-4), 0, 0, 0, 0])
    close(group_center(r, 4), [-1 / 3, 0, -4 / 3, 5 / 3, 0, 0, 0, 0])
    # baselines over the scored siblings: (0 + 3) / 2, (1 + 3) / 2, (1 + 0) / 2
    close(leave_one_out(r, 4), [1 - 1.5, 0, 0 - 2.0, 3 - 0.5, 0, 0, 0, 0])
    got_std, zero = reward_std(r, 4)
    close(got_std, [std, 0.0])
    assert zero.tolist() == [False, True]  # a group with one scored completion has no spread to learn from


def test_reward_std_and_zero_std_flag():
    std, zero = reward_std(t(TWO_GROUPS), 4)
    close(std, [S, 0.0])
    assert zero.tolist() == [False, True]
    _, zero = reward_std(t([0.1, 0.1, 0.1, 0.1000001]), 4)  # a real spread (5e-8) is not zero
    assert zero.tolist() == [False]
    with pytest.raises(ValueError, match="G = 3"):
        group_zscore(t(TWO_GROUPS), 3)


def test_kl_estimators_hand_computed():
    logp, ref = t([-1.0, -2.0]), t([-1.3, -1.5])  # d = logp - ref = [0.3, -0.5]
    close(k1(logp, ref), [0.3, -0.5])
    close(k2(logp, ref), [0.045, 0.125])
    close(k3(logp, ref), [math.exp(-0.3) + 0.3 - 1, math.exp(0.5) - 0.5 - 1])
    assert (k3(logp, ref) >= 0).all() and (k1(logp, ref) < 0).any()


# REINFORCE++: row 0 has 3 tokens, row 1 has 2, row 2 is unscored, row 3 is empty
RPP_MASK = t([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
RPP_KL = t([[0.1, 0.2, -0.1, 9], [0.5, 0.3, 9, 9], [1, 1, 1, 1], [9, 9, 9, 9]])
RPP_REWARDS = t([2.0, -1.0, NAN, 4.0])
# beta 0.5: token rewards row 0 [-0.05, -0.1, 0.05 + 2], row 1 [-0.25, -0.15 - 1]; returns from the right
RPP_RETURNS = [[1.9, 1.95, 2.05, 0], [-1.4, -1.15, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]


def test_reinforce_pp_returns_and_whitening_hand_computed():
    returns, scored = token_returns(RPP_REWARDS, RPP_MASK, RPP_KL, beta=0.5)
    close(returns, RPP_RETURNS)
    close(scored, [[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    values = [1.9, 1.95, 2.05, -1.4, -1.15]
    mean = sum(values) / 5
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / 4 + 1e-8)  # Bessel, eps 1e-8 under the root (verl)
    close(whiten_stats(returns, scored), [sum(values), sum(v * v for v in values), 5])
    expected = [[(v - mean) / std for v in values[:3]] + [0], [(v - mean) / std for v in values[3:]] + [0, 0],
                [0] * 4, [0] * 4]
    close(whiten(returns, scored, whiten_stats(returns, scored)), expected)
    # the same through the table, and with the statistics summed over two "processes" (rows 0-1 and rows 2-3)
    close(advantages(ONLINE["reinforce_pp"], RPP_REWARDS, 1, RPP_MASK, RPP_KL, beta=0.5), expected)
    parts = [token_returns(RPP_REWARDS[s], RPP_MASK[s], RPP_KL[s], 0.5) for s in (slice(0, 2), slice(2, 4))]
    stats = sum(whiten_stats(*p) for p in parts)
    close(torch.cat([whiten(*p, stats) for p in parts]), expected)
    # without KL shaping each token's return is the sequence reward
    close(token_returns(RPP_REWARDS, RPP_MASK)[0][:2], [[2, 2, 2, 0], [-1, -1, 0, 0]])


def test_rloo_folds_k1_into_the_sequence_reward():
    mask = t([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0]])
    kl = t([[0.2, 0.4, 7], [1.0, 7, 7], [0.0, 0.1, -0.1], [-0.2, 0.2, 7]])  # masked sums [0.6, 1.0, 0.0, 0.0]
    r = t([1.0, 0.0, 2.0, 3.0])
    shaped = [1 - 0.5 * 0.6, 0 - 0.5 * 1.0, 2.0, 3.0]  # beta 0.5, G = 2: LOO = (r_i - r_j) within each pair
    close(advantages(ONLINE["rloo"], r, 2, mask, kl, beta=0.5),
          [shaped[0] - shaped[1], shaped[1] - shaped[0], shaped[2] - shaped[3], shaped[3] - shaped[2]])
    close(advantages(ONLINE["rloo"], r, 2, mask, kl, beta=0.0), [1, -1, -1, 1])
    # KL in the loss (grpo) never touches the rewards
    close(advantages(ONLINE["grpo"], r, 2, mask, kl, beta=0.5), group_zscore(r, 2))


def test_resolve_defaults_and_overrides():
    assert resolve(ONLINE["dapo"]) == {"beta": 0.0, "epsilon": 0.2, "epsilon_high": 0.28}
    assert resolve(ONLINE["gspo"]) == {"beta": 0.0, "epsilon": 3e-4, "epsilon_high": 4e-4}
    assert resolve(ONLINE["rloo"]) == {"beta": 0.05, "epsilon": 0.2, "epsilon_high": 0.2}
    assert resolve(ONLINE["dapo"], epsilon=0.1) == {"beta": 0.0, "epsilon": 0.1, "epsilon_high": 0.1}
    assert resolve(ONLINE["grpo"], beta=0.04, epsilon_high=0.3) == {"beta": 0.04, "epsilon": 0.2, "epsilon_high": 0.3}
    assert {name for name, row in ONLINE.items() if not row.groups} == {"reinforce_pp", "ppo"}
    assert all(row.ratio in rl_losses.RATIOS and row.kl in ("loss", "reward") for row in ONLINE.values())


# ---------------------------------------------------------------------------------------------------------------------
# 2. Loss value, gradient and metrics against TRL 1.16 on identical tensors
# ---------------------------------------------------------------------------------------------------------------------
from trl import GRPOTrainer, RLOOTrainer  # noqa: E402  (a test dependency: requirements-test.txt)

N, T = 8, 6


class _Accelerator:
    """accelerate.Accelerator, one process: gathers and reductions are the identity."""
    device = torch.device("cpu")
    num_processes = 1

    def gather(self, x):
        return x

    def reduce(self, x, reduction="sum"):
        return x


def batch(seed, spread=0.3):
    """(logps leaf [N, T], old, ref, advantages [N], mask): random log-probs, 0 past each completion's length;
    old = logps + noise of size `spread` (off-policy, so the clip is active on some tokens)."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, T + 1, (N,), generator=g)
    mask = (torch.arange(T)[None, :] < lens[:, None]).to(F64)
    logps = -(torch.rand(N, T, generator=g, dtype=F64) * 2 + 0.05) * mask
    old = (logps + spread * (torch.rand(N, T, generator=g, dtype=F64) * 2 - 1)) * mask
    ref = -(torch.rand(N, T, generator=g, dtype=F64) * 2 + 0.05) * mask
    adv = torch.randn(N, generator=g, dtype=F64)
    return logps.requires_grad_(), old, ref, adv, mask


def _metrics():
    return collections.defaultdict(lambda: collections.defaultdict(list))


def trl_grpo(logps, old, ref, adv, mask, loss_type, level, beta, eps, eps_high):
    """TRL's GRPOTrainer._compute_loss and its logged metrics."""
    def per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, **kwargs):
        return logps, torch.zeros_like(logps.detach()), None
    stub = SimpleNamespace(
        _get_per_token_logps_and_entropies=per_token_logps_and_entropies, accelerator=_Accelerator(),
        model=SimpleNamespace(training=True), aux_loss_enabled=False, top_entropy_quantile=1.0,
        off_policy_mask_threshold=None, importance_sampling_level=level, beta=beta, loss_type=loss_type,
        epsilon_low=eps, epsilon_high=eps_high, use_vllm=False, vllm_importance_sampling_correction=False,
        _entropy_bonus_enabled=False, current_gradient_accumulation_steps=1, max_completion_length=T,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1), _metrics=_metrics())
    inputs = {"prompt_ids": torch.zeros(N, 1, dtype=torch.long), "prompt_mask": torch.ones(N, 1, dtype=torch.long),
              "completion_ids": torch.zeros(N, T, dtype=torch.long), "completion_mask": mask, "advantages": adv,
              "old_per_token_logps": old, "ref_per_token_logps": ref, "num_items_in_batch": mask.sum()}
    loss = GRPOTrainer._compute_loss(stub, None, inputs)
    return loss, {k: v[-1] for k, v in stub._metrics["train"].items()}


def ours(method, logps, old, ref, adv, mask, **hp):
    norm = {"sequences": N, "tokens": mask.sum(), "max_new_tokens": T}
    return micro_batch_loss(method, resolve(method, **hp), logps, old, ref, adv, mask, norm)


GSPO_TOKEN_MEAN = dataclasses.replace(ONLINE["gspo"], aggregate=token_mean)
# (our row, TRL's loss_type, TRL's importance_sampling_level, spread of the old log-probs, our overrides)
GRPO_CASES = [
    (ONLINE["grpo"], "grpo", "token", 0.3, {}),
    (ONLINE["grpo"], "grpo", "token", 0.3, {"beta": 0.04}),  # k3 in the loss
    (ONLINE["dr_grpo"], "dr_grpo", "token", 0.3, {}),
    (ONLINE["dr_grpo"], "dr_grpo", "token", 0.3, {"beta": 0.1}),
    (ONLINE["dapo"], "dapo", "token", 0.3, {}),
    (ONLINE["dapo"], "bnpo", "token", 0.3, {"beta": 0.1}),  # one micro-batch: bnpo's local token mean is dapo's
    (ONLINE["gspo"], "grpo", "sequence", 2e-3, {}),  # TRL's GSPO recipe: sequence level, loss_type grpo
    (ONLINE["gspo"], "grpo", "sequence", 0.3, {"beta": 0.1, "epsilon": 0.05}),
    (GSPO_TOKEN_MEAN, "dapo", "sequence", 2e-3, {}),  # the token variant's gradient under a token mean too
]


@pytest.mark.parametrize("method,loss_type,level,spread,hp", GRPO_CASES,
                         ids=[f"{c[1]}-{c[2]}-{i}" for i, c in enumerate(GRPO_CASES)])
def test_loss_gradient_and_metrics_match_trl_grpo(method, loss_type, level, spread, hp):
    logps, old, ref, adv, mask = batch(seed=len(loss_type) + 10 * len(hp), spread=spread)
    r = resolve(method, **hp)
    want, want_metrics = trl_grpo(logps, old, ref, adv, mask, loss_type, level, r["beta"], r["epsilon"],
                                  r["epsilon_high"])
    got, metrics = ours(method, logps, old, ref if r["beta"] else None, adv, mask, **hp)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    want_grad, = torch.autograd.grad(want, logps)
    got_grad, = torch.autograd.grad(got, logps)
    assert want_grad.abs().max() > 1e-3
    torch.testing.assert_close(got_grad, want_grad, rtol=0, atol=1e-12)
    names = ["clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"] + (["kl"] if r["beta"] else [])
    for name in names:
        assert metrics[name].item() == pytest.approx(want_metrics[name], abs=1e-12), name
    assert 0 < metrics["clip_ratio/region_mean"] < 1  # the clip is active on some, not all: the case tests it


def test_on_policy_gspo_matches_grpo_gradient():
    """On-policy (ratio 1) the sequence ratio's gradient is the per-sequence token mean's: GSPO == GRPO there."""
    logps, _, _, adv, mask = batch(seed=3)
    grads = [torch.autograd.grad(ours(ONLINE[name], logps, None, None, adv, mask)[0], logps)[0]
             for name in ("grpo", "gspo")]
    assert grads[0].abs().max() > 1e-3
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=1e-12)


def trl_rloo(logps, old, adv, mask, eps, eps_high):
    """TRL's RLOOTrainer._compute_loss (a sequence-likelihood ratio, PPO clip, mean over sequences) and metrics."""
    def per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, **kwargs):
        return logps, torch.zeros_like(logps.detach()), None
    stub = SimpleNamespace(_get_per_token_logps_and_entropies=per_token_logps_and_entropies,
                           accelerator=_Accelerator(), model=SimpleNamespace(training=True), aux_loss_enabled=False,
                           epsilon_low=eps, epsilon_high=eps_high, _metrics=_metrics())
    inputs = {"prompt_ids": torch.zeros(N, 1, dtype=torch.long), "prompt_mask": torch.ones(N, 1, dtype=torch.long),
              "completion_ids": torch.zeros(N, T, dtype=torch.long), "completion_mask": mask,
              "old_logps": (old * mask).sum(1), "advantages": adv}
    loss = RLOOTrainer._compute_loss(stub, None, inputs)
    return loss, {k: v[-1] for k, v in stub._metrics["train"].items()}


@pytest.mark.parametrize("spread", [0.02, 0.1])
def test_rloo_loss_gradient_and_metrics_match_trl(spread):
    logps, old, ref, adv, mask = batch(seed=7, spread=spread)
    want, want_metrics = trl_rloo(logps, old, adv, mask, 0.2, 0.2)
    got, metrics = ours(ONLINE["rloo"], logps, old, ref, adv, mask)  # beta 0.05: KL in the reward, not the loss
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    want_grad, = torch.autograd.grad(want, logps)
    got_grad, = torch.autograd.grad(got, logps)
    assert want_grad.abs().max() > 1e-3
    torch.testing.assert_close(got_grad, want_grad, rtol=0, atol=1e-12)
    for name in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"):
        assert metrics[name].item() == pytest.approx(want_metrics[name], abs=1e-12), name
    assert metrics["kl"].item() == pytest.approx(((old - ref) * mask).sum().item() / mask.sum().item(), abs=1e-12)


# ---------------------------------------------------------------------------------------------------------------------
# 3. Gradient accumulation: micro-batch contributions sum to the global-batch loss (1x8 == 8x1 == 2x4)
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(ONLINE))
@pytest.mark.parametrize("micro", [1, 2, 3])
def test_micro_batches_sum_to_the_whole_batch(name, micro):
    logps, old, ref, adv, mask = batch(seed=11)
    method = ONLINE[name]
    token_adv = adv[:, None] * torch.linspace(0.5, 1.5, T, dtype=F64)  # [N, T] advantages, as REINFORCE++'s
    a = token_adv if method.whiten else adv
    hp = {"beta": 0.1}
    whole, whole_metrics = ours(method, logps, old, ref, a, mask, **hp)
    norm = {"sequences": N, "tokens": mask.sum(), "max_new_tokens": T}
    parts = [micro_batch_loss(method, resolve(method, **hp), logps[s], old[s], ref[s], a[s], mask[s], norm)
             for s in (slice(i, i + micro) for i in range(0, N, micro))]
    total = sum(p[0] for p in parts)
    torch.testing.assert_close(total, whole, rtol=0, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(total, logps)[0], torch.autograd.grad(whole, logps)[0],
                               rtol=0, atol=1e-12)
    for key, value in whole_metrics.items():
        torch.testing.assert_close(sum(p[1][key] for p in parts), value, rtol=0, atol=1e-12)


def test_a_per_micro_batch_token_mean_would_differ():
    """The check above can fail: normalising each micro-batch by its own token count (the gradient-accumulation bug)
    gives a different dapo loss on completions of unequal lengths."""
    logps, old, ref, adv, mask = batch(seed=11)
    whole, _ = ours(ONLINE["dapo"], logps, old, None, adv, mask)
    local = sum(micro_batch_loss(ONLINE["dapo"], resolve(ONLINE["dapo"]), logps[s], old[s], None, adv[s], mask[s],
                                 {"sequences": N, "tokens": mask[s].sum() * 4, "max_new_tokens": T})[0]
                for s in (slice(i, i + 2) for i in range(0, N, 2)))
    assert abs((local - whole).item()) > 1e-6


def test_aggregations_hand_computed():
    values = t([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = t([[1, 1, 0], [1, 1, 1]])
    norm = {"sequences": 4, "tokens": 10, "max_new_tokens": 3}
    close(seq_mean_token_mean(values, mask, norm), (1.5 + 5.0) / 4)
    close(rl_losses.seq_mean_token_sum_norm(values, mask, norm), 18.0 / (4 * 3))
    close(token_mean(values, mask, norm), 18.0 / 10)
