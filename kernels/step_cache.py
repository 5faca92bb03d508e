"""Step-cache math: change indicators, the reuse decision, the cached direction and its forecast (pure torch).

A step cache keeps, from the last full evaluation, the ODE direction
``d = (x - denoised) / sigma`` (k-diffusion's ``to_d``: the noise prediction of an eps
model, the velocity of a flow model) and, on a later step whose input (or first-block
residual) has changed little since, returns ``denoised = x - sigma * d`` instead of
evaluating the network: the output residual ``denoised - x`` of the last evaluation,
rescaled to the current sigma.

* Change indicators are per batch item: the relative L1 change
  ``mean|current - reference| / mean|reference|`` over every non-batch dimension,
  computed in float32 (``[B, ...] -> [B]``). The reference is the tensor of the last
  full evaluation, so the value is the change accumulated since then.
* The forecast extrapolates ``d`` in sigma from the last two full evaluations
  ``(sigma_0, d_0)``, ``(sigma_1, d_1)``, as TaylorSeer (Liu et al. 2025, arXiv
  2503.06923) does for features: ``d(sigma) = d_1 + g * (sigma - sigma_1) * (d_1 - d_0) /
  (sigma_1 - sigma_0)`` with gain ``g`` (1 is the first-order Taylor step; StepCache uses
  1/2, see FORECAST_GAIN); where the two sigmas coincide it falls back to ``d_1``.
* The evaluation budget (``target_speedup`` T > 0) is a leaky bucket per batch item, in
  host floats: its credit starts at 1, every model call adds ``1/T``, a full evaluation
  costs 1 (:func:`credit_after`). An item evaluates (beyond the evaluations forced on it)
  only while its credit covers one, so after k calls it has had at most ``1 + k/T``
  (:func:`budget_evaluates`, which also says which change spends the credit).

Nothing here syncs with the host; the only host sync of a cached step is the caller's
single ``bool`` of :func:`all_below` (or its one list of the budget's inputs).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch

EPS = 1e-12
# Share of the first-order step the forecast takes. Measured on the tiny SD1.5 and SDXL test models (20 steps, the
# same reused steps): the full step overshoots and lands further from the uncached result than plain reuse, half of
# it lands closer than both (help page of PatchLab_StepCache).
FORECAST_GAIN = 0.5


def relative_change(current: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``mean|current - reference| / mean|reference|`` per item: ``[B, ...], [B, ...] -> [B]`` float32.

    A zero reference gives 0 for an unchanged item and a huge value otherwise.
    """
    if current.shape != reference.shape:
        raise ValueError(f"relative_change needs equal shapes, got {tuple(current.shape)} and "
                         f"{tuple(reference.shape)}")
    current = current.detach().float().flatten(1)
    reference = reference.detach().to(current.device).float().flatten(1)
    return (current - reference).abs().mean(1) / reference.abs().mean(1).clamp_min(EPS)


def all_below(values: torch.Tensor, threshold: float) -> torch.Tensor:
    """0-dim bool tensor: every value is strictly below ``threshold`` (False for threshold <= 0)."""
    if threshold <= 0:
        return torch.zeros((), dtype=torch.bool, device=values.device)
    return (values < threshold).all()


