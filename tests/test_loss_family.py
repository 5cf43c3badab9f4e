"""Tests for the preference-optimisation family in losses.py (issue 12): hand-computed values for every loss,
float64 agreement with TRL 1.16's own loss code (and torchtune / the original DPO repository where TRL no longer has
the loss) and gradients through both.

Run: ``OMP_NUM_THREADS=1 python -m pytest -q tests/test_loss_family.py``

TRL's losses live inside trainer methods. They are called directly, unbound, on a ``types.SimpleNamespace`` stub that
carries only the attributes they read: ``CPOTrainer.cpo_loss`` and ``ORPOTrainer.odds_ratio_loss`` take log-probs;
``DPOTrainer._compute_loss``, ``KTOTrainer._compute_loss`` and ``SFTTrainer.compute_loss`` take a model, so they get a
fake one that returns given per-token log-probs (with precomputed reference log-probs in the inputs). So the loss
maths compared is TRL's own code, line for line, not a re-typing of it.
"""

import collections
import importlib.util
import math
import os
import sys
from types import MethodType, SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import losses  # noqa: E402
from losses import (apo_down_loss, apo_zero_loss, bco_pair_loss, cpo_loss, dft_loss, discopop_loss,  # noqa: E402
                    dpo_loss, exo_pair_loss, hinge_loss, ipo_loss, kto_kl, kto_loss, nca_pair_loss, nll_loss,
                    orpo_loss, robust_loss, running_mean_update, simpo_loss, sppo_hard_loss)

trl = pytest.importorskip("trl")
from trl import DPOTrainer, KTOTrainer, SFTTrainer  # noqa: E402
from trl.experimental.cpo import CPOTrainer  # noqa: E402
from trl.experimental.orpo import ORPOTrainer  # noqa: E402

F64 = torch.float64
TOL = dict(rtol=0, atol=1e-6)

# ---------------------------------------------------------------------------------------------------------------------
# 1. Hand-computed values: B = 3 pairs, every expected number from scalar `math`.
# ---------------------------------------------------------------------------------------------------------------------

CH, RJ = [-1.0, -2.5, -0.7], [-1.5, -2.0, -3.1]  # policy log-probs of chosen / rejected
RC, RR = [-1.2, -2.0, -0.9], [-1.1, -2.4, -2.6]  # reference
BETA = 0.5
C = [a - b for a, b in zip(CH, RC)]  # chosen log-ratios    [0.2, -0.5, 0.2]
R = [a - b for a, b in zip(RJ, RR)]  # rejected log-ratios  [-0.4, 0.4, -0.5]
H = [c - r for c, r in zip(C, R)]    # margins              [0.6, -0.9, 0.7]


def lsig(x):
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sig(x):
    return 1.0 / (1.0 + math.exp(-x))


def t(xs):
    return torch.tensor(xs, dtype=F64)


def paired(fn, **kw):
    return fn(t(CH), t(RJ), t(RC), t(RR), beta=BETA, **kw)


def check(got, expected):
    assert got.dtype == F64 and got.shape == (len(expected),)
    torch.testing.assert_close(got, t(expected), rtol=0, atol=1e-12)


def test_reference_based_rewards_hand_computed():
    for fn in (dpo_loss, robust_loss, ipo_loss, hinge_loss, exo_pair_loss, nca_pair_loss, sppo_hard_loss,
               apo_zero_loss, apo_down_loss, discopop_loss):
        _, cr, rr, metrics = paired(fn)
        check(cr, [BETA * c for c in C])
        check(rr, [BETA * r for r in R])
        assert metrics == {}


@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_dpo_and_cdpo_hand_computed(eps):
    check(paired(dpo_loss, label_smoothing=eps)[0], [-(1 - eps) * lsig(BETA * h) - eps * lsig(-BETA * h) for h in H])


def test_robust_hand_computed():
    eps = 0.1  # the default
    check(paired(robust_loss)[0], [(-(1 - eps) * lsig(BETA * h) + eps * lsig(-BETA * h)) / (1 - 2 * eps) for h in H])
    check(paired(robust_loss, label_smoothing=0.0)[0], [-lsig(BETA * h) for h in H])


def test_ipo_hinge_sppo_apo_hand_computed():
    check(paired(ipo_loss)[0], [(h - 1 / (2 * BETA)) ** 2 for h in H])  # 1/(2 beta) = 1: [0.16, 3.61, 0.09]
    check(paired(ipo_loss)[0], [0.16, 3.61, 0.09])
    check(paired(hinge_loss)[0], [0.7, 1.45, 0.65])  # relu(1 - 0.5 h)
    check(paired(sppo_hard_loss)[0], [(c - 1) ** 2 + (r + 1) ** 2 for c, r in zip(C, R)])
    check(paired(sppo_hard_loss)[0], [0.64 + 0.36, 2.25 + 1.96, 0.64 + 0.25])
    check(paired(apo_zero_loss)[0], [1 - sig(BETA * c) + sig(BETA * r) for c, r in zip(C, R)])
    check(paired(apo_down_loss)[0], [sig(BETA * c) + 1 - sig(BETA * h) for c, h in zip(C, H)])


