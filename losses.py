"""Loss functions for SFT and preference optimisation, and LOSSES: the one table of what each `loss.name` needs.

Pure functions of tensors: no config objects, no models. Shapes use B = batch size (preference pairs), N = number of
scored token positions. The token log-probs they take come from logprobs.py (its token convention: ``token_logps``
[N], ``seq_ids`` [N], the sequence each scored token belongs to).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

import rl_losses
from logprobs import sequence_logps

def sft_loss(token_logps: torch.Tensor, num_loss_tokens: int | torch.Tensor) -> torch.Tensor:
    """Next-token NLL of one micro-batch, normalised by the token count of the whole global batch.

    Args:
        token_logps: [N] log-probs of this micro-batch's label tokens (``label_logps``; 0 for unlabelled rows).
        num_loss_tokens: the number of label tokens in the WHOLE global batch: all micro-batches of the optimizer
            step, on all ranks.

    Returns:
        scalar: ``-sum_{label tokens in this micro-batch} log p(y_t) / num_loss_tokens``.

    Summing this over the micro-batches (and ranks) of a step gives exactly the token mean over the global
    batch, ``-(1/N) sum_{all label tokens} log p(y_t)``, so 1 micro-batch of 8 and 8 micro-batches of 1
    give the same gradient. Averaging per-micro-batch means instead weights tokens of short micro-batches
    more (the gradient-accumulation bug fixed across libraries in 2024). With DDP, which averages gradients
    over ranks, multiply by the world size (or pass ``num_loss_tokens / world_size``).
    """
    if isinstance(num_loss_tokens, torch.Tensor):
        denominator = num_loss_tokens.to(device=token_logps.device, dtype=token_logps.dtype).clamp(min=1)
    else:
        denominator = max(num_loss_tokens, 1)
    return -token_logps.sum() / denominator


# ---------------------------------------------------------------------------------------------------------------------
# The preference-optimisation family: one pure function per loss.
#
# Paired losses share one signature, so a table can call them generically:
#
#     <name>_loss(chosen, rejected, ref_chosen, ref_rejected, *, beta, <hyper-parameters>)
#         -> losses [B], chosen_rewards [B], rejected_rewards [B], metrics {name: [B]}
#
# chosen, rejected: [B] the policy's sequence log-probs of y_w, y_l (summed or length-averaged: the caller decides;
# where a loss's paper or TRL prescribes one, its docstring says so). ref_chosen, ref_rejected: [B] the same under
# the reference, or None for reference-free losses (which never read them). The rewards are detached implicit
# rewards: beta * (logp - ref_logp), or beta * logp for reference-free losses (as TRL logs them). metrics holds
# per-pair extras under TRL's metric names. Write c = chosen - ref_chosen, r = rejected - ref_rejected (log-ratios)
# and h = c - r. beta has no default: it is the caller's, with different customary values per loss (TRL: 0.1).
# ---------------------------------------------------------------------------------------------------------------------

def _logratios(chosen, rejected, ref_chosen, ref_rejected, beta):
    """(c, r, chosen_rewards, rejected_rewards) of a reference-based pair loss."""
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    c, r = chosen - ref_chosen, rejected - ref_rejected
    return c, r, beta * c.detach(), beta * r.detach()


def _ref_free(chosen, rejected, beta):
    """(h, chosen_rewards, rejected_rewards) of a reference-free pair loss: h = chosen - rejected, reward beta logp."""
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    return chosen - rejected, beta * chosen.detach(), beta * rejected.detach()


def _smoothed_sigmoid(logits, eps):
    """-(1 - eps) log sigmoid(logits) - eps log sigmoid(-logits): the conservative (label-smoothed) logistic loss."""
    return -(1.0 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)


def dpo_loss(chosen, rejected, ref_chosen, ref_rejected, *, beta, label_smoothing=0.0):
    """DPO (Rafailov et al. 2023, arXiv:2305.18290, eq. 7), with label smoothing cDPO (Mitchell 2023, eq. 3).

        loss = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h),   h = c - r

    label_smoothing eps in [0, 0.5) (LOSSES' ranges): the assumed probability that a label is flipped; default 0
    (plain DPO). Reference-free DPO is this with zero reference log-probs.
    """
    c, r, cr, rr = _logratios(chosen, rejected, ref_chosen, ref_rejected, beta)
    return _smoothed_sigmoid(beta * (c - r), label_smoothing), cr, rr, {}


def robust_loss(chosen, rejected, ref_chosen, ref_rejected, *, beta, label_smoothing=0.1):
    """Robust DPO, rDPO (Chowdhury et al. 2024, arXiv:2403.00409): the unbiased loss under label-flip rate eps.

        loss = ((1 - eps) * -log sigmoid(beta h) - eps * -log sigmoid(-beta h)) / (1 - 2 eps)

    label_smoothing eps in [0, 0.5) (LOSSES' ranges): the noise rate; default 0.1, the paper's recommended value
    (TRL's field defaults to 0, which is plain DPO). TRL's formula exactly. Unlike cDPO the flipped term is SUBTRACTED.
    """
    c, r, cr, rr = _logratios(chosen, rejected, ref_chosen, ref_rejected, beta)
    eps, logits = label_smoothing, beta * (c - r)
    losses = (-(1.0 - eps) * F.logsigmoid(logits) + eps * F.logsigmoid(-logits)) / (1.0 - 2.0 * eps)
    return losses, cr, rr, {}


def ipo_loss(chosen, rejected, ref_chosen, ref_rejected, *, beta):
    """IPO (Azar et al. 2023, arXiv:2310.12036, eq. 17), beta playing the paper's tau.

        loss = (h - 1 / (2 beta))^2

    On whatever log-probs are given: the original DPO code passes summed ones; TRL divides each log-ratio by its
    completion length first (the form the IPO authors used), which is this function on length-averaged log-probs.
    """
    c, r, cr, rr = _logratios(chosen, rejected, ref_chosen, ref_rejected, beta)
    return (c - r - 1.0 / (2.0 * beta)) ** 2, cr, rr, {}


def hinge_loss(chosen, rejected, ref_chosen, ref_rejected, *, beta):
    """Hinge loss of SLiC (Zhao et al. 2023, arXiv:2305.10425) as normalised by RSO (Liu et al. 2023, arXiv:2309.06657).

        loss = relu(1 - beta h)      (beta: RSO's gamma, the inverse margin)
    """
    c, r, cr, rr = _logratios(chosen, rejected, ref_chosen, ref_rejected, beta)
    return torch.relu(1.0 - beta * (c - r)), cr, rr, {}


def exo_pair_loss(chosen, rejected, ref_chosen, ref_rejected, *, beta, label_smoothing=1e-3):
    """EXO-pref (Ji et al. 2024, arXiv:2402.00856, eq. 16): KL(p_theta || p_label) over the pair, K = 2.

        q_w = sigmoid(beta h), q_l = sigmoid(-beta h), target (1 - eps, eps):
        loss = q_w (log q_w - log(1 - eps)) + q_l (log q_l - log eps)

    label_smoothing eps in (0, 1) (LOSSES' ranges): default 1e-3, the paper's and TRL's recommended value (0 is
    undefined: log eps).
    """
    c, r, cr, rr = _logratios(chosen, rejected, ref_chosen, ref_rejected, beta)
    logits, eps = beta * (c - r), label_smoothing
    losses = (torch.sigmoid(logits) * (F.logsigmoid(logits) - math.log1p(-eps))
              + torch.sigmoid(-logits) * (F.logsigmoid(-logits) - math.log(eps)))
    return losses, cr, rr, {}


def nca_pair_loss(chosen, rejected, ref_chosen, ref_rejected, *, beta):
    """NCA, pairwise (Chen et al. 2024, arXiv:2402.05369): absolute, not relative, likelihoods.

        loss = -log sigmoid(beta c) - 1/2 log sigmoid(-beta c) - 1/2 log sigmoid(-beta r)
    """
    c, r, cr, rr = _logratios(chosen, rejected, ref_chosen, ref_rejected, beta)
    losses = -F.logsigmoid(beta * c) - 0.5 * F.logsigmoid(-beta * c) - 0.5 * F.logsigmoid(-beta * r)
    return losses, cr, rr, {}


def sppo_hard_loss(chosen, rejected, ref_chosen, ref_rejected, *, beta):
    """SPPO with hard labels (Wu et al. 2024, arXiv:2405.00675, eq. 4.7 with P(y_w > y_l) = 1, P(y_l > y_w) = 0).

        loss = (c - 1 / (2 beta))^2 + (r + 1 / (2 beta))^2      (beta: the paper's 1 / eta)
    """
    c, r, cr, rr = _logratios(chosen, rejected, ref_chosen, ref_rejected, beta)
    return (c - 0.5 / beta) ** 2 + (r + 0.5 / beta) ** 2, cr, rr, {}


def apo_zero_loss(chosen, rejected, ref_chosen, ref_rejected, *, beta):
    """APO-zero (D'Oosterlinck et al. 2024, arXiv:2408.06266, eq. 7): chosen better than the model's own outputs.

        loss = 1 - sigmoid(beta c) + sigmoid(beta r)
    """
    c, r, cr, rr = _logratios(chosen, rejected, ref_chosen, ref_rejected, beta)
    return 1.0 - torch.sigmoid(beta * c) + torch.sigmoid(beta * r), cr, rr, {}


def apo_down_loss(chosen, rejected, ref_chosen, ref_rejected, *, beta):
    """APO-down (D'Oosterlinck et al. 2024, arXiv:2408.06266, eq. 8): chosen worse than the model's own outputs.

        loss = sigmoid(beta c) + 1 - sigmoid(beta (c - r))
    """
    c, r, cr, rr = _logratios(chosen, rejected, ref_chosen, ref_rejected, beta)
    return torch.sigmoid(beta * c) + 1.0 - torch.sigmoid(beta * (c - r)), cr, rr, {}


def discopop_loss(chosen, rejected, ref_chosen, ref_rejected, *, beta, discopop_tau=0.05):
    """DiscoPOP, log-ratio modulated loss (Chris Lu et al. 2024, arXiv:2406.08414, eq. 5).

        z = beta h, w = sigmoid(z / tau):   loss = (1 - w) * -log sigmoid(z) + w * exp(-z)

    discopop_tau: the temperature tau, default 0.05 (paper and TRL).
    """
    c, r, cr, rr = _logratios(chosen, rejected, ref_chosen, ref_rejected, beta)
    z = beta * (c - r)
    w = torch.sigmoid(z / discopop_tau)
    return -F.logsigmoid(z) * (1.0 - w) + torch.exp(-z) * w, cr, rr, {}


def bco_pair_loss(chosen, rejected, ref_chosen, ref_rejected, *, beta, delta):
    """BCO, paired (Jung et al. 2024, arXiv:2404.04656): a binary classifier on the implicit rewards with a shift.

        loss = -log sigmoid(beta c - delta) - log sigmoid(-(beta r - delta))

    delta: the running mean of the implicit rewards (state of the caller, not a hyper-parameter; float or scalar
    tensor). metrics["reward_mean"] [B] is (beta c + beta r) / 2, detached: its mean over the batch is the batch's
    mean reward, which TRL's RunningMoments folds into delta (see ``running_mean_update``). TRL (0.9 to 0.28) folds it
    in BEFORE computing this step's loss; the rewards do not depend on delta, so a caller gets that order by updating
    with ``beta * (c + r).mean() / 2`` first (or takes a one-step lag by updating from the metric after).
    TRL 1.16's DPOTrainer dropped the running mean: its 'bco_pair' is this with delta = 0.
    """
    c, r, cr, rr = _logratios(chosen, rejected, ref_chosen, ref_rejected, beta)
    losses = -F.logsigmoid(beta * c - delta) - F.logsigmoid(-(beta * r - delta))
    return losses, cr, rr, {"reward_mean": (cr + rr) / 2}


def running_mean_update(mean, count, batch_mean, batch_count=1):
    """One step of TRL's RunningMoments mean (the part BCO uses): a count-weighted running mean.

        count' = count + batch_count,   mean' = mean + (batch_mean - mean) * batch_count / count'

    Pure, on floats (or scalar tensors): the trainer keeps (mean, count) as checkpointable state, starting from TRL's
    (0.0, 1e-24). TRL updates with one scalar per step (the batch's mean reward, ``bco_pair_loss``'s
    metrics["reward_mean"].mean()), so batch_count = 1 (with DDP its global statistics count one per rank: pass the
    mean over ranks and batch_count = world size). TRL does this arithmetic in float32; this is float64 for floats.
    """
    total = count + batch_count
    return mean + (batch_mean - mean) * batch_count / total, total


def simpo_loss(chosen, rejected, ref_chosen=None, ref_rejected=None, *, beta, simpo_gamma=0.5, label_smoothing=0.0):
    """SimPO (Meng et al. 2024, arXiv:2405.14734, eq. 6): reference-free, length-normalised, with a target margin.

        loss = -log sigmoid(beta (c - r) - gamma)      (with label smoothing: the cDPO mix of both signs, as TRL)

    c, r: the policy's LENGTH-AVERAGED log-probs (the caller averages). simpo_gamma: the margin gamma itself, TRL's
    ``simpo_gamma`` semantics, default 0.5 (TRL); the SimPO code's ``gamma_beta_ratio`` is simpo_gamma / beta (its
    defaults: beta 2.0, gamma_beta_ratio 0.5, i.e. simpo_gamma 1.0). label_smoothing: default 0, in [0, 0.5).
    ref_chosen / ref_rejected are ignored. Rewards: beta * logp (TRL).
    """
    h, cr, rr = _ref_free(chosen, rejected, beta)
    return _smoothed_sigmoid(beta * h - simpo_gamma, label_smoothing), cr, rr, {}


def cpo_loss(chosen, rejected, ref_chosen=None, ref_rejected=None, *, beta, label_smoothing=0.0):
    """CPO, preference part (Xu et al. 2024, arXiv:2401.08417, eq. 3): reference-free DPO on summed log-probs.

        loss = -(1 - eps) log sigmoid(beta (c - r)) - eps log sigmoid(-beta (c - r))

    c, r: the policy's SUMMED log-probs. label_smoothing eps: default 0, in [0, 0.5). CPO's full objective adds its NLL term on the
    chosen responses, cpo_alpha * ``nll_loss`` (TRL's cpo_alpha defaults to 1.0): the caller adds it, this function
    is the preference part only. ref_chosen / ref_rejected are ignored. Rewards: beta * logp (TRL).
    """
    h, cr, rr = _ref_free(chosen, rejected, beta)
    return _smoothed_sigmoid(beta * h, label_smoothing), cr, rr, {}


def _log1mexp(x):
    """log(1 - exp(x)) for x < 0, stable on both sides of -log 2 (Maechler 2012; as TRL's ORPO)."""
    return torch.where(x < -math.log(2.0), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(chosen, rejected, ref_chosen=None, ref_rejected=None, *, beta):
    """ORPO, odds-ratio part (Hong et al. 2024, arXiv:2403.07691, eqs. 4 and 7).

        log odds(y) = logp - log(1 - exp(logp)),  L_OR = -log sigmoid(log odds(y_w) - log odds(y_l)),  loss = beta L_OR

    c, r: the policy's LENGTH-AVERAGED log-probs, which the caller MUST pass (as TRL: odds of a summed log-prob are
    meaningless). beta is the paper's lambda (TRL default 0.1). The full ORPO loss adds the NLL on the chosen
    responses (``nll_loss``, weight 1): the caller adds it. Sign: this is the loss to minimise; TRL's
    ``odds_ratio_loss`` returns its negative (beta log sigmoid(...)) and subtracts it. Computed in at least float32.
    metrics (TRL's names, per pair): "log_odds_ratio" = log sigmoid(log-odds difference), "log_odds_chosen" = the
    log-odds difference. Rewards: beta * logp (TRL). ref_chosen / ref_rejected are ignored.
    """
    dtype = torch.promote_types(chosen.dtype, torch.float32)
    chosen, rejected = chosen.to(dtype), rejected.to(dtype)
    h, cr, rr = _ref_free(chosen, rejected, beta)
    log_odds = h - (_log1mexp(chosen) - _log1mexp(rejected))
    ratio = F.logsigmoid(log_odds)
    return -beta * ratio, cr, rr, {"log_odds_ratio": ratio.detach(), "log_odds_chosen": log_odds.detach()}


def reward_model_loss(chosen, rejected, margin=None, *, center_rewards_coefficient=0.0):
    """A reward model's Bradley-Terry loss (InstructGPT, Ouyang et al. 2022, arXiv:2203.02155; the per-pair margin of
    Llama 2, arXiv:2307.09288; the centring term of Eisenstein et al. 2023, arXiv:2312.09244; as TRL's RewardTrainer):

        loss_i = -log sigmoid(r_c - r_r - margin_i) + center_rewards_coefficient * (r_c + r_r)^2

    chosen, rejected: [B] the scalar head's scores of each pair's two replies; margin: [B] or None (0).
    Returns (pair losses [B], chosen scores, rejected scores (detached: the rewards/* metrics), {})."""
    diff = chosen - rejected - (0.0 if margin is None else margin.to(chosen.dtype))
    losses_ = -F.logsigmoid(diff) + center_rewards_coefficient * (chosen + rejected) ** 2
    return losses_, chosen.detach(), rejected.detach(), {}


def kto_loss(logps, ref_logps, desirable, kl, *, beta, desirable_weight=1.0, undesirable_weight=1.0):
    """KTO (Ethayarajh et al. 2024, arXiv:2402.01306, eq. 7 with TRL's formula): unpaired, one label per example.

    Args:
        logps, ref_logps: [B] summed sequence log-probs of the policy and the reference.
        desirable: [B] bool, True for desirable (chosen) examples.
        kl: scalar, the reference point z0 (``kto_kl``; detached, >= 0).
        desirable_weight, undesirable_weight: lambda_D, lambda_U, default 1.0 (TRL); the paper advises
            lambda_D n_D / (lambda_U n_U) in [1, 4/3] for unbalanced data.

    With x = logps - ref_logps:   desirable:   lambda_D (1 - sigmoid(beta (x - kl)))
                                  undesirable: lambda_U (1 - sigmoid(beta (kl - x)))

    Returns losses [B] (in input order: TRL concatenates desirable then undesirable, same mean), rewards [B] =
    beta x detached, metrics {"kl": kl broadcast to [B]}.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    x = logps - ref_logps
    desirable = torch.as_tensor(desirable, dtype=torch.bool, device=x.device)
    kl = torch.as_tensor(kl, dtype=x.dtype, device=x.device).detach()
    losses = torch.where(desirable, desirable_weight * (1.0 - torch.sigmoid(beta * (x - kl))),
                         undesirable_weight * (1.0 - torch.sigmoid(beta * (kl - x))))
    return losses, beta * x.detach(), {"kl": kl.expand_as(x)}


def kto_kl(kl_logps, ref_kl_logps):
    """KTO's reference point: z0 = max(0, mean(kl_logps - ref_kl_logps)), detached (TRL).

    kl_logps, ref_kl_logps: [B] summed log-probs of MISMATCHED pairs (each prompt with another example's completion)
    under the policy and the reference. The caller computes it over the whole global batch (all micro-batches and
    ranks: gather first); TRL averages a micro-batch over ranks, then clamps. Returns a 0-dim tensor.
    """
    return (kl_logps - ref_kl_logps).mean().clamp(min=0).detach()


def dft_loss(token_logps, num_loss_tokens):
    """DFT, Dynamic Fine-Tuning (Wu et al. 2025, "On the Generalization of SFT", arXiv:2508.05629).

        loss = -sum_t sg(p(y_t)) log p(y_t) / num_loss_tokens,   sg: stop-gradient, p = exp(logp)

    Each token's NLL weighted by its detached probability. token_logps [N], num_loss_tokens: the global batch's
    label-token count, exactly as ``sft_loss`` (which this is, on reweighted log-probs). Returns a scalar.
    """
    return sft_loss(token_logps * token_logps.detach().exp(), num_loss_tokens)


def nll_loss(chosen_token_logps_sum, num_chosen_tokens):
    """NLL on the chosen responses, token-normalised over the global batch: -sum / count.

    The modifier term of RPO (Pang et al. 2024, arXiv:2404.19733: DPO + alpha NLL) and the NLL term of CPO and ORPO
    (added by the caller with its weight). chosen_token_logps_sum: [B] summed log-probs of the chosen responses;
    num_chosen_tokens: the number of chosen label tokens in the WHOLE global batch (as ``sft_loss``). Returns a scalar.
    """
    return sft_loss(chosen_token_logps_sum, num_chosen_tokens)


# ---------------------------------------------------------------------------------------------------------------------
# The loss table: what each `loss.name` trains on and needs, declared once. The config check (config.py), the decision
# to build a reference (models), the data kind (data), the loss step (`micro_batch_loss`, called by the trainer) and
# the tests all ask it; nothing else branches on loss names.
# ---------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Loss:
    fn: Callable                  # the pure loss function above
    data: str                     # the data kind it trains on (data.py): "sft" | "preference" pairs | "unpaired"
    reference: bool = False       # needs reference log-probs: a reference model, or log-probs precomputed with one
    average: bool = False         # scores length-averaged sequence log-probs instead of summed ones (always)
    params: dict = field(default_factory=dict)  # its loss.* hyper-parameters and their defaults (its paper's)
    metrics: tuple = ()           # what its fn reports per pair, beyond rewards/*, logps/* and logits/*
    batch_kl: bool = False        # needs KTO's reference point: the KL estimate of the global batch's mismatched pairs
    running_mean: bool = False    # shifts its rewards by their running mean (training state, checkpointed)
    ranges: dict = field(default_factory=dict)  # {loss.* key: {op: bound}} (as config.num) where narrower than the schema's
    usual: dict = field(default_factory=dict)   # {loss.* key: (low, high)}: what its paper and TRL use; outside is noted
    head: str = "causal_lm"       # what it trains (models.HEADS): the LM head, or a scalar head (reward, value)
    online: object = None         # an online method's row (rl_losses.Online): trains on its own sampled completions

    @property
    def unit(self) -> str:
        """What its loss and metrics are averaged over in a global batch: label tokens (SFT) or examples."""
        return "tokens" if self.data == "sft" else "examples"


B01 = {"beta": 0.1}
BETA = {"beta": {"gt": 0}}  # a temperature: 0 is no loss at all (an online method's beta 0 means no KL term)
EPS = {**BETA, "label_smoothing": {"ge": 0, "lt": 0.5}}  # a flip probability: 0.5 makes chosen and rejected alike
# beta as the papers sweep it, widened: DPO-style log-ratio temperatures 0.01-0.5 (DPO, IPO's tau, KTO, BCO, APO),
# SimPO's 2-10 on length-averaged log-probs, ORPO's lambda 0.1-1, SPPO's 1/eta down to 1e-3. A value from another
# loss's range (simpo with DPO's 0.1, after `loss.name=simpo` on a DPO config) is noted in the run header.
USUAL = {"beta": (0.01, 1.0)}
# a method with a critic (ppo): GAE's discount and lambda, the value loss's clip and weight, the adaptive KL (TRL's
# names and defaults; kl_target null: beta stays fixed)
CRITIC = {"gamma": 1.0, "lam": 0.95, "cliprange_value": 0.2, "vf_coef": 0.1, "kl_target": None, "kl_horizon": 10000}
LOSSES = {  # docs/losses.md lists them with their papers
    "sft": Loss(sft_loss, "sft"),
    "dft": Loss(dft_loss, "sft"),
    "dpo": Loss(dpo_loss, "preference", reference=True, params={**B01, "label_smoothing": 0.0}, ranges=EPS, usual=USUAL),
    "robust": Loss(robust_loss, "preference", reference=True, params={**B01, "label_smoothing": 0.1}, ranges=EPS,
                   usual=USUAL),
    "ipo": Loss(ipo_loss, "preference", reference=True, params=B01, ranges=BETA, usual=USUAL),
    "hinge": Loss(hinge_loss, "preference", reference=True, params=B01, ranges=BETA, usual=USUAL),
    "exo_pair": Loss(exo_pair_loss, "preference", reference=True, params={**B01, "label_smoothing": 1e-3},
                     ranges={**BETA, "label_smoothing": {"gt": 0, "lt": 1}}, usual=USUAL),
    "nca_pair": Loss(nca_pair_loss, "preference", reference=True, params=B01, ranges=BETA, usual=USUAL),
    "sppo_hard": Loss(sppo_hard_loss, "preference", reference=True, params=B01, ranges=BETA, usual={"beta": (1e-3, 1.0)}),
    "apo_zero": Loss(apo_zero_loss, "preference", reference=True, params=B01, ranges=BETA, usual=USUAL),
    "apo_down": Loss(apo_down_loss, "preference", reference=True, params=B01, ranges=BETA, usual=USUAL),
    "discopop": Loss(discopop_loss, "preference", reference=True, params={**B01, "discopop_tau": 0.05}, ranges=BETA,
                     usual=USUAL),
    "bco_pair": Loss(bco_pair_loss, "preference", reference=True, params=B01, running_mean=True, ranges=BETA,
                     usual=USUAL),
    "simpo": Loss(simpo_loss, "preference", average=True,
                  params={"beta": 2.0, "simpo_gamma": 1.0, "label_smoothing": 0.0, "nll_weight": 0.0}, ranges=EPS,
                  usual={"beta": (1.0, 20.0)}),
    "cpo": Loss(cpo_loss, "preference", params={**B01, "label_smoothing": 0.0, "nll_weight": 1.0}, ranges=EPS,
                usual=USUAL),
    "orpo": Loss(orpo_loss, "preference", average=True, params={**B01, "nll_weight": 1.0},
                 metrics=("log_odds_ratio", "log_odds_chosen"), ranges=BETA, usual={"beta": (0.01, 2.0)}),
    "kto": Loss(kto_loss, "unpaired", reference=True, batch_kl=True,
                params={**B01, "desirable_weight": 1.0, "undesirable_weight": 1.0}, metrics=("kl",), ranges=BETA,
                usual=USUAL),
    # the online methods (rl_losses.ONLINE: advantage, ratio, aggregation, KL placement): completions of the prompts
    # sampled and scored by the rewards each step (online.py); a reference only when beta > 0
    # a scalar head on the model scores each reply (models.sequence_scores): a reward model for the online methods
    "reward_model": Loss(reward_model_loss, "preference", params={"center_rewards_coefficient": 0.0},
                         ranges={"center_rewards_coefficient": {"ge": 0}}, head="sequence_classification"),
    **{name: Loss(rl_losses.micro_batch_loss, "prompt", reference=True, online=method,
                  params={"beta": method.beta, "epsilon": method.epsilon, "epsilon_high": method.epsilon_high,
                          **(CRITIC if method.critic else {})})
       for name, method in rl_losses.ONLINE.items()},
}
# loss.* keys that every pair loss takes (reference_free: those with a reference), and their defaults; they are
# not arguments of the loss functions but of `micro_batch_loss`
MODIFIERS = {"nll_weight": 0.0, "length_normalize": False, "reference_free": False, "online": False}
NEUTRAL = {"label_smoothing": 0.0, **MODIFIERS}  # values that change nothing: allowed on any loss


def parameters_of(name) -> dict:
    """{loss.* key: default} of every key that `loss.name=name` takes: its hyper-parameters and modifiers."""
    spec = LOSSES[name]
    modifiers = {k: v for k, v in MODIFIERS.items() if k != "reference_free" or spec.reference}
    modifiers = modifiers if spec.data == "preference" and spec.head == "causal_lm" else {}
    values = {**modifiers, **spec.params}  # the loss's own default wins (cpo's and orpo's nll_weight 1.0)
    return {k: values[k] for k in [*spec.params, *modifiers]}  # its own keys first


def data_kind(loss_cfg) -> str:
    """The data a run with this `loss:` section trains on: its row's kind, or prompts for a pair loss trained online
    (loss.online: its pairs are sampled each step)."""
    return "prompt" if loss_cfg.get("online") else LOSSES[loss_cfg.name].data


def is_online(loss_cfg) -> bool:
    """Whether the run samples its own completions: an online method's row, or a pair loss with loss.online."""
    return LOSSES[loss_cfg.name].online is not None or bool(loss_cfg.get("online"))


def needs_reference(loss_cfg) -> bool:
    """Whether a run with this `loss:` section needs reference log-probs (reference_free drops them; an online
    method needs them only for a KL term, beta > 0)."""
    spec = LOSSES[loss_cfg.name]
    return spec.reference and not loss_cfg.reference_free and (spec.online is None or loss_cfg.beta > 0)


def hyperparameters(loss_cfg) -> dict:
    """Its loss function's keyword arguments and the modifiers, from the `loss:` section (nulls already resolved)."""
    return {k: loss_cfg[k] for k in parameters_of(loss_cfg.name)}


def micro_batch_loss(spec, hp, token_logps, seq_ids, n_seqs, reference_logps, norm, mean_logits=None, extra=None):
    """The loss of one micro-batch, divided by its GLOBAL batch's normaliser, and its metric sums.

    Args:
        spec: the table row (``LOSSES[name]``); hp: ``hyperparameters(loss_cfg)``.
        token_logps: [N] the policy's label-token log-probs; seq_ids: [N] their sequences, in [0, n_seqs): for
            pairs the B chosen responses, then the B rejected ones (data.sequences_of); for unpaired data the B
            completions (then, if present, their B mismatched KL sequences, which the loss does not use).
        reference_logps: [n_seqs] summed reference log-probs, or None (no reference: taken as 0).
        norm: the global batch's counts {"examples", "tokens" (label tokens), "chosen_tokens", "desirable"}.
        mean_logits: [N] each position's mean logit (detached), for the logits/* metrics.
        extra: what the trainer computed over the whole global batch: {"kl"} (batch_kl), {"delta"} (running_mean),
            {"desirable": [B] bool} (unpaired).

    Returns (loss: scalar with grad, sums: {metric: scalar}); a metric's value is its sum over the global batch
    divided by ``norm[spec.unit]``.
    """
    if spec.data == "sft":
        loss = spec.fn(token_logps, norm["tokens"])
        return loss, {"loss": loss.detach() * norm["tokens"]}
    extra = extra or {}
    B = len(extra["desirable"]) if spec.data == "unpaired" else n_seqs // 2
    counts = torch.bincount(seq_ids, minlength=n_seqs).clamp(min=1)
    sums = sequence_logps(token_logps, seq_ids, n_seqs)
    average = spec.average or hp.get("length_normalize", False)
    policy = sums / counts if average else sums
    reference = None
    if spec.reference:
        reference = torch.zeros_like(policy) if reference_logps is None else reference_logps.to(policy.dtype)
        reference = reference / counts if average else reference
    if spec.data == "unpaired":
        return _unpaired(spec, hp, policy[:B], reference[:B], extra, norm)
    kwargs = {k: v for k, v in hp.items() if k not in MODIFIERS}
    kwargs.update({"delta": extra["delta"]} if spec.running_mean else {})
    ref_c, ref_r = (None, None) if reference is None else (reference[:B], reference[B:])
    pair_losses, chosen_rewards, rejected_rewards, metrics = spec.fn(policy[:B], policy[B:], ref_c, ref_r, **kwargs)
    weight = extra.get("pair_weight")  # online pairs: 0 where a group's best and worst tie (nothing to prefer)
    if weight is not None:
        pair_losses, chosen_rewards, rejected_rewards = (x * weight for x in (pair_losses, chosen_rewards,
                                                                               rejected_rewards))
        metrics, sums = {k: v * weight for k, v in metrics.items()}, sums * weight.repeat(len(sums) // B)
        policy = policy * weight.repeat(len(policy) // B)
    loss = pair_losses.sum() / norm["examples"]
    out = {"loss": pair_losses.detach().sum(), "rewards/chosen": chosen_rewards.sum(),
           "rewards/rejected": rejected_rewards.sum(), "rewards/margins": (chosen_rewards - rejected_rewards).sum(),
           "rewards/accuracies": (chosen_rewards > rejected_rewards).float().sum(),
           "logps/chosen": policy[:B].detach().sum(), "logps/rejected": policy[B:].detach().sum(),
           **{k: v.sum() for k, v in metrics.items() if k in spec.metrics}}
    if hp.get("nll_weight"):  # an NLL term on the chosen responses, token-normalised over the global batch
        nll = nll_loss(sums[:B], norm["chosen_tokens"])
        loss = loss + hp["nll_weight"] * nll
        out["nll_loss"] = nll.detach() * norm["examples"]
    if mean_logits is not None:  # TRL's logits/*: the mean logit over each side's label positions (global batch)
        chosen = seq_ids < B
        n_tokens = {"chosen": norm["chosen_tokens"], "rejected": norm["tokens"] - norm["chosen_tokens"]}
        for name, side in (("chosen", chosen), ("rejected", ~chosen)):
            out[f"logits/{name}"] = mean_logits[side].sum() / max(n_tokens[name], 1) * norm["examples"]
    return loss, out


def scalar_pairs_loss(spec, hp, scores, norm, margin=None):
    """micro_batch_loss of a scalar head (reward_model): scores [2B] of the B chosen replies, then the B rejected;
    the loss divided by the global batch's examples, and TRL's reward metrics' sums."""
    B = len(scores) // 2
    pair_losses, chosen, rejected, _ = spec.fn(scores[:B], scores[B:], margin, **hp)
    return pair_losses.sum() / norm["examples"], {
        "loss": pair_losses.detach().sum(), "rewards/chosen": chosen.sum(), "rewards/rejected": rejected.sum(),
        "rewards/margins": (chosen - rejected).sum(), "rewards/accuracies": (chosen > rejected).float().sum()}


def _unpaired(spec, hp, policy, reference, extra, norm):
    """micro_batch_loss for unpaired (KTO) data: rewards/chosen and logps/chosen average over the desirable
    examples of the global batch, rewards/rejected and logps/rejected over the undesirable ones (TRL's names)."""
    desirable = extra["desirable"]
    losses_, rewards, metrics = spec.fn(policy, reference, desirable, extra["kl"], **hp)
    n, good = norm["examples"], norm["desirable"]
    scale = {True: n / max(good, 1), False: n / max(n - good, 1)}  # a sum / n is then a mean over that side
    out = {"loss": losses_.detach().sum(), **{k: v.sum() for k, v in metrics.items() if k in spec.metrics}}
    for side, name in ((True, "chosen"), (False, "rejected")):
        mask = desirable == side
        out[f"rewards/{name}"] = rewards[mask].sum() * scale[side]
        out[f"logps/{name}"] = policy[mask].detach().sum() * scale[side]
    out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
    return losses_.sum() / n, out