def per_item(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Sigma [B] (or a scalar) shaped to broadcast over ``like`` [B, ...], float32 on its device."""
    sigma = sigma.detach().float().to(like.device).reshape(-1)
    if sigma.numel() == 1:
        sigma = sigma.expand(like.shape[0])
    return sigma.reshape((like.shape[0],) + (1,) * (like.ndim - 1))


def forecast(r_last: torch.Tensor, sigma_last: torch.Tensor, sigma: torch.Tensor,
             r_prev: Optional[torch.Tensor] = None, sigma_prev: Optional[torch.Tensor] = None,
             gain: float = 1.0) -> torch.Tensor:
    """The value at ``sigma`` extrapolated linearly from the last two full evaluations.

    ``r_last``/``r_prev`` [B, ...] values at ``sigma_last``/``sigma_prev`` ([B] or
    scalars); ``sigma`` [B] the step to predict; ``gain`` scales the first-order step
    (1: the full Taylor step, 0: plain reuse). Without ``r_prev`` (only one full
    evaluation so far) this is plain reuse, ``r_last``. Returns ``r_last``'s dtype;
    the arithmetic is float32.
    """
    if r_prev is None or sigma_prev is None or r_prev.shape != r_last.shape:
        return r_last
    last = r_last.float()
    s1 = per_item(sigma_last, last)
    s0 = per_item(sigma_prev, last)
    s = per_item(sigma, last)
    span = s1 - s0
    usable = span.abs() > EPS
    slope = (last - r_prev.to(last.device).float()) / torch.where(usable, span, torch.ones_like(span))
    step = torch.where(usable, s - s1, torch.zeros_like(span))
    return (last + gain * slope * step).to(r_last.dtype)


def direction(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """The ODE direction ``d = (x - denoised) / sigma`` (k-diffusion's ``to_d``), float32 [B, ...].

    ``x`` and ``denoised`` [B, ...], ``sigma`` [B] or a scalar. For eps-prediction models
    ``d`` is the network's noise prediction, for flow models its velocity: the quantity
    that changes least from step to step. Items with ``sigma <= EPS`` get ``d = 0``.
    """
    s = per_item(sigma, x)
    safe = torch.where(s > EPS, s, torch.ones_like(s))
    d = (x.float() - denoised.to(x.device).float()) / safe
    return torch.where(s > EPS, d, torch.zeros_like(d))


def denoised_from_direction(x: torch.Tensor, sigma: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``x - sigma * d`` [B, ...] float32: the denoised prediction a cached direction ``d`` implies at ``sigma``."""
    return x.float() - per_item(sigma, x) * d.to(x.device).float()


# --- the evaluation budget (target_speedup): a leaky-bucket credit per batch item, host floats ----------------

# Slack of the budget's comparisons: repeated 1/T additions (T = 3) must not round a whole credit below 1.
BUDGET_SLACK = 1e-6


def credit_after(credit: float, evaluated: bool, target: float) -> float:
    """A batch item's credit after one model call: ``+1/target`` per call, ``-1`` if the call evaluated it in full.

    ``target <= 0`` (no budget) leaves it as it is. The credit may go negative after an evaluation the
    caller forces (first step, outside the window); the following reuses pay it back.
    """
    if target <= 0:
        return credit
    return credit + 1.0 / target - (1.0 if evaluated else 0.0)


def remaining_calls(schedule: Sequence[float], sigma: float, calls_so_far: int,
                    window: Tuple[float, float] = (math.inf, 0.0)) -> Tuple[float, float]:
    """Estimated model calls of a run after the current one, and how many of those fall outside the window.

    ``schedule``: the run's sigmas, falling (N + 1 values for N steps; the model is called at the first N);
    ``sigma``: the current call's; ``calls_so_far``: the sampler's evaluations of the run so far, this one
    included; ``window``: ``(sigma_start, sigma_end)``, where the cache may reuse. The current step is the
    first whose sigma is not above ``sigma`` (a second-order sampler's extra evaluation counts as the next
    step's); calls per step are ``calls_so_far`` over the steps begun, at least 1. Returns ``(remaining,
    outside)``, both ``calls per step x steps``, so floats.
    """
    steps = list(schedule[:-1])
    if not steps:
        return 0.0, 0.0
    tolerance = 1e-4 * max(abs(sigma), EPS)
    index = min(sum(1 for s in steps if s > sigma + tolerance), len(steps) - 1)
    per_step = max(1.0, calls_so_far / (index + 1))
    later = steps[index + 1:]
    start, end = window
    outside = sum(1 for s in later if s <= EPS or not end <= s <= start)
    return per_step * len(later), per_step * outside


def budget_evaluates(change: float, credit: float, reused: int, threshold: float, max_consecutive: int,
                     target: float, remaining: float = 0.0, outside: float = 0.0) -> bool:
    """Whether an item the caller does not force to evaluate is evaluated in full at this call (budget ``target``).

    ``change``: its indicator's accumulated relative change since its last evaluation; ``credit``: its
    credit before this call (:func:`credit_after`); ``reused``: its reused calls in a row; ``remaining`` /
    ``outside``: :func:`remaining_calls`. With this call's ``1/target`` added, the credit that is free is
    what the evaluations forced outside the window later will not be paid by the income until then. Then:

    * less than 1 free: reuse (the budget wins over ``max_consecutive``);
    * ``reused >= max_consecutive``: evaluate;
    * the credit pays for evaluating this and every remaining call: evaluate (the budget is spent on the
      last steps rather than left);
    * else evaluate when ``change >= threshold / free``: the more unspent credit, the smaller the change
      that spends it, so the largest changes are served first and a small indicator still spends its budget.

    Evaluating only with a free credit of 1 keeps the run's evaluations of the item at most ``1 + calls /
    target`` plus the forced ones the income cannot pay for.
    """
    income = 1.0 / target
    now = credit + income
    free = now - max(0.0, outside - remaining * income)
    if free < 1.0 - BUDGET_SLACK:
        return False
    if reused >= max_consecutive:
        return True
    if now - 1.0 >= remaining * (1.0 - income) - BUDGET_SLACK:
        return True
    return change >= threshold / free