def test_exo_nca_discopop_hand_computed():
    eps = 1e-3  # the default
    check(paired(exo_pair_loss)[0], [sig(BETA * h) * (lsig(BETA * h) - math.log(1 - eps))
                                     + sig(-BETA * h) * (lsig(-BETA * h) - math.log(eps)) for h in H])
    check(paired(nca_pair_loss)[0], [-lsig(BETA * c) - 0.5 * lsig(-BETA * c) - 0.5 * lsig(-BETA * r)
                                     for c, r in zip(C, R)])
    for kw, tau in (({}, 0.05), ({"discopop_tau": 1.0}, 1.0)):  # 0.05: the default
        check(paired(discopop_loss, **kw)[0], [-lsig(BETA * h) * (1 - sig(BETA * h / tau))
                                               + math.exp(-BETA * h) * sig(BETA * h / tau) for h in H])


def test_bco_pair_and_running_mean_hand_computed():
    delta = 0.3
    losses_, cr, rr, metrics = paired(bco_pair_loss, delta=delta)
    check(losses_, [-lsig(BETA * c - delta) - lsig(-(BETA * r - delta)) for c, r in zip(C, R)])
    check(metrics["reward_mean"], [BETA * (c + r) / 2 for c, r in zip(C, R)])
    # running mean, from TRL's initial state (0, 1e-24): 2 -> mean 2; then 4 -> mean 3 (count 2); then 0 counted twice
    mean, count = running_mean_update(0.0, 1e-24, 2.0)
    assert mean == pytest.approx(2.0, abs=1e-15) and count == pytest.approx(1.0, abs=1e-15)
    mean, count = running_mean_update(mean, count, 4.0)
    assert (mean, count) == pytest.approx((3.0, 2.0), abs=1e-15)
    assert running_mean_update(mean, count, 0.0, batch_count=2) == pytest.approx((1.5, 4.0), abs=1e-15)


def test_reference_free_hand_computed_and_never_read_reference():
    h = [a - b for a, b in zip(CH, RJ)]  # [0.5, -0.5, 2.4]
    nan = t([math.nan] * 3)  # a reference that would poison any loss that read it
    gamma = 0.5  # simpo default
    for ref in (None, nan):
        out, cr, rr, _ = simpo_loss(t(CH), t(RJ), ref, ref, beta=BETA)
        check(out, [-lsig(BETA * x - gamma) for x in h])
        check(cr, [BETA * x for x in CH])
        check(rr, [BETA * x for x in RJ])
        check(simpo_loss(t(CH), t(RJ), ref, ref, beta=BETA, simpo_gamma=0.2, label_smoothing=0.1)[0],
              [-0.9 * lsig(BETA * x - 0.2) - 0.1 * lsig(-(BETA * x - 0.2)) for x in h])
        check(cpo_loss(t(CH), t(RJ), ref, ref, beta=BETA)[0], [-lsig(BETA * x) for x in h])
        check(cpo_loss(t(CH), t(RJ), ref, ref, beta=BETA, label_smoothing=0.2)[0],
              [-0.8 * lsig(BETA * x) - 0.2 * lsig(-BETA * x) for x in h])
        # ORPO: log odds(p) = log(p / (1 - p)) on the averaged log-probs
        odds = [(a - math.log(1 - math.exp(a))) - (b - math.log(1 - math.exp(b))) for a, b in zip(CH, RJ)]
        out, cr, rr, metrics = orpo_loss(t(CH), t(RJ), ref, ref, beta=BETA)
        check(out, [-BETA * lsig(o) for o in odds])
        check(metrics["log_odds_chosen"], odds)
        check(metrics["log_odds_ratio"], [lsig(o) for o in odds])
        check(cr, [BETA * x for x in CH])


def test_orpo_hand_computed_at_even_odds():
    # p_w = p_l = 1/2: odds 1 each, log-odds difference 0, loss = lambda log 2; p_w = 3/4, p_l = 1/4: odds 3 and 1/3
    out, _, _, metrics = orpo_loss(t([math.log(0.5), math.log(0.75)]), t([math.log(0.5), math.log(0.25)]), beta=0.1)
    check(out, [0.1 * math.log(2), 0.1 * math.log1p(1 / 9)])
    check(metrics["log_odds_chosen"], [0.0, math.log(9)])


def test_kto_hand_computed():
    logps, ref = [-1.0, -2.5, -0.7], [-1.2, -2.0, -0.9]
    desirable, kl = [True, False, True], 0.1
    x = [a - b for a, b in zip(logps, ref)]  # [0.2, -0.5, 0.2]
    out, rewards, metrics = kto_loss(t(logps), t(ref), torch.tensor(desirable), t(kl), beta=BETA,
                                     undesirable_weight=1.5)
    check(out, [1 - sig(BETA * (x[0] - kl)), 1.5 * (1 - sig(BETA * (kl - x[1]))), 1 - sig(BETA * (x[2] - kl))])
    check(rewards, [BETA * v for v in x])
    check(metrics["kl"], [kl] * 3)
    # at x = kl every loss is weight * 1/2
    check(kto_loss(t([0.1, 0.1]), t([0.0, 0.0]), [True, False], 0.1, beta=2.0, desirable_weight=3.0)[0], [1.5, 0.5])


def test_kto_kl_hand_computed():
    assert kto_kl(t([-1.0, -2.0]), t([-1.5, -1.8])).item() == pytest.approx(0.15, abs=1e-15)  # mean(0.5, -0.2)
    assert kto_kl(t([-1.0, -2.0]), t([-0.5, -1.8])).item() == 0.0  # mean(-0.5, -0.2) < 0: clamped
    x = t([-1.0, -2.0]).requires_grad_()
    assert not kto_kl(x, t([-1.5, -1.8])).requires_grad


