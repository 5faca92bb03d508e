"""Step-cache math: change indicators, the reuse decision and the residual forecast (pure torch).

A step cache keeps the network's output residual ``r = output - input`` of the last
full evaluation and, on a later step whose input (or first-block residual) has
changed little since, returns ``input + r`` instead of evaluating the network.

* Change indicators are per batch item: the relative L1 change
  ``mean|current - reference| / mean|reference|`` over every non-batch dimension,
  computed in float32 (``[B, ...] -> [B]``). The reference is the tensor of the last
  full evaluation, so the value is the change accumulated since then.
* The forecast is first-order in sigma, as TaylorSeer (Liu et al. 2025, arXiv
  2503.06923) does for features: ``r(sigma) = r_1 + (sigma - sigma_1) * (r_1 - r_0) /
  (sigma_1 - sigma_0)`` from the last two full evaluations ``(sigma_0, r_0)``,
  ``(sigma_1, r_1)``; where the two sigmas coincide it falls back to ``r_1``.

Nothing here syncs with the host; the only host sync of a cached step is the caller's
single ``bool`` of :func:`all_below`.
"""

from __future__ import annotations

from typing import Optional

import torch

EPS = 1e-12


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


def _per_item(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Sigma [B] (or a scalar) shaped to broadcast over ``like`` [B, ...], float32 on its device."""
    sigma = sigma.detach().float().to(like.device).reshape(-1)
    if sigma.numel() == 1:
        sigma = sigma.expand(like.shape[0])
    return sigma.reshape((like.shape[0],) + (1,) * (like.ndim - 1))


def forecast(r_last: torch.Tensor, sigma_last: torch.Tensor, sigma: torch.Tensor,
             r_prev: Optional[torch.Tensor] = None, sigma_prev: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The residual at ``sigma`` extrapolated linearly from the last two full evaluations.

    ``r_last``/``r_prev`` [B, ...] residuals at ``sigma_last``/``sigma_prev`` ([B] or
    scalars); ``sigma`` [B] the step to predict. Without ``r_prev`` (only one full
    evaluation so far) this is plain reuse, ``r_last``. Returns ``r_last``'s dtype;
    the arithmetic is float32.
    """
    if r_prev is None or sigma_prev is None or r_prev.shape != r_last.shape:
        return r_last
    last = r_last.float()
    s1 = _per_item(sigma_last, last)
    s0 = _per_item(sigma_prev, last)
    s = _per_item(sigma, last)
    span = s1 - s0
    usable = span.abs() > EPS
    slope = (last - r_prev.to(last.device).float()) / torch.where(usable, span, torch.ones_like(span))
    step = torch.where(usable, s - s1, torch.zeros_like(span))
    return (last + slope * step).to(r_last.dtype)
