"""Tests for losses.py and logprobs.py (the label log-probs it takes): hand-computed values, a naive float64
reference implementation, gradients, masking.

Run: ``OMP_NUM_THREADS=1 python -m pytest -q tests/test_losses.py``
"""

import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import logprobs  # noqa: E402
import losses  # noqa: E402
from logprobs import label_logps, scored_positions  # noqa: E402
from losses import sft_loss  # noqa: E402
from config import in_range  # noqa: E402


def preference_loss(pc, pr, rc, rr, beta, label_smoothing=0.0, ipo=False, reference_free=False):
    """The pair losses of the loss table, called as the trainer calls them: dpo (cDPO with label_smoothing) or ipo,
    reference_free = reference log-probs taken as 0; a hyper-parameter the loss does not take, or out of its range,
    is refused (as the config check refuses it). Returns (losses, chosen_rewards, rejected_rewards)."""
    spec = losses.LOSSES["ipo" if ipo else "dpo"]
    hp = {"beta": beta, **({"label_smoothing": label_smoothing} if label_smoothing or not ipo else {})}
    if set(hp) - set(spec.params):
        raise ValueError(f"{sorted(set(hp) - set(spec.params))} not taken by this loss")
    if any(not in_range(hp[k], bounds) for k, bounds in spec.ranges.items() if k in hp):  # the loss's own ranges
        raise ValueError(f"{hp} out of the loss's ranges {spec.ranges}")
    if reference_free:
        rc, rr = torch.zeros_like(pc), torch.zeros_like(pr)
    return spec.fn(pc, pr, rc, rr, **hp)[:3]


def sequence_logps(logits, labels, average=False):
    """[B, T, V] padded logits -> [B] per-row log-probs, through the trainer's path: scored_positions picks the
    positions whose next token is a label, label_logps scores them, losses.sequence_logps sums per sequence."""
    rows = torch.arange(labels.shape[0])[:, None].expand_as(labels)
    keep, targets, seq = scored_positions(labels, rows)
    return logprobs.sequence_logps(label_logps(logits[keep], targets), seq, labels.shape[0], average)


def token_logps(logits, labels):
    """[B, T-1] per-position log-probs (0 where masked) and the mask, rebuilt from the flat form."""
    keep, targets, _ = scored_positions(labels, torch.zeros_like(labels))
    out = torch.zeros(labels.shape[0], labels.shape[1] - 1, dtype=torch.promote_types(logits.dtype, torch.float32))
    out[keep[:, :-1]] = label_logps(logits[keep], targets)
    return out, labels[:, 1:] != -100

# ---------------------------------------------------------------------------------------------------------------
# Naive reference implementations: explicit log_softmax and Python loops, float64.
# ---------------------------------------------------------------------------------------------------------------


def naive_sequence_logps(logits, labels, average=False):
    logits = logits.double()
    out = []
    for b in range(logits.shape[0]):
        logp = torch.log_softmax(logits[b], dim=-1)  # [T, V]
        total, count = logits.new_zeros(()), 0
        for t in range(1, labels.shape[1]):  # label at t is predicted by the logits at t - 1
            y = int(labels[b, t])
            if y == -100:
                continue
            total = total + logp[t - 1, y]
            count += 1
        out.append(total / max(count, 1) if average else total)
    return torch.stack(out)


def naive_preference_losses(pc, pr, rc, rr, beta, eps=0.0, ipo=False, reference_free=False):
    losses = []
    for i in range(len(pc)):
        ref_c, ref_r = (0.0, 0.0) if reference_free else (rc[i], rr[i])
        h = (pc[i] - pr[i]) - (ref_c - ref_r)
        if ipo:
            losses.append((h - 1 / (2 * beta)) ** 2)
        else:
            # -log sigmoid(x) = log(1 + exp(-x))
            losses.append((1 - eps) * torch.log1p(torch.exp(-beta * h)) + eps * torch.log1p(torch.exp(beta * h)))
    return torch.stack(losses)


def random_batch(B=3, T=7, V=11, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64).mul(3).to(dtype)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :3] = -100  # a prompt
    labels[1, -2:] = -100  # padding
    labels[2, 1:] = -100  # no label tokens at all (labels[:, 0] is never scored)
    return logits, labels


# ---------------------------------------------------------------------------------------------------------------
# sequence_logps / token_logps
# ---------------------------------------------------------------------------------------------------------------