def test_dft_and_nll_hand_computed():
    logps = t([-0.1, -2.0, 0.0]).requires_grad_()  # the last row: unlabelled (log-prob 0), contributes nothing
    out = dft_loss(logps, 4)
    assert out.item() == pytest.approx(-(math.exp(-0.1) * -0.1 + math.exp(-2.0) * -2.0) / 4, abs=1e-15)
    out.backward()  # the weight exp(logp) is detached: d/dlogp = -exp(logp) / N
    check(logps.grad, [-math.exp(-0.1) / 4, -math.exp(-2.0) / 4, -1 / 4])
    assert dft_loss(t([-0.1, -2.0]), torch.tensor(4)).item() == pytest.approx(out.item(), abs=1e-15)
    assert nll_loss(t([-3.0, -5.0]), 4).item() == 2.0
    assert nll_loss(t([-3.0, -5.0]), torch.tensor(16)).item() == 0.5
    assert nll_loss(t([]), 0).item() == 0.0  # no tokens: 0, not nan


def test_hand_anchor_points():
    """Closed forms where everything cancels: zero margin / zero log-ratios."""
    z = t([0.0, 0.0])
    ln2 = math.log(2)
    assert torch.allclose(dpo_loss(z, z, z, z, beta=0.1)[0], t([ln2] * 2), atol=1e-15)
    assert torch.allclose(robust_loss(z, z, z, z, beta=0.1)[0], t([ln2] * 2), atol=1e-15)
    assert torch.allclose(nca_pair_loss(z, z, z, z, beta=0.1)[0], t([2 * ln2] * 2), atol=1e-15)
    assert torch.allclose(bco_pair_loss(z, z, z, z, beta=0.1, delta=0.0)[0], t([2 * ln2] * 2), atol=1e-15)
    assert torch.allclose(apo_zero_loss(z, z, z, z, beta=0.1)[0], t([1.0] * 2), atol=1e-15)
    assert torch.allclose(apo_down_loss(z, z, z, z, beta=0.1)[0], t([1.0] * 2), atol=1e-15)
    assert torch.allclose(discopop_loss(z, z, z, z, beta=0.1)[0], t([(ln2 + 1) / 2] * 2), atol=1e-15)
    assert torch.allclose(exo_pair_loss(z, z, z, z, beta=0.1)[0],
                          t([-ln2 - 0.5 * math.log(1e-3) - 0.5 * math.log(1 - 1e-3)] * 2), atol=1e-15)
    # IPO's and SPPO's minima: h = 1/(2 beta); c = 1/(2 beta), r = -1/(2 beta)
    half = t([5.0, 5.0])
    assert torch.allclose(ipo_loss(half, z, z, z, beta=0.1)[0], z, atol=1e-15)
    assert torch.allclose(sppo_hard_loss(half, -half, z, z, beta=0.1)[0], z, atol=1e-15)
    assert torch.allclose(hinge_loss(t([10.0, 20.0]), z, z, z, beta=0.1)[0], z, atol=1e-15)


PAIRED = [(dpo_loss, {}), (robust_loss, {}), (ipo_loss, {}), (hinge_loss, {}), (exo_pair_loss, {}),
          (nca_pair_loss, {}), (sppo_hard_loss, {}), (apo_zero_loss, {}), (apo_down_loss, {}), (discopop_loss, {}),
          (bco_pair_loss, {"delta": 0.1}), (simpo_loss, {}), (cpo_loss, {}), (orpo_loss, {})]


@pytest.mark.parametrize("fn,kw", PAIRED, ids=[f.__name__ for f, _ in PAIRED])
def test_uniform_signature_shapes_and_detached_rewards(fn, kw):
    """Every paired loss: (losses [B], chosen_rewards [B], rejected_rewards [B], {name: [B]}), rewards detached,
    losses differentiable; dtype kept (float32 in, float32 out)."""
    B = 4
    chosen, rejected = -torch.rand(B, requires_grad=True) - 0.1, -torch.rand(B, requires_grad=True) - 0.1
    ref_c, ref_r = -torch.rand(B) - 0.1, -torch.rand(B) - 0.1
    out, cr, rr, metrics = fn(chosen, rejected, ref_c, ref_r, beta=0.1, **kw)
    for x in (out, cr, rr, *metrics.values()):
        assert x.shape == (B,) and x.dtype == torch.float32
    assert out.requires_grad and not cr.requires_grad and not rr.requires_grad
    assert not any(m.requires_grad for m in metrics.values())
    with pytest.raises(ValueError, match="beta"):
        fn(chosen, rejected, ref_c, ref_r, beta=0.0, **kw)


def test_bad_hyper_parameters_rejected():
    """beta <= 0 by the functions themselves; label_smoothing's ranges are the table's (checked by the config), and
    each loss is finite at the edges of its own range."""
    z = t([0.0])
    with pytest.raises(ValueError, match="beta"):
        kto_loss(z, z, [True], 0.0, beta=-1.0)
    x = t([-1.0, -2.0])
    for name, spec in losses.LOSSES.items():
        if spec.online is not None or spec.head != "causal_lm":  # not log-prob pairs: their own tests
            continue
        params = {k: v for k, v in spec.params.items() if k not in losses.MODIFIERS}
        params.update({"delta": 0.0} if spec.running_mean else {})  # BCO's running mean comes from the trainer
        for key, bounds in spec.ranges.items():
            lo = bounds.get("ge", bounds.get("gt", 0) + 1e-6)
            hi = bounds.get("le", bounds.get("lt", 1) - 1e-6)
            for value in (lo, hi):
                out = spec.fn(x, x.flip(0), x, x, **{**params, key: value})[0]
                assert torch.isfinite(out).all(), (name, key, value)


