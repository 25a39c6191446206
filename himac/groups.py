"""Hierarchical GRPO math: group-relative advantages (Eq. 2) and the clipped
surrogate with a KL penalty (Eq. 3) of the HiMAC paper (reference/himac_paper.txt,
§3.3). Pure functions over tensors: no model, no config object.

Groups are given as an integer `group_index` per sample rather than a (B, G)
matrix, so one function serves macro groups (G blueprints of one task), micro
groups (M trajectories under one blueprint) and, later, groups of unequal size.

Choices the paper leaves open, stated here once:
- sigma in Eq. 2 is the unbiased (Bessel-corrected) standard deviation, as in the
  reference GRPO implementations; a group of one has advantage 0 (no peer to
  compare with), never NaN.
- The KL term uses the k3 estimator  exp(r) - r - 1  with r = log pi_ref - log pi,
  which is unbiased for KL(pi || pi_ref), non-negative, and low-variance.
- Token aggregation is by default "sample mean of token means": each sample (one blueprint,
  or one whole trajectory spread over many executor-step rows) weighs 1/N as in
  Eq. 3's (1/N) sum_i, and within a sample every generated token weighs the same.
  The weights are fixed for the whole batch *before* micro-batching, so the sum of
  micro-batch losses is exactly the full-batch loss (per-micro-batch normalisation
  is the bug class TRL's GRPO trainer hit more than once). `token_weights` also offers a mean
  over turns and a mean over tokens (the `loss_aggregation` key).
- `std_floor` in Eq. 2 is a departure (`adv_std_floor`), 0 by default: the paper's plain
  Eq. 2 (docs/results.md, "Departures").

The estimators that turn returns into per-step advantages (Eq. 2 and the flat
peers RLOO and GiGPO) are registered in himac/estimators.py.
"""
from __future__ import annotations

import torch


def group_advantages(
    returns: torch.Tensor,  # (N,) one return per sample
    group_index: torch.Tensor,  # (N,) long, which group each sample is in
    scale_std: bool = True,
    eps: float = 1e-6,
    std_floor: float = 0.0,
) -> torch.Tensor:  # (N,)
    """Eq. 2: A_i = (R_i - mean_group) / (max(std_group, std_floor) + eps); without std scaling, R_i - mean.

    `std_floor` (in reward units, 0 = the paper's Eq. 2) keeps a group whose returns
    differ only by noise (all failures, spread by step costs) from being blown up to
    the same unit-size advantages as a group with a real success in it.
    """
    returns = returns.double()
    _, inverse = torch.unique(group_index, return_inverse=True)  # (N,) dense ids 0..U-1
    num_groups = int(inverse.max()) + 1 if inverse.numel() else 0
    count = torch.zeros(num_groups, dtype=returns.dtype).index_add_(0, inverse, torch.ones_like(returns))
    total = torch.zeros(num_groups, dtype=returns.dtype).index_add_(0, inverse, returns)
    mean = total / count  # (U,)
    centred = returns - mean[inverse]  # (N,)
    if not scale_std:
        return centred.float()
    sq = torch.zeros(num_groups, dtype=returns.dtype).index_add_(0, inverse, centred**2)
    var = sq / (count - 1).clamp(min=1)  # unbiased; a singleton has sq = 0 -> std 0
    denom = var.sqrt().clamp(min=std_floor)[inverse] + eps  # (N,)
    denom = torch.where(denom > 0, denom, torch.ones_like(denom))  # eps = 0 and zero spread: centred is 0 anyway
    return (centred / denom).float()


def sample_token_weights(
    token_mask: torch.Tensor,  # (R, T) 1 where a token is trained, 0 for prompt/padding/other phase
    sample_index: torch.Tensor,  # (R,) long, which sample (blueprint / trajectory) each row is from
    units: int | None = None,
) -> torch.Tensor:  # (R, T)
    """Weight of each token so that sum(weights * x) = mean over samples of the token-mean of x.

    Samples with no trained token drop out of the count N; an all-masked batch gives
    all-zero weights (a zero loss, never NaN). `units` overrides N (data-parallel
    training: N counts the samples of every rank, `aggregation_units` summed).
    """
    mask = token_mask.double()
    _, inverse = torch.unique(sample_index, return_inverse=True)  # (R,)
    num_samples = int(inverse.max()) + 1 if inverse.numel() else 0
    tokens = torch.zeros(num_samples, dtype=mask.dtype).index_add_(0, inverse, mask.sum(1))  # (S,)
    present = int((tokens > 0).sum())
    if present == 0:
        return torch.zeros_like(token_mask, dtype=torch.float32)
    per_row = 1.0 / (tokens[inverse].clamp(min=1) * (present if units is None else units))  # (R,)
    return (mask * per_row[:, None]).float()


