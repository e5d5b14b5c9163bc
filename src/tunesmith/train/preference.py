"""Preference losses (DPO, ORPO, SimPO, KTO) on sequence log-probabilities, and the pair figures.

Every loss takes per-sequence answer log-probabilities, shape (B,), and returns a scalar; each equals
TRL's own loss on the same numbers (tests/test_preference.py checks it within 1e-5):
- DPO (Rafailov et al. 2023; TRL DPOTrainer, loss_type "sigmoid"): -log sigma(beta * margin of the
  policy/reference log-ratios); summed log-probs.
- ORPO (Hong et al. 2024; TRL ORPOTrainer): chosen NLL - lambda * log sigma(log odds ratio); mean
  per-token log-probs (the odds need a probability, so length-normalised as TRL does), no reference.
  The NLL here is the chosen answer's token cross-entropy only. TRL 1.16's ORPOTrainer
  (trl.experimental.orpo, concatenated_forward) takes it over the whole chosen sequence, prompt tokens
  included ("computed over the full prompt and response"). Ours is the choice of every other loss here
  (the prompt is context, as in the supervised loss and task.train_on): the odds-ratio term is the same
  as TRL's, the NLL term differs by the prompt tokens' share; the equality test passes both the same NLL.
- SimPO (Meng et al. 2024; TRL CPOTrainer loss_type "simpo", cpo_alpha 0): -log sigma(beta * (c - r) - gamma)
  on mean per-token log-probs, no reference.
- KTO (Ethayarajh et al. 2024; TRL KTOTrainer): 1 - sigma(beta * (log-ratio - KL)) for desirable rows,
  1 - sigma(beta * (KL - log-ratio)) for undesirable ones, weighted, mean over rows; KL is estimated
  from mismatched (prompt, completion) pairs as TRL does, detached and clamped at 0.

The pair figures (validation and the verdict) use one definition for any model, base or tuned: a pair
is ranked right when the model's summed answer log-probability of `chosen` exceeds that of `rejected`;
its margin is the difference in nats. The base model has no implicit DPO reward (it is 0 by
construction), so this likelihood preference is what a baseline and a tuned model can share per pair.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tunesmith.train.batching import IGNORE
from tunesmith.train.loss import supervised_token_ce


def sequence_logps(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed answer log-probability (B,), answer token count (B,)) for a collated batch.

    Only positions whose label is not IGNORE (the answer) count; the prompt is context. Only those
    positions reach the head (train/loss.py), so no (B, T, V) logits: a pair's answer is a few tokens
    after a prompt of hundreds.
    """
    selected = batch["labels"][:, 1:] != IGNORE  # (B, T-1): token t is predicted at position t-1
    ce = supervised_token_ce(model, batch)       # (N,), row after row
    rows = selected.nonzero()[:, 0].to(ce.device)  # (N,) the row of each supervised token
    summed = torch.zeros(len(selected), dtype=ce.dtype, device=ce.device).index_add(0, rows, -ce)  # (B,)
    return summed, selected.sum(-1).to(ce.device)


def dpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
             beta: float) -> torch.Tensor:
    """DPO's sigmoid loss on summed log-probs (B,) of the policy and the reference."""
    margin = (chosen - ref_chosen) - (rejected - ref_rejected)  # (B,)
    return -F.logsigmoid(beta * margin).mean()


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of -ln 2 (Maechler 2012)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(chosen_mean: torch.Tensor, rejected_mean: torch.Tensor, chosen_nll: torch.Tensor,
              lam: float) -> torch.Tensor:
    """ORPO: NLL of the chosen answers minus lambda * mean log sigma(log odds(chosen) - log odds(rejected)).

    `chosen_mean`, `rejected_mean`: mean per-token log-probs (B,); `chosen_nll`: the chosen answers'
    token cross-entropy (scalar).
    """
    chosen_mean, rejected_mean = chosen_mean.float(), rejected_mean.float()
    log_odds = (chosen_mean - rejected_mean) - (log1mexp(chosen_mean) - log1mexp(rejected_mean))  # (B,)
    return chosen_nll - lam * F.logsigmoid(log_odds).mean()


def simpo_loss(chosen_mean: torch.Tensor, rejected_mean: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """SimPO: -log sigma(beta * (mean log-prob margin) - gamma), no reference model."""
    return -F.logsigmoid(beta * (chosen_mean - rejected_mean) - gamma).mean()


def kto_kl(kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """KTO's reference point: the mean policy/reference log-ratio on mismatched completions, >= 0, no gradient."""
    return (kl_logps - ref_kl_logps).mean().detach().clamp(min=0)


def kto_loss(logps: torch.Tensor, ref_logps: torch.Tensor, labels: torch.Tensor, kl: torch.Tensor, beta: float,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> torch.Tensor:
    """KTO on summed log-probs (B,) with boolean `labels` (B,) (True: desirable completion)."""
    ratio = logps - ref_logps  # (B,)
    chosen = desirable_weight * (1 - torch.sigmoid(beta * (ratio[labels] - kl)))
    rejected = undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratio[~labels])))
    return torch.cat([chosen, rejected]).nanmean()