def random_pairs(B=8, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return [-(torch.rand(B, generator=g, dtype=dtype) * 30 + 0.5) for _ in range(4)]


# ---------------------------------------------------------------------------------------------------------------------
# 2./3. Agreement with TRL 1.16 (float64, 1e-6) on identical random log-probs, and gradients through both.
# ---------------------------------------------------------------------------------------------------------------------


class _Accelerator:
    """accelerate.Accelerator, one process: gathers are the identity."""
    device = torch.device("cpu")
    parallelism_config = None
    num_processes = 1
    use_distributed = False

    def gather(self, x):
        return x

    gather_for_metrics = gather


def _stub(**attrs):
    """What TRL's _compute_loss methods read from `self` besides the loss hyper-parameters."""
    base = dict(accelerator=_Accelerator(), model=SimpleNamespace(training=True), aux_loss_enabled=False,
                _metrics=collections.defaultdict(lambda: collections.defaultdict(list)), _total_train_tokens=0,
                _tp_size=1, precompute_ref_logps=True)
    return SimpleNamespace(**{**base, **attrs})


def _model_outputs(token_logps):
    """The fused-LM-head outputs TRL's trainers read: per-token log-probs (0 where there is no label) and metric
    side outputs, which do not enter the loss."""
    zeros = torch.zeros_like(token_logps.detach())
    return SimpleNamespace(log_probs=token_logps, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool(),
                           label_mask=token_logps.detach() != 0, aux_loss=None)


def token_batch(rows, T=6, seed=0):
    """Per-token log-probs [rows, T] (leaf, requires grad), 0 past each completion's length, and the mask.
    The sequences TRL sees are T + 1 long: one prompt token, then the completion (columns 1..len)."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, T + 1, (rows,), generator=g)
    mask = (torch.arange(T)[None, :] < lens[:, None]).to(F64)
    tok = (-(torch.rand(rows, T, generator=g, dtype=F64) * 1.5 + 0.01) * mask).requires_grad_()
    ref = -(torch.rand(rows, T, generator=g, dtype=F64) * 1.5 + 0.01) * mask
    return tok, ref, mask, lens.to(F64)


def trl_dpo(loss_type, tok, ref_sums, mask, **hyper):
    """TRL 1.16's DPOTrainer._compute_loss on precomputed reference log-probs, one pair at a time (it returns the
    batch mean), so the per-pair losses and rewards come back. Rows: [chosen_0..B-1, rejected_0..B-1]."""
    B = tok.shape[0] // 2
    out, chosen_rewards, rejected_rewards = [], [], []
    for i in range(B):
        rows = [i, B + i]
        stub = _stub(beta=hyper.get("beta", 0.1), loss_types=[loss_type],
                     loss_weights=[1.0], ld_alpha=None, f_divergence_type="reverse_kl",
                     label_smoothing=hyper.get("label_smoothing", 0.0), use_weighting=False,
                     args=SimpleNamespace(discopop_tau=hyper.get("discopop_tau", 0.05)))
        token_logps = tok[rows] * mask[rows]  # the model's log_probs are 0 on unlabelled positions
        completion_mask = F.pad(mask[rows], (1, 0)).long()  # column 0: the prompt token
        inputs = {"input_ids": torch.zeros_like(completion_mask), "attention_mask": torch.ones_like(completion_mask),
                  "completion_mask": completion_mask,
                  "ref_chosen_logps": ref_sums[i:i + 1], "ref_rejected_logps": ref_sums[B + i:B + i + 1]}
        out.append(DPOTrainer._compute_loss(stub, lambda **kw: _model_outputs(token_logps), inputs, False))
        chosen_rewards.append(stub._metrics["train"]["rewards/chosen"][-1])
        rejected_rewards.append(stub._metrics["train"]["rewards/rejected"][-1])
    return torch.stack(out), t(chosen_rewards), t(rejected_rewards)


def ours_paired(fn, tok, ref, mask, lens, average=False, **kw):
    """Our loss on the same data, as sequence log-probs: sums (or length averages) of the per-token log-probs."""
    B = tok.shape[0] // 2
    seq, ref_seq = (tok * mask).sum(1), ref.sum(1)
    if average:
        seq, ref_seq = seq / lens, ref_seq / lens
    return fn(seq[:B], seq[B:], ref_seq[:B], ref_seq[B:], **kw)


# (our function, its hyper-parameters, TRL's loss_type, TRL's hyper-parameters, average log-probs for ours).
# Where the semantics differ on purpose, the comment says how the comparison bridges it.
DPO_CASES = [
    (dpo_loss, {}, "sigmoid", {}, False),
    (hinge_loss, {}, "hinge", {}, False),
    # TRL's IPO divides each sequence's log-ratio by its completion length; ours takes whatever log-probs it is
    # given (the original DPO code: sums), so TRL's IPO is ours on length-averaged log-probs.
    (ipo_loss, {}, "ipo", {}, True),
    (exo_pair_loss, {}, "exo_pair", {"label_smoothing": 1e-3}, False),  # TRL's default 0 is refused by its EXO
    (exo_pair_loss, {"label_smoothing": 0.05}, "exo_pair", {"label_smoothing": 0.05}, False),
    (nca_pair_loss, {}, "nca_pair", {}, False),
    (robust_loss, {}, "robust", {"label_smoothing": 0.1}, False),  # TRL's field defaults to 0 (= DPO); ours to 0.1
    (robust_loss, {"label_smoothing": 0.3}, "robust", {"label_smoothing": 0.3}, False),
    # TRL 1.16 dropped BCO's running-mean shift: its bco_pair is ours with delta = 0 (with delta: see below).
    (bco_pair_loss, {"delta": 0.0}, "bco_pair", {}, False),
    (sppo_hard_loss, {}, "sppo_hard", {}, False),
    (apo_zero_loss, {}, "apo_zero", {}, False),
    (apo_down_loss, {}, "apo_down", {}, False),
    (discopop_loss, {}, "discopop", {}, False),
    (discopop_loss, {"discopop_tau": 0.5}, "discopop", {"discopop_tau": 0.5}, False),
]


@pytest.mark.parametrize("beta", [0.1, 0.7])
@pytest.mark.parametrize("fn,kw,loss_type,trl_kw,average", DPO_CASES,
                         ids=[f"{c[2]}-{i}" for i, c in enumerate(DPO_CASES)])
def test_matches_trl_dpo_trainer(fn, kw, loss_type, trl_kw, average, beta):
    tok, ref, mask, lens = token_batch(rows=2 * 5, seed=sum(map(ord, loss_type)))
    want, want_cr, want_rr = trl_dpo(loss_type, tok, ref.sum(1), mask, beta=beta, **trl_kw)
    got, cr, rr, _ = ours_paired(fn, tok, ref, mask, lens, average=average, beta=beta, **kw)
    torch.testing.assert_close(got, want, **TOL)
    if not average:  # TRL's rewards are beta * (summed) log-ratios: ours too on sums
        torch.testing.assert_close(cr, want_cr, **TOL)
        torch.testing.assert_close(rr, want_rr, **TOL)


def test_dpo_gradient_matches_trl():
    tok, ref, mask, lens = token_batch(rows=2 * 6, seed=1)
    want = torch.autograd.grad(trl_dpo("sigmoid", tok, ref.sum(1), mask, beta=0.3)[0].sum(), tok)[0]
    got = torch.autograd.grad(ours_paired(dpo_loss, tok, ref, mask, lens, beta=0.3)[0].sum(), tok)[0]
    assert want.abs().max() > 1e-3
    torch.testing.assert_close(got, want, **TOL)


def test_rpo_nll_matches_trl_sft_loss_type():
    """TRL's DPO loss_type 'sft' (RPO's NLL term, Pang et al. 2024): the chosen-token mean of one micro-batch, which is
    nll_loss on the chosen sums with that micro-batch's chosen-token count (ours takes the global count instead)."""
    tok, ref, mask, lens = token_batch(rows=2 * 4, seed=2)
    B = 4
    stub = _stub(beta=0.1, loss_types=["sft"], loss_weights=[1.0], ld_alpha=None, f_divergence_type="reverse_kl",
                 label_smoothing=0.0, use_weighting=False, args=SimpleNamespace(discopop_tau=0.05))
    completion_mask = F.pad(mask, (1, 0)).long()
    inputs = {"input_ids": torch.zeros_like(completion_mask), "attention_mask": torch.ones_like(completion_mask),
              "completion_mask": completion_mask,
              "ref_chosen_logps": ref.sum(1)[:B], "ref_rejected_logps": ref.sum(1)[B:]}
    want = DPOTrainer._compute_loss(stub, lambda **kw: _model_outputs(tok * mask), inputs, False)
    got = nll_loss((tok * mask).sum(1)[:B], mask[:B].sum())
    torch.testing.assert_close(got, want, **TOL)
    torch.testing.assert_close(torch.autograd.grad(got, tok)[0], torch.autograd.grad(want, tok)[0], **TOL)