# Vocabulary of 3. Logits [0, 0, ln 2] give softmax [1/4, 1/4, 1/2]: log p(0) = ln(1/4), log p(2) = ln(1/2).
ROW = [0.0, 0.0, math.log(2.0)]


def test_sequence_logps_hand_computed():
    logits = torch.tensor([[ROW, ROW, ROW]])  # [1, 3, 3]
    labels = torch.tensor([[-100, 2, 0]])  # position 0 predicts 2, position 1 predicts 0; position 2 predicts nothing
    # sum = ln(1/2) + ln(1/4) = -ln 8 = -2.0794415
    assert sequence_logps(logits, labels).item() == pytest.approx(-math.log(8), abs=1e-6)
    # mean over the 2 label tokens = -ln(8) / 2 = -1.0397208
    assert sequence_logps(logits, labels, average=True).item() == pytest.approx(-math.log(8) / 2, abs=1e-6)
    # Masking the first label: only ln(1/4) = -1.3862944 remains.
    assert sequence_logps(logits, torch.tensor([[-100, -100, 0]])).item() == pytest.approx(math.log(0.25), abs=1e-6)


def test_shift_uses_previous_position():
    # Position 0 strongly predicts token 1, position 1 strongly predicts token 2. With the shift, labels
    # [x, 1, 2] are near-certain (log p ~ 0) while the unshifted reading [1, 2, x] would be very unlikely.
    big = 20.0
    logits = torch.tensor([[[0.0, big, 0.0], [0.0, 0.0, big], [big, 0.0, 0.0]]])
    good = sequence_logps(logits, torch.tensor([[-100, 1, 2]]))
    bad = sequence_logps(logits, torch.tensor([[-100, 2, 1]]))
    assert good.item() > -1e-6
    assert bad.item() < -35  # 2 * (-20 - log(...)) ~ -40


def test_token_logps_masks_and_values():
    logits, labels = random_batch()
    logps, mask = token_logps(logits, labels)
    assert logps.shape == mask.shape == (3, 6) and mask.dtype == torch.bool
    assert torch.equal(mask, labels[:, 1:] != -100)
    assert torch.all(logps[~mask] == 0)
    ref = torch.log_softmax(logits[:, :-1], -1).gather(-1, labels[:, 1:].clamp(min=0)[..., None])[..., 0]
    torch.testing.assert_close(logps[mask], ref[mask])
    # The label at masked positions does not matter, even an out-of-vocabulary -100.
    other = labels.clone()
    other[0, 0] = 5
    torch.testing.assert_close(sequence_logps(logits, other), sequence_logps(logits, labels))


@pytest.mark.parametrize("average", [False, True])
def test_sequence_logps_matches_naive(average):
    logits, labels = random_batch()
    got = sequence_logps(logits, labels, average=average)
    want = naive_sequence_logps(logits, labels, average=average)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert got[2].item() == 0.0  # no label tokens: 0 for both the sum and the mean (no 0/0)


@pytest.mark.parametrize("average", [False, True])
def test_sequence_logps_gradient_matches_naive(average):
    logits, labels = random_batch(seed=1)
    logits.requires_grad_(True)
    weights = torch.tensor([0.7, -1.3, 2.0], dtype=torch.float64)  # a generic linear functional of the output
    (got,) = torch.autograd.grad((sequence_logps(logits, labels, average) * weights).sum(), logits)
    (want,) = torch.autograd.grad((naive_sequence_logps(logits, labels, average) * weights).sum(), logits)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert torch.all(got[2] == 0)  # no gradient into a sequence without label tokens


def test_sequence_logps_float32_output_and_bf16_input():
    logits64, labels = random_batch(B=3, T=9, V=50, seed=2)
    logits_bf16 = logits64.to(torch.bfloat16).requires_grad_(True)
    got = sequence_logps(logits_bf16, labels)
    assert got.dtype == torch.float32
    # Compare with the naive float64 computation on the same (bf16-rounded) values: the arithmetic is float32.
    want = naive_sequence_logps(logits_bf16.detach().double(), labels)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
    got.sum().backward()
    assert logits_bf16.grad.dtype == torch.bfloat16 and torch.isfinite(logits_bf16.grad).all()
    # float32 in, float32 out
    assert sequence_logps(logits64.float(), labels).dtype == torch.float32


