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


# --- forecasts from a longer history: second order (TaylorSeer) and a Chebyshev fit (Spectrum) ------------------

# Full evaluations a chunk keeps per forecast (the memory: this many directions [B, ...] per cond/uncond chunk).
HISTORY = {"first": 2, "taylor 2": 3, "chebyshev": 4}
CHEBYSHEV_DEGREE = 2    # Spectrum fits T0..Tp; p = 2 over four evaluations smooths rather than interpolates
CHEBYSHEV_RIDGE = 1e-3  # ridge on the T1..Tp coefficients per evaluation (u in [-1, 1]); larger pulls the forecast
# towards the history's mean, which lags behind the newest evaluation


def taylor2_weights(sigmas: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Weights [B, 3] over the last three evaluations (``sigmas`` [B, 3], newest first) of the quadratic through them
    at ``sigma`` [B]: TaylorSeer's second-order forecast (Liu et al. 2025, arXiv 2503.06923) with divided differences
    in sigma instead of steps, ``f[s0] + f[s0, s1](s - s0) + f[s0, s1, s2](s - s0)(s - s1)`` (Lagrange form).

    Items without three distinct sigmas get plain reuse ``[1, 0, 0]`` here (:func:`forecast_history` gives them the
    first-order forecast).
    """
    s0, s1, s2 = sigmas.float().unbind(-1)
    s = sigma.float().reshape(-1).expand_as(s0)
    d01, d02, d12 = s0 - s1, s0 - s2, s1 - s2
    distinct3 = (d01.abs() > EPS) & (d02.abs() > EPS) & (d12.abs() > EPS)

    def safe(v):
        return torch.where(v.abs() > EPS, v, torch.ones_like(v))

    quadratic = torch.stack([(s - s1) * (s - s2) / safe(d01 * d02), (s - s0) * (s - s2) / safe(-d01 * d12),
                             (s - s0) * (s - s1) / safe(d02 * d12)], -1)
    reuse = torch.zeros_like(quadratic)
    reuse[..., 0] = 1
    return torch.where(distinct3[:, None], quadratic, reuse)


def chebyshev_weights(sigmas: torch.Tensor, sigma: torch.Tensor, degree: int = CHEBYSHEV_DEGREE,
                      ridge: float = CHEBYSHEV_RIDGE) -> torch.Tensor:
    """Weights [B, K] over the last K evaluations (``sigmas`` [B, K], newest first) of a ridge-regressed Chebyshev
    fit evaluated at ``sigma`` [B]: Spectrum (Han et al. 2026, arXiv 2603.01623) fits each feature as
    ``sum_j c_j T_j(u)`` over the history, u the sigma mapped to [-1, 1] over the span of the history and the
    step to predict, with the coefficients ``c = (A^T A + ridge R)^-1 A^T D`` (A [K, p+1] the basis at the history,
    R penalising T1..Tp, so with too few distinct sigmas the fit leans to their mean). The forecast ``T(u*) c`` is
    linear in the history, ``w^T D``: only these weights are computed (small, no host sync).
    """
    sigmas = sigmas.float()
    s = sigma.float().reshape(-1, 1).expand(sigmas.shape[0], 1)
    points = torch.cat([sigmas, s], -1)
    low, high = points.amin(-1, keepdim=True), points.amax(-1, keepdim=True)
    span = (high - low).clamp_min(EPS)

    def basis(v):  # [B, n] -> [B, n, p + 1]
        u = 2 * (v - low) / span - 1
        columns = [torch.ones_like(u), u]
        for _ in range(2, degree + 1):
            columns.append(2 * u * columns[-1] - columns[-2])
        return torch.stack(columns[:degree + 1], -1)

    a = basis(sigmas)                                        # [B, K, p+1]
    penalty = torch.ones(degree + 1, device=a.device)
    penalty[0] = 0
    gram = a.transpose(1, 2) @ a + ridge * sigmas.shape[-1] * torch.diag_embed(penalty).expand(a.shape[0], -1, -1)
    gram = gram + EPS * torch.eye(degree + 1, device=a.device)
    at_sigma = basis(s)                                      # [B, 1, p+1]
    coefficients, _ = torch.linalg.solve_ex(gram, at_sigma.transpose(1, 2))  # [B, p+1, 1] (no error check: no sync)
    return (a @ coefficients)[..., 0]                        # [B, K]


def forecast_history(ds: Sequence[torch.Tensor], sigmas: Sequence[torch.Tensor], sigma: torch.Tensor,
                     method: str) -> torch.Tensor:
    """The direction at ``sigma`` [B] forecast from the last evaluations ``ds`` [B, ...] at ``sigmas`` [B] (both newest
    first, as many as ``HISTORY[method]`` or fewer): ``taylor 2`` (:func:`taylor2_weights`) or ``chebyshev``
    (:func:`chebyshev_weights`). An item with fewer than three distinct sigmas (fewer evaluations yet; the history
    repeats its oldest) gets the first-order forecast at FORECAST_GAIN instead, as ``forecast`` gives. Returns the
    newest's dtype; the arithmetic is float32."""
    if method not in ("taylor 2", "chebyshev"):
        raise ValueError(f"unknown forecast {method!r}; expected 'taylor 2' or 'chebyshev'")
    kept = next((k for k, d in enumerate(ds) if d.shape != ds[0].shape), len(ds))
    ds, sigmas = list(ds[:kept]), list(sigmas[:kept])  # the evaluations since the last change of shape, in step
    if len(ds) < 3:
        return forecast(ds[0], sigmas[0], sigma, ds[1] if len(ds) > 1 else None,
                        sigmas[1] if len(ds) > 1 else None, gain=FORECAST_GAIN)
    newest = ds[0].float()
    stacked = torch.stack([per_item(s, newest).reshape(-1) for s in sigmas[:len(ds)]], -1)  # [B, K]
    target = per_item(sigma, newest).reshape(-1)
    weights = taylor2_weights(stacked[:, :3], target) if method == "taylor 2" else chebyshev_weights(stacked, target)
    distinct = 1 + ((stacked[:, 1:] - stacked[:, :-1]).abs() > EPS).sum(-1)  # [B]; repeats sit at the old end
    span = stacked[:, 0] - stacked[:, 1]
    usable = span.abs() > EPS
    step = torch.where(usable, FORECAST_GAIN * (target - stacked[:, 0]) / torch.where(usable, span, 1.0), 0.0)
    first = torch.zeros_like(weights)
    first[:, 0], first[:, 1] = 1 + step, -step
    weights = torch.where((distinct < 3)[:, None], first, weights)
    out = torch.zeros_like(newest)
    for k, d in enumerate(ds[:weights.shape[-1]]):
        out = out + weights[:, k].reshape((-1,) + (1,) * (newest.ndim - 1)) * d.to(newest.device).float()
    return out.to(ds[0].dtype)


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