def test_bco_pair_running_mean_matches_trl_running_moments():
    """TRL 1.16 has no running mean in bco_pair any more. Oracle: TRL 0.9-0.28's bco_pair branch of
    DPOTrainer.dpo_loss and its trl/trainer/utils.py RunningMoments.update (mean and count part), re-typed here;
    TRL folds the batch's mean reward in BEFORE the loss, which is how the caller uses running_mean_update here."""
    class RunningMoments:  # re-typed from TRL <= 0.28 (single process)
        def __init__(self):
            self.mean, self.var, self.count = 0.0, 1.0, 1e-24

        @torch.no_grad()
        def update(self, xs):
            xs_count = xs.numel()
            xs_var, xs_mean = torch.var_mean(xs, unbiased=False)
            xs_mean, xs_var = xs_mean.float(), xs_var.float()
            delta = xs_mean - self.mean
            tot_count = self.count + xs_count
            old_sum = self.var * self.count + delta ** 2 * self.count * xs_count / tot_count
            self.mean += (delta * xs_count / tot_count).item()
            self.var = ((old_sum + xs_var * xs_count) / tot_count).item()
            self.count = tot_count

    running, mean, count, beta = RunningMoments(), 0.0, 1e-24, 0.2
    for step in range(4):
        c, r, rc, rr = random_pairs(B=6, seed=10 + step)
        chosen_rewards, rejected_rewards = beta * (c - rc), beta * (r - rr)
        running.update(torch.cat((chosen_rewards, rejected_rewards), 0).mean().detach())
        want = -F.logsigmoid(chosen_rewards - running.mean) - F.logsigmoid(-(rejected_rewards - running.mean))

        batch_mean = bco_pair_loss(c, r, rc, rr, beta=beta, delta=0.0)[3]["reward_mean"].mean()  # delta-independent
        mean, count = running_mean_update(mean, count, batch_mean.item())
        got = bco_pair_loss(c, r, rc, rr, beta=beta, delta=mean)[0]
        assert count == running.count and mean == pytest.approx(running.mean, abs=1e-6)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)  # the oracle's running mean is float32