@pytest.mark.parametrize("chunk_values", [2**26, 7])  # one chunk; chunks of 7 // V = 1 row each
def test_label_logps_chunked_matches_log_softmax_and_gradient(monkeypatch, chunk_values):
    monkeypatch.setattr(logprobs, "CHUNK_VALUES", chunk_values)
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(10, 6, generator=g, dtype=torch.float64).mul(4).requires_grad_(True)
    labels = torch.randint(0, 6, (10,), generator=g)
    labels[[2, 7]] = -100
    weights = torch.randn(10, generator=g, dtype=torch.float64)
    got = label_logps(logits, labels)
    full = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[:, None])[:, 0]
    want = torch.where(labels != -100, full, torch.zeros((), dtype=torch.float64))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    (g_got,) = torch.autograd.grad((got * weights).sum(), logits)
    (g_want,) = torch.autograd.grad((want * weights).sum(), logits)
    torch.testing.assert_close(g_got, g_want, rtol=1e-12, atol=1e-12)
    assert torch.all(g_got[[2, 7]] == 0)
    assert torch.autograd.gradcheck(lambda z: label_logps(z, labels), (logits.detach().requires_grad_(True),))


def test_label_logps_keeps_no_float32_copy_of_half_logits():
    """Backward needs only the bf16 logits and an [N] float32 normaliser: the saved tensors say so."""
    logits = torch.randn(64, 1000).to(torch.bfloat16).requires_grad_(True)
    out = label_logps(logits, torch.randint(0, 1000, (64,)))
    saved = [t for t in out.grad_fn.saved_tensors if t.dtype.is_floating_point]
    assert {(t.dtype, tuple(t.shape)) for t in saved} == {(torch.bfloat16, (64, 1000)), (torch.float32, (64,))}


def test_scored_positions():
    labels = torch.tensor([[-100, -100, 5, 6, -100], [-100, 7, -100, 8, 9]])
    seq = torch.tensor([[0, 0, 0, 0, -1], [1, 1, 2, 2, 2]])
    keep, targets, target_seq = scored_positions(labels, seq)
    assert keep.tolist() == [[False, True, True, False, False], [True, False, True, True, False]]
    assert targets.tolist() == [5, 6, 7, 8, 9] and target_seq.tolist() == [0, 0, 1, 2, 2]


def test_sequence_logps_sums_by_sequence_id():
    token = torch.tensor([-1.0, -2.0, -0.5, -4.0])
    seq = torch.tensor([2, 0, 2, 2])
    assert logprobs.sequence_logps(token, seq, 4).tolist() == [-2.0, 0.0, -5.5, 0.0]
    assert logprobs.sequence_logps(token, seq, 4, average=True).tolist() == pytest.approx([-2.0, 0.0, -5.5 / 3, 0.0])


# ---------------------------------------------------------------------------------------------------------------
# preference_loss
# ---------------------------------------------------------------------------------------------------------------

# One pair: policy (chosen, rejected) = (-10, -14), reference = (-11, -12), beta = 0.1.
#   policy log-ratio    = -10 - (-14) = 4
#   reference log-ratio = -11 - (-12) = 1
#   h = 4 - 1 = 3, beta * h = 0.3
PAIR = [torch.tensor([v], dtype=torch.float64) for v in (-10.0, -14.0, -11.0, -12.0)]


def test_dpo_hand_computed():
    losses, chosen, rejected = preference_loss(*PAIR, beta=0.1)
    # -log sigmoid(0.3) = log(1 + exp(-0.3)) = log(1 + 0.7408182) = log(1.7408182) = 0.5543552
    assert losses.item() == pytest.approx(math.log(1 + math.exp(-0.3)), abs=1e-12)
    assert losses.item() == pytest.approx(0.5543552, abs=1e-7)
    # rewards = beta * (policy - reference): 0.1 * (-10 + 11) = 0.1 and 0.1 * (-14 + 12) = -0.2
    assert chosen.item() == pytest.approx(0.1) and rejected.item() == pytest.approx(-0.2)