def token_weights(
    token_mask: torch.Tensor,  # (R, T) 1 where a token is trained
    sample_index: torch.Tensor,  # (R,) long
    aggregation: str = "sample",
    units: float | None = None,
) -> torch.Tensor:  # (R, T)
    """Loss weights of one optimiser step's tokens; they sum to 1 over the trained tokens.

    - "sample": mean over samples of the token-mean of each sample (Eq. 3's 1/N over
      samples; a trajectory's turns share its 1/N), `sample_token_weights`;
    - "turn": mean over rows (executor turns, blueprints) of each row's token-mean;
    - "token": every trained token of the step weighs the same (DAPO's token-level mean).
    `units` overrides the denominator N (the samples, rows or tokens of every rank, when a
    step's rows are spread over data-parallel ranks: the weights then sum to 1 over all ranks).
    """
    if aggregation == "sample":
        return sample_token_weights(token_mask, sample_index, units)
    if aggregation == "turn":
        return sample_token_weights(token_mask, torch.arange(token_mask.shape[0]), units)
    if aggregation == "token":
        total = token_mask.sum() if units is None else torch.tensor(float(units))
        return (token_mask / total).float() if total > 0 else torch.zeros_like(token_mask, dtype=torch.float32)
    raise ValueError(f"aggregation {aggregation!r}: expected 'sample', 'turn' or 'token'")


def aggregation_units(
    token_mask: torch.Tensor,  # (R, T) 1 where a token is trained
    sample_index: torch.Tensor,  # (R,) long
    aggregation: str = "sample",
) -> int:
    """The N that `token_weights` divides by: samples with a trained token ('sample'), rows with one
    ('turn'), or trained tokens ('token'). Summed over ranks, it makes Eq. 3's 1/N global."""
    if aggregation == "token":
        return int(token_mask.sum())
    if aggregation == "turn":
        return int((token_mask.sum(1) > 0).sum())
    if aggregation == "sample":
        return len(set(sample_index[token_mask.sum(1) > 0].tolist()))
    raise ValueError(f"aggregation {aggregation!r}: expected 'sample', 'turn' or 'token'")


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || pi_ref): exp(r) - r - 1, r = ref_logp - logp."""
    r = ref_logp - logp
    return torch.exp(r) - r - 1.0


def clipped_surrogate(
    logp: torch.Tensor,  # (R, T) log pi_theta of the sampled tokens
    old_logp: torch.Tensor,  # (R, T) log pi_theta_old (detached)
    ref_logp: torch.Tensor | None,  # (R, T) log pi_ref, or None when beta = 0
    advantages: torch.Tensor,  # (R,) or (R, T)
    weights: torch.Tensor,  # (R, T) from sample_token_weights; 0 masks a token out
    clip_eps: float = 0.2,
    beta: float = 0.01,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Eq. 3 as a loss to minimise: -sum w * (min(rho A, clip(rho) A) - beta KL).

    Masked positions are zeroed *before* exponentiating, so garbage log-probs on
    padding cannot turn into inf * 0 = NaN.
    """
    live = weights > 0  # (R, T)
    adv = advantages if advantages.dim() == 2 else advantages[:, None].expand_as(logp)  # (R, T)
    log_ratio = torch.where(live, logp - old_logp, torch.zeros_like(logp))  # (R, T)
    ratio = torch.exp(log_ratio)  # (R, T)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * adv
    objective = torch.minimum(unclipped, clipped)  # (R, T)
    if ref_logp is not None and beta != 0.0:
        kl = kl_k3(torch.where(live, logp, torch.zeros_like(logp)),
                   torch.where(live, ref_logp, torch.zeros_like(ref_logp)))  # (R, T)
    else:
        kl = torch.zeros_like(logp)
    loss = -(weights * (objective - beta * kl)).sum()
    with torch.no_grad():
        n = live.sum().clamp(min=1)
        stats = {
            "kl": (kl * live).sum() / n,
            "approx_kl": ((ratio - 1.0 - log_ratio) * live).sum() / n,  # k3 of KL(pi_old || pi)
            "clipfrac": (((ratio - 1.0).abs() > clip_eps) & live).sum() / n,
            "ratio_mean": (ratio * live).sum() / n,
            "tokens": live.sum(),
        }
    return loss, stats