def cpo_stub(**kw):
    return SimpleNamespace(**{"alpha": 0.0, "accelerator": _Accelerator(), "loss_type": "sigmoid", "beta": 0.1,
                              "label_smoothing": 0.0, "simpo_gamma": 0.5, **kw})


@pytest.mark.parametrize("beta,eps", [(0.1, 0.0), (0.5, 0.2)])
def test_cpo_matches_trl(beta, eps):
    c, r = random_pairs(B=8, seed=3)[:2]
    want, want_cr, want_rr = CPOTrainer.cpo_loss(cpo_stub(beta=beta, label_smoothing=eps), c, r)
    got, cr, rr, _ = cpo_loss(c, r, None, None, beta=beta, label_smoothing=eps)
    for a, b in ((got, want), (cr, want_cr), (rr, want_rr)):
        torch.testing.assert_close(a, b, **TOL)
    # CPO's sigmoid is reference-free cDPO: dpo_loss with zero reference log-probs gives the same
    torch.testing.assert_close(dpo_loss(c, r, 0 * c, 0 * r, beta=beta, label_smoothing=eps)[0], want, **TOL)


@pytest.mark.parametrize("beta,gamma,eps", [(2.0, 0.5, 0.0), (2.5, 1.4, 0.0), (0.1, 0.5, 0.1)])
def test_simpo_matches_trl_values_and_gradients(beta, gamma, eps):
    g = torch.Generator().manual_seed(4)
    c = -(torch.rand(8, generator=g, dtype=F64) * 2 + 0.05)  # length-averaged log-probs
    r = -(torch.rand(8, generator=g, dtype=F64) * 2 + 0.05)
    c1, r1, c2, r2 = (x.clone().requires_grad_() for x in (c, r, c, r))
    want, want_cr, want_rr = CPOTrainer.cpo_loss(cpo_stub(loss_type="simpo", beta=beta, simpo_gamma=gamma,
                                                          label_smoothing=eps), c1, r1)
    got, cr, rr, _ = simpo_loss(c2, r2, None, None, beta=beta, simpo_gamma=gamma, label_smoothing=eps)
    for a, b in ((got, want), (cr, want_cr), (rr, want_rr)):
        torch.testing.assert_close(a, b, **TOL)
    for a, b in zip(torch.autograd.grad(got.sum(), (c2, r2)), torch.autograd.grad(want.sum(), (c1, r1))):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("beta", [0.1, 0.25])
def test_orpo_matches_trl(beta):
    """TRL's odds_ratio_loss returns beta * log sigmoid(log-odds difference), which its trainer SUBTRACTS from the NLL;
    ours returns the loss to minimise, so ours = -TRL's. TRL casts the log-probs to float32 (`.float()`), so the
    agreement is at float32 rounding (still within 1e-6 here)."""
    g = torch.Generator().manual_seed(5)
    c = -(torch.rand(16, generator=g, dtype=F64) * 3 + 0.01)  # length-averaged, as ORPO requires
    r = -(torch.rand(16, generator=g, dtype=F64) * 3 + 0.01)
    c1, r1, c2, r2 = (x.clone().requires_grad_() for x in (c, r, c, r))
    want, want_cr, want_rr, log_odds_ratio, log_odds_chosen = ORPOTrainer.odds_ratio_loss(cpo_stub(beta=beta), c1, r1)
    got, cr, rr, metrics = orpo_loss(c2, r2, None, None, beta=beta)
    torch.testing.assert_close(got, -want.to(F64), **TOL)
    torch.testing.assert_close(cr, want_cr.to(F64), **TOL)
    torch.testing.assert_close(rr, want_rr.to(F64), **TOL)
    torch.testing.assert_close(metrics["log_odds_ratio"].mean(), log_odds_ratio.to(F64), **TOL)
    torch.testing.assert_close(metrics["log_odds_chosen"].mean(), log_odds_chosen.to(F64), **TOL)
    for a, b in zip(torch.autograd.grad(got.sum(), (c2, r2)), torch.autograd.grad(-want.sum(), (c1, r1))):
        torch.testing.assert_close(a, b, **TOL)