def test_conservative_dpo_hand_computed():
    out, _, _ = preference_loss(*PAIR, beta=0.1, label_smoothing=0.1)
    # -(0.9) log sigmoid(0.3) - 0.1 log sigmoid(-0.3)
    #   = 0.9 * log(1 + e^-0.3) + 0.1 * log(1 + e^0.3)
    #   = 0.9 * 0.5543552 + 0.1 * 0.8543552     (log(1 + e^x) = x + log(1 + e^-x))
    #   = 0.4989197 + 0.0854355 = 0.5843552
    assert out.item() == pytest.approx(0.9 * math.log(1 + math.exp(-0.3)) + 0.1 * math.log(1 + math.exp(0.3)))
    assert out.item() == pytest.approx(0.5843552, abs=1e-7)
    # eps = 0.5 makes the loss symmetric in h: it no longer prefers either answer, 0.5 * (0.5543552 + 0.8543552);
    # the maths of the function, which is why the config refuses it (the loss table's range for dpo: < 0.5)
    half = losses.dpo_loss(*PAIR, beta=0.1, label_smoothing=0.5)[0]
    assert half.item() == pytest.approx(0.7043552, abs=1e-7)
    with pytest.raises(ValueError, match="out of the loss's ranges"):
        preference_loss(*PAIR, beta=0.1, label_smoothing=0.5)


def test_ipo_hand_computed():
    losses, chosen, rejected = preference_loss(*PAIR, beta=0.1, ipo=True)
    # (h - 1 / (2 beta))^2 = (3 - 1 / 0.2)^2 = (3 - 5)^2 = 4
    assert losses.item() == pytest.approx(4.0, abs=1e-12)
    assert chosen.item() == pytest.approx(0.1) and rejected.item() == pytest.approx(-0.2)
    # beta = 0.5: target margin 1 / (2 * 0.5) = 1, (3 - 1)^2 = 4 as well; beta = 0.25: (3 - 2)^2 = 1
    assert preference_loss(*PAIR, beta=0.25, ipo=True)[0].item() == pytest.approx(1.0)


def test_reference_free_hand_computed_and_ignores_reference():
    losses, chosen, rejected = preference_loss(*PAIR, beta=0.1, reference_free=True)
    # h = 4 - 0 = 4, -log sigmoid(0.4) = log(1 + e^-0.4) = log(1.6703200) = 0.5130153
    assert losses.item() == pytest.approx(0.5130153, abs=1e-7)
    # rewards with the reference treated as 0: 0.1 * -10 = -1.0, 0.1 * -14 = -1.4
    assert chosen.item() == pytest.approx(-1.0) and rejected.item() == pytest.approx(-1.4)
    # Any reference values give the same result.
    other = preference_loss(PAIR[0], PAIR[1], torch.tensor([123.0]).double(), torch.tensor([-7.0]).double(),
                            beta=0.1, reference_free=True)
    for a, b in zip((losses, chosen, rejected), other):
        torch.testing.assert_close(a, b)


def random_logps(B=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(-30 * torch.rand(B, generator=g, dtype=torch.float64)).requires_grad_(True) for _ in range(4)]


