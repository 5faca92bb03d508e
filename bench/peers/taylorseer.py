"""TaylorSeer: forecast features between full evaluations with a Taylor series (the rule, pure torch).

Paper: Liu et al. 2025, "From Reusing to Forecasting: Accelerating Diffusion Models with TaylorSeers",
arXiv 2503.06923. Reference code: Shenyi-Z/TaylorSeer (``TaylorSeer-FLUX/src/flux/taylor_utils/__init__.py``:
``derivative_approximation``, ``taylor_formula``; ``.../cache_functions/cache_init.py`` and ``cal_type.py``;
the same in ``TaylorSeer-Wan2.1/wan/taylorseer/`` and ``TaylorSeer-DiT/``; commit 288776d); its diffusers port
(``diffusers/hooks/taylorseer_cache.py``) and ComfyUI port (philipy1219/ComfyUI-TaylorSeer) use the same rule.

Schedule (``cal_type``): the first ``first_enhance`` steps are evaluated, then one full evaluation every
``interval`` steps (``interval - 1`` forecast steps between). On a full evaluation at step ``s`` with the
previous one at ``s'`` (``d = s - s'``), the factors are updated by finite differences of the stored ones::

    F_0 = f(s);   F_{i+1} = (F_i - F_i_old) / d     for i < order, while F_i_old exists
                                                    (and only once s > first_enhance - 2, as the reference)

and a step ``s + k`` between full evaluations is forecast as ``sum_i F_i * k^i / i!``. Note that the reference
divides every order by the latest spacing ``d`` and expands around ``s`` with backward differences, so an
order-2 forecast of an exact quadratic is not exact (the tests work one by hand).

The feature: the reference forecasts every attention and MLP output of every block (and recomputes the cheap
norms and modulations around them); its Lite variant (diffusers' lite mode, OpenVINO GenAI) forecasts only the
network's output. The bench forecasts the residual of the whole block stack (:mod:`..binding`), the slot every
peer here reuses: the transformer is skipped as in Lite mode, and what is forecast is the block stack's
contribution rather than the head's output.

Defaults (:data:`DEFAULTS`, the reference's "Taylor" settings): Flux ``interval 6, order 1, first_enhance 3``
(TaylorSeer-FLUX ``cache_init``); Wan 2.1 ``interval 5, order 1, first_enhance 1`` (TaylorSeer-Wan2.1); the
SD1.x UNet has no TaylorSeer: the image DiT's script defaults, ``interval 4, order 4, first_enhance 2``
(TaylorSeer-DiT ``sample.py``, DiT-XL/2).
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch

from .common import Rule

DEFAULTS = {
    "flux": {"interval": 6, "order": 1, "first_enhance": 3},
    "wan": {"interval": 5, "order": 1, "first_enhance": 1},
    "unet": {"interval": 4, "order": 4, "first_enhance": 2},
}


class TaylorSeer(Rule):
    """TaylorSeer's rule for one chunk of one run (reads no feature)."""

    def __init__(self, interval: int, order: int, first_enhance: int):
        super().__init__()
        if interval < 1 or order < 0:
            raise ValueError(f"TaylorSeer: interval must be >= 1 and order >= 0, got {interval} and {order}")
        self.interval, self.order, self.first_enhance = interval, order, first_enhance
        self.factors: Dict[int, torch.Tensor] = {}
        self.activated: List[int] = []  # steps of the full evaluations

    def decide(self, step: int, steps: int, feature: Optional[torch.Tensor] = None) -> bool:
        if step < self.first_enhance or not self.factors:
            return False
        return step - self.activated[-1] < self.interval

    def store(self, step: int, residual: torch.Tensor) -> None:
        distance = step - self.activated[-1] if self.activated else 0
        factors = {0: residual}
        for i in range(self.order):
            old = self.factors.get(i)
            if old is None or old.shape != residual.shape or distance <= 0 or step <= self.first_enhance - 2:
                break
            factors[i + 1] = (factors[i] - old) / distance
        self.factors = factors
        self.activated.append(step)
        self.cached = residual

    def reuse(self, step: int) -> torch.Tensor:
        k = step - self.activated[-1]
        out = self.factors[0].clone()
        for i in range(1, len(self.factors)):
            out = out + self.factors[i] * (k ** i / math.factorial(i))
        return out