def trl_kto(tok, ref_sums, kl_tok, ref_kl_sums, mask, kl_mask, desirable, **hyper):
    """TRL 1.16's KTOTrainer._compute_loss, one example at a time against the same (whole) KL batch, so the
    per-example weighted losses and rewards come back (it returns their mean). Also returns TRL's KL estimate."""
    out, rewards, kls = [], [], []
    kl_ids = torch.zeros(kl_tok.shape[0], kl_tok.shape[1] + 1, dtype=torch.long)
    kl_completion = F.pad(kl_mask, (1, 0)).long()
    for i in range(tok.shape[0]):
        stub = _stub(calculate_KL=True, loss_type="kto", beta=hyper.get("beta", 0.1),
                     desirable_weight=hyper.get("desirable_weight", 1.0),
                     undesirable_weight=hyper.get("undesirable_weight", 1.0))
        stub._compute_kl_logps = MethodType(KTOTrainer._compute_kl_logps, stub)  # TRL's own KL forward, on the stub
        completion = F.pad(mask[i:i + 1], (1, 0)).long()
        ids = torch.zeros_like(completion)
        token_logps, kl_logps = tok[i:i + 1] * mask[i:i + 1], kl_tok * kl_mask

        def model(input_ids, **kw):  # the KL forward gets the KL sequences, the main forward the completions
            return _model_outputs(kl_logps if input_ids is kl_ids else token_logps)

        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(completion), "completion_mask": completion,
                  "label": desirable[i:i + 1], "ref_logps": ref_sums[i:i + 1], "KL_input_ids": kl_ids,
                  "KL_attention_mask": torch.ones_like(kl_completion), "KL_completion_mask": kl_completion,
                  "ref_KL_logps": ref_kl_sums}
        out.append(KTOTrainer._compute_loss(stub, model, inputs, False))
        key = "rewards/chosen" if desirable[i] else "rewards/rejected"
        rewards.append(stub._metrics["train"][key][-1])
        kls.append(stub._metrics["train"]["kl"][-1])
    assert len(set(kls)) == 1
    return torch.stack(out), t(rewards), kls[0]


@pytest.mark.parametrize("hyper,kl_shift", [({"beta": 0.1}, 0.0), ({"beta": 0.5, "undesirable_weight": 1.33}, 0.0),
                                            ({"beta": 0.3, "desirable_weight": 0.7}, -3.0)])
def test_kto_matches_trl_values_and_gradients(hyper, kl_shift):
    """TRL orders the losses [desirable..., undesirable...]; ours keeps the input order (same mean). kl_shift = -3
    makes the policy's KL log-probs lower, so the KL estimate is clamped to 0 in both."""
    tok, ref, mask, lens = token_batch(rows=7, seed=6)
    kl_tok, kl_ref, kl_mask, _ = token_batch(rows=7, seed=7)
    kl_tok = (kl_tok.detach() + kl_shift * kl_mask).requires_grad_()
    desirable = torch.tensor([True, False, True, True, False, False, True])
    want, want_rewards, want_kl = trl_kto(tok, ref.sum(1), kl_tok, kl_ref.sum(1), mask, kl_mask, desirable, **hyper)

    kl = kto_kl((kl_tok * kl_mask).sum(1), kl_ref.sum(1))
    got, rewards, metrics = kto_loss((tok * mask).sum(1), ref.sum(1), desirable, kl, **hyper)
    assert kl.item() == pytest.approx(want_kl, abs=1e-12) and (want_kl == 0.0) == (kl_shift < 0)
    torch.testing.assert_close(got, want, **TOL)
    torch.testing.assert_close(rewards, want_rewards, **TOL)
    torch.testing.assert_close(torch.autograd.grad(got.sum(), tok)[0], torch.autograd.grad(want.sum(), tok)[0], **TOL)


@pytest.mark.parametrize("loss_type,ours", [("dft", dft_loss), ("nll", losses.sft_loss)])
def test_dft_matches_trl_sft_trainer(loss_type, ours):
    """SFTTrainer.compute_loss with num_items_in_batch = the global token count (larger than this micro-batch's)."""
    tok, _, mask, _ = token_batch(rows=5, seed=8)
    token_logps = tok * mask
    num_items = mask.sum() * 3  # as if this were one of three micro-batches
    stub = _stub(compute_loss_func=None, label_smoother=None,
                 args=SimpleNamespace(loss_type=loss_type, average_tokens_across_devices=False))
    inputs = {"input_ids": torch.zeros(5, 7, dtype=torch.long), "attention_mask": torch.ones(5, 7, dtype=torch.long)}
    want = SFTTrainer.compute_loss(stub, lambda **kw: _model_outputs(token_logps), inputs, num_items_in_batch=num_items)
    got = ours((tok * mask)[mask.bool()], num_items)  # ours takes the flat [N] label tokens (own graph)
    torch.testing.assert_close(got, want, **TOL)
    torch.testing.assert_close(torch.autograd.grad(got, tok)[0], torch.autograd.grad(want, tok)[0], **TOL)


# ---------------------------------------------------------------------------------------------------------------------
# Losses TRL 1.16 no longer has with these semantics: cDPO label smoothing (removed from its DPOTrainer in v0.29) and
# reference-free DPO. Oracles: torchtune's DPOLoss / RSOLoss, and the original DPO repository's preference_loss.
# ---------------------------------------------------------------------------------------------------------------------