@pytest.mark.parametrize(
    "kwargs",
    [dict(beta=0.1), dict(beta=0.5, label_smoothing=0.2), dict(beta=0.1, ipo=True), dict(beta=0.3, reference_free=True),
     dict(beta=0.2, label_smoothing=0.1, reference_free=True), dict(beta=0.05, ipo=True, reference_free=True)],
)
def test_preference_loss_matches_naive_values_and_gradients(kwargs):
    inputs = random_logps()
    losses, chosen, rejected = preference_loss(*inputs, **kwargs)
    naive = naive_preference_losses(*inputs, beta=kwargs["beta"], eps=kwargs.get("label_smoothing", 0.0),
                                    ipo=kwargs.get("ipo", False), reference_free=kwargs.get("reference_free", False))
    torch.testing.assert_close(losses, naive, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(losses.sum(), inputs, allow_unused=True)
    naive_grads = torch.autograd.grad(naive.sum(), inputs, allow_unused=True)
    for got, want in zip(grads, naive_grads):
        if want is None:  # reference_free: the naive loss never reads the reference values
            assert got is None or torch.all(got == 0)
        else:
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert not chosen.requires_grad and not rejected.requires_grad  # rewards are detached


def test_label_smoothing_zero_is_dpo():
    inputs = random_logps(seed=3)
    dpo = preference_loss(*inputs, beta=0.1)[0]
    smoothed = preference_loss(*inputs, beta=0.1, label_smoothing=0.0)[0]
    torch.testing.assert_close(dpo, smoothed, rtol=0, atol=0)
    # and it is the textbook -log sigmoid(beta * h)
    pc, pr, rc, rr = inputs
    torch.testing.assert_close(dpo, -F.logsigmoid(0.1 * ((pc - pr) - (rc - rr))))


def test_dpo_gradient_direction():
    # Descending the DPO loss raises the chosen log-prob and lowers the rejected one.
    pc, pr, rc, rr = random_logps(seed=4)
    losses, _, _ = preference_loss(pc, pr, rc.detach(), rr.detach(), beta=0.1)
    g_c, g_r = torch.autograd.grad(losses.sum(), (pc, pr))
    assert torch.all(g_c < 0) and torch.all(g_r > 0)


def test_preference_loss_rejects_bad_arguments():
    with pytest.raises(ValueError):
        preference_loss(*PAIR, beta=0.0)
    with pytest.raises(ValueError):
        preference_loss(*PAIR, beta=0.1, label_smoothing=0.7)
    with pytest.raises(ValueError):
        preference_loss(*PAIR, beta=0.1, label_smoothing=0.1, ipo=True)


# ---------------------------------------------------------------------------------------------------------------
# sft_loss
# ---------------------------------------------------------------------------------------------------------------


def test_sft_loss_hand_computed():
    logits = torch.tensor([[ROW, ROW, ROW]])
    labels = torch.tensor([[-100, 2, 0]])
    # NLL sum = ln 2 + ln 4 = ln 8 = 2.0794415; divided by the global count 4 -> 0.5198604
    assert sft_loss(token_logps(logits, labels)[0].flatten(), 4).item() == pytest.approx(math.log(8) / 4, abs=1e-6)
    assert sft_loss(token_logps(logits, labels)[0].flatten(), torch.tensor(4)).item() == pytest.approx(math.log(8) / 4, abs=1e-6)


def test_sft_loss_equals_cross_entropy_token_mean():
    logits, labels = random_batch(B=4, T=8, V=13, seed=5)
    n = int((labels[:, 1:] != -100).sum())
    want = F.cross_entropy(logits[:, :-1].reshape(-1, 13), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(sft_loss(token_logps(logits, labels)[0].flatten(), n), want)


class TinyLM(torch.nn.Module):
    """Embedding -> linear: enough to make logits depend on parameters."""

    def __init__(self, V=13, D=5):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.emb = torch.nn.Parameter(torch.randn(V, D, generator=g, dtype=torch.float64))
        self.out = torch.nn.Parameter(torch.randn(D, V, generator=g, dtype=torch.float64))

    def forward(self, ids):
        return self.emb[ids] @ self.out


def _grads(model):
    return [p.grad.clone() for p in model.parameters()]


def test_sft_loss_gradient_accumulation_equivalence():
    # 8 sequences with very different numbers of label tokens (1 .. 9).
    g = torch.Generator().manual_seed(6)
    B, T, V = 8, 10, 13
    ids = torch.randint(0, V, (B, T), generator=g)
    labels = ids.clone()
    for b in range(B):
        labels[b, : T - 1 - b] = -100  # sequence b has b + 1 label tokens
    n_global = int((labels[:, 1:] != -100).sum())
    assert n_global == sum(range(1, 9))

    model = TinyLM(V)
    sft_loss(token_logps(model(ids), labels)[0].flatten(), n_global).backward()  # one micro-batch of 8
    full = _grads(model)

    for micro_bs in (1, 2, 4):  # 8 micro-batches of 1, 4 of 2, 2 of 4
        model.zero_grad()
        for i in range(0, B, micro_bs):
            sft_loss(token_logps(model(ids[i:i + micro_bs]), labels[i:i + micro_bs])[0].flatten(), n_global).backward()
        for a, b in zip(_grads(model), full):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)

    # The buggy alternative (mean per micro-batch, then averaged over micro-batches) gives another gradient.
    model.zero_grad()
    for i in range(B):
        n_local = int((labels[i:i + 1, 1:] != -100).sum())
        (sft_loss(token_logps(model(ids[i:i + 1]), labels[i:i + 1])[0].flatten(), n_local) / B).backward()
    assert any(not torch.allclose(a, b) for a, b in zip(_grads(model), full))
