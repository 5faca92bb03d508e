"""TeaCache: Timestep Embedding Aware Cache (the rule, pure torch).

Paper: Liu et al. 2024, "Timestep Embedding Tells: It's Time to Cache for Video Diffusion Model",
arXiv 2411.19108. Reference code: ali-vilab/TeaCache (``TeaCache4FLUX/teacache_flux.py``,
``TeaCache4Wan2.1/teacache_generate.py``, commit 7c10efc) and its ComfyUI port welltop-cn/ComfyUI-TeaCache
(``nodes.py``, commit 91dff8e).

Per model call, with ``m_t`` the timestep-modulated input of the first block and ``c`` the model's
polynomial (``numpy.poly1d`` order, highest power first)::

    forced full evaluation   if step < first_steps or step >= steps - last_steps (acc = 0)
    acc += poly_c(mean|m_t - m_{t-1}| / mean|m_{t-1}|)          (m_{t-1}: the previous *call's* input)
    reuse the cached block-stack residual   if acc < threshold
    otherwise evaluate and set acc = 0

``m_{t-1}`` is updated on every call, reused or not, so the indicator is the change accumulated since the last
full evaluation. The reused residual is the last full evaluation's, added unchanged.

The modulated input (what :mod:`..binding` hands in as ``feature``):

* Flux: ``(1 + scale) * LayerNorm(img) + shift`` of double block 0 (``img_norm1``, ``img_mod``), as both
  references compute it;
* Wan 2.1: the time embedding ``e`` (``time_embedding`` output), which both references use in place of a
  modulated input (``e0``, the time projection, in the ports' "ret mode");
* SD1.x UNet (no published TeaCache): the closest counterpart, the first ResBlock's timestep-modulated input
  ``in_layers(h) + emb_layers(emb)`` of input block 1 (``(1 + scale) * norm(h) + shift`` where the block uses
  scale-shift norm), the UNet's own analogue of an adaLN-modulated input.

Defaults (:data:`DEFAULTS`): Flux: the published Flux polynomial, threshold 0.4 (ComfyUI-TeaCache's default and
README row for FLUX), first and last step always evaluated (``cnt == 0 or cnt == num_steps - 1`` in
teacache_flux.py). Wan: the published Wan 2.1 t2v 1.3B polynomial with ``e``, threshold 0.08 (the ComfyUI
README row for Wan2.1-T2V-1.3B, the "fast" setting of TeaCache4Wan2.1; 0.2 is the 14B model's), first and last
step always evaluated (``ret_steps = 1*2``, ``cutoff_steps = 2*steps - 2`` over cond+uncond calls); its "ret
mode" (``DEFAULTS["wan ret"]``: ``e0``, the ret polynomial, the first 5 steps evaluated, 0.10, the reference's
"fast" setting; ComfyUI-TeaCache's README says 0.15 from 10 % of the steps). UNet: no
published coefficients, so the rescale is the identity; no published threshold either: 0.4, Flux's.

Differences from the references, on purpose: the accumulator restarts at every full evaluation of the chunk
(the references restart it exactly when they evaluate; ComfyUI's port, which batches cond and uncond in one
call and evaluates both if either asks, keeps the other chunk's accumulator running then). The ComfyUI port
takes ``abs()`` of the Flux polynomial's value; the Flux polynomial is positive on [0, 1], so this changes
nothing there, and neither reference takes it for Wan (whose polynomial goes negative near 0.26).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .common import Rule, relative_l1

# Published rescale polynomials (highest power first), ali-vilab/TeaCache and ComfyUI-TeaCache.
FLUX = (4.98651651e+02, -2.83781631e+02, 5.58554382e+01, -3.82021401e+00, 2.64230861e-01)
WAN21_T2V_1_3B = (2.39676752e+03, -1.31110545e+03, 2.01331979e+02, -8.29855975e+00, 1.37887774e-01)
WAN21_T2V_14B = (-5784.54975374, 5449.50911966, -1811.16591783, 256.27178429, -13.02252404)
WAN21_T2V_1_3B_RET = (-5.21862437e+04, 9.23041404e+03, -5.28275948e+02, 1.36987616e+01, -4.99875664e-02)

DEFAULTS = {
    "flux": {"threshold": 0.4, "coefficients": FLUX, "first_steps": 1, "last_steps": 1},
    "wan": {"threshold": 0.08, "coefficients": WAN21_T2V_1_3B, "first_steps": 1, "last_steps": 1},
    "unet": {"threshold": 0.4, "coefficients": None, "first_steps": 1, "last_steps": 1},
    # Wan's "ret mode" (feature e0): TeaCache4Wan2.1 --use_ret_steps, 1.3B "fast" 0.10, ret_steps 5*2, no cutoff
    "wan ret": {"threshold": 0.10, "coefficients": WAN21_T2V_1_3B_RET, "first_steps": 5, "last_steps": 0},
}


def rescale(coefficients: Optional[Sequence[float]], x: float) -> float:
    """``poly1d(coefficients)(x)`` (highest power first); the identity without coefficients."""
    if coefficients is None:
        return x
    value = 0.0
    for c in coefficients:  # Horner
        value = value * x + c
    return value


class TeaCache(Rule):
    """TeaCache's rule for one chunk of one run; ``feature``: the modulated input [rows, ...]."""

    def __init__(self, threshold: float, coefficients: Optional[Sequence[float]] = None, first_steps: int = 1,
                 last_steps: int = 1):
        super().__init__()
        if threshold < 0:
            raise ValueError(f"TeaCache: threshold must be >= 0, got {threshold}")
        self.threshold = threshold
        self.coefficients = tuple(coefficients) if coefficients is not None else None
        self.first_steps, self.last_steps = first_steps, last_steps
        self.accumulated = 0.0
        self.previous: Optional[torch.Tensor] = None

    def decide(self, step: int, steps: int, feature: Optional[torch.Tensor] = None) -> bool:
        previous, self.previous = self.previous, feature.detach()
        forced = step < self.first_steps or step >= steps - self.last_steps
        if forced or previous is None or previous.shape != feature.shape or self.cached is None:
            self.accumulated = 0.0
            return False
        self.accumulated += rescale(self.coefficients, relative_l1(feature, previous))
        if self.accumulated < self.threshold:
            return True
        self.accumulated = 0.0
        return False

    def store(self, step: int, residual: torch.Tensor) -> None:
        super().store(step, residual)
        self.accumulated = 0.0