def original_dpo_preference_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                                 reference_rejected_logps, beta, label_smoothing=0.0, ipo=False, reference_free=False):
    """Re-typed from eric-mitchell/direct-preference-optimization, trainers.py, preference_loss (as an oracle)."""
    pi_logratios = policy_chosen_logps - policy_rejected_logps
    ref_logratios = reference_chosen_logps - reference_rejected_logps
    if reference_free:
        ref_logratios = 0
    logits = pi_logratios - ref_logratios  # also known as h_{\pi_\theta}^{y_w,y_l}
    if ipo:
        losses = (logits - 1 / (2 * beta)) ** 2  # Eq. 17 of https://arxiv.org/pdf/2310.12036v2.pdf
    else:
        # Eq. 3 https://ericmitchell.ai/cdpo.pdf; label_smoothing=0 gives original DPO
        # (Eq. 7 of https://arxiv.org/pdf/2305.18290.pdf)
        losses = -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing
    chosen_rewards = beta * (policy_chosen_logps - reference_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - reference_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards


@pytest.mark.parametrize("kwargs", [dict(beta=0.1), dict(beta=0.3, label_smoothing=0.1), dict(beta=0.5, ipo=True),
                                    dict(beta=0.2, reference_free=True, label_smoothing=0.2)])
def test_matches_original_dpo_repository(kwargs):
    """Rewards differ on purpose for reference_free: the original keeps beta * (logp - ref_logp) as the reward even
    then; we (and preference_loss) pass zero reference log-probs, so the reward is beta * logp, as TRL's CPO logs."""
    c, r, rc, rr = random_pairs(seed=9)
    want = original_dpo_preference_loss(c, r, rc, rr, **kwargs)
    kw = dict(kwargs)
    ref_free = kw.pop("reference_free", False)
    fn = ipo_loss if kw.pop("ipo", False) else dpo_loss
    got = fn(c, r, 0 * rc if ref_free else rc, 0 * rr if ref_free else rr, **kw)
    torch.testing.assert_close(got[0], want[0], **TOL)
    if not ref_free:
        torch.testing.assert_close(got[1], want[1], **TOL)
        torch.testing.assert_close(got[2], want[2], **TOL)


def _torchtune_dpo_module():
    """torchtune/rlhf/loss/dpo.py, loaded by path: it imports only torch, while torchtune's package __init__ needs
    torchao (not installed here; torchtune is an optional test dependency: `pip install --no-deps torchtune`)."""
    spec = importlib.util.find_spec("torchtune")
    if spec is None:
        pytest.skip("torchtune not installed (optional: pip install --no-deps torchtune)")
    path = os.path.join(spec.submodule_search_locations[0], "rlhf", "loss", "dpo.py")
    module_spec = importlib.util.spec_from_file_location("_torchtune_rlhf_loss_dpo", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("beta,eps", [(0.1, 0.0), (0.1, 0.1), (0.5, 0.3)])
def test_cdpo_and_hinge_match_torchtune(beta, eps):
    tt = _torchtune_dpo_module()
    c, r, rc, rr = (x.clone().requires_grad_() for x in random_pairs(seed=11))
    for ours, theirs in ((dpo_loss(c, r, rc, rr, beta=beta, label_smoothing=eps), tt.DPOLoss(beta, eps)(c, r, rc, rr)),
                         (hinge_loss(c, r, rc, rr, beta=beta), tt.RSOLoss(gamma=beta)(c, r, rc, rr))):
        for a, b in zip(ours[:3], theirs):
            torch.testing.assert_close(a, b, **TOL)
        for a, b in zip(torch.autograd.grad(ours[0].sum(), (c, r)), torch.autograd.grad(theirs[0].sum(), (c, r))):
            torch.testing.assert_close(a, b, **TOL)


# ---------------------------------------------------------------------------------------------------------------------
# The reward model's Bradley-Terry loss against TRL's RewardTrainer.compute_loss on the same scores (and its gradient).
# ---------------------------------------------------------------------------------------------------------------------
def trl_reward_loss(chosen, rejected, margin, coefficient):
    """TRL's RewardTrainer.compute_loss with a model that returns the given scores (chosen rows, then rejected)."""
    from trl import RewardTrainer
    scores = torch.cat([chosen, rejected])[:, None]
    accelerator = SimpleNamespace(gather=lambda x: x, gather_for_metrics=lambda x: x)
    stub = SimpleNamespace(model=SimpleNamespace(training=False), accelerator=accelerator,
                           args=SimpleNamespace(center_rewards_coefficient=coefficient),
                           _metrics={"eval": collections.defaultdict(list)}, _total_train_tokens=0)
    inputs = {"input_ids": None, **({"margin": margin} if margin is not None else {})}
    return RewardTrainer.compute_loss(stub, lambda **kw: SimpleNamespace(logits=scores), inputs)


@pytest.mark.parametrize("margin, coefficient", [(False, None), (True, None), (True, 0.01)])
def test_reward_model_loss_matches_trl(margin, coefficient):
    g = torch.Generator().manual_seed(0)
    chosen, rejected = (torch.randn(8, generator=g, dtype=F64) * 2 for _ in range(2))
    margins = torch.rand(8, generator=g, dtype=F64) if margin else None
    ours_c, ours_r = chosen.clone().requires_grad_(), rejected.clone().requires_grad_()
    pair, *_ = losses.reward_model_loss(ours_c, ours_r, margins, center_rewards_coefficient=coefficient or 0.0)
    theirs_c, theirs_r = chosen.clone().requires_grad_(), rejected.clone().requires_grad_()
    want = trl_reward_loss(theirs_c, theirs_r, margins, coefficient)
    torch.testing.assert_close(pair.mean(), want, rtol=1e-12, atol=1e-12)
    pair.mean().backward()
    want.backward()
    torch.testing.assert_close(ours_c.grad, theirs_c.grad)
    torch.testing.assert_close(ours_r.grad, theirs_r.grad)
