"""MagCache: Magnitude-aware Cache (the rule and its calibration, pure torch).

Paper: Ma et al. 2025, "MagCache: Fast Video Generation with Magnitude-Aware Cache", arXiv 2506.09045.
Reference code: Zehong-Ma/MagCache (``MagCache4Wan2.1/magcache_generate.py``: ``magcache_calibration``,
``magcache_forward``, ``nearest_interp``; ``MagCache4FLUX/magcache_flux.py``; commit df81cb1) and its ComfyUI
port Zehong-Ma/ComfyUI-MagCache (``nodes.py``, ``nodes_calibration.py``, commit 47bdd2a).

Calibration, once per model: one full run records, per step ``t >= 1`` and per stream (cond, uncond), the mean
over tokens of the ratio of successive block-stack residual norms::

    gamma_t = mean_tokens( ||r_t|| / ||r_{t-1}|| )      norms over the channel (last) dimension

and the table is ``[1.0, gamma_1, ..., gamma_{T-1}]`` (:class:`Calibration`). A run with another step count
reads the table through the reference's nearest-index interpolation (:func:`nearest_interp`).

The rule, per call from step ``int(steps * retention_ratio)`` on (earlier steps are always evaluated)::

    ratio *= gamma_step;  skipped += 1;  err += |1 - ratio|
    reuse the cached residual   if err < threshold and skipped <= K
    otherwise evaluate and reset (ratio = 1, skipped = 0, err = 0)

``ratio`` is the magnitude of the current residual relative to the cached one, so ``err`` is the accumulated
error of reusing it; the cached residual is added unchanged.

Defaults (:data:`DEFAULTS`, the ComfyUI-MagCache README's rows): Flux ``threshold 0.24, retention 0.1, K 5``;
Wan 2.1 t2v 1.3B ``0.12, 0.2, 4``; SD1.x UNet (no published row): the ComfyUI node's defaults ``0.06, 0.2, 2``.
Retention starts at ``int(steps * retention_ratio)`` as in the ComfyUI port (the Flux script rounds, the Wan
script counts cond and uncond calls). The published ratio tables are for the released checkpoints; on any other
model the reference's own procedure applies, calibration, which is what :mod:`..binding` runs.

Differences from the references, on purpose: the counters restart at every full evaluation of the chunk (the
references restart them exactly when they evaluate; ComfyUI's port skips a batched cond+uncond call when either
chunk may, we evaluate it when either must). The Flux script's "never skip step 11 of 28" exception is a
property of Flux.1-dev's calibration and is left out. Each chunk reads its own stream's table (cond for a
stream the calibration did not see).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch

from .common import Rule

DEFAULTS = {
    "flux": {"threshold": 0.24, "retention_ratio": 0.1, "max_skips": 5},
    "wan": {"threshold": 0.12, "retention_ratio": 0.2, "max_skips": 4},
    "unet": {"threshold": 0.06, "retention_ratio": 0.2, "max_skips": 2},
}


def nearest_interp(ratios: Sequence[float], length: int) -> List[float]:
    """The reference's resampling of a ratio table to ``length`` steps: index ``round(i * (L - 1) / (length - 1))``."""
    ratios = list(ratios)
    if length == 1:
        return [ratios[-1]]
    scale = (len(ratios) - 1) / (length - 1)
    return [ratios[int(round(i * scale))] for i in range(length)]


class MagCache(Rule):
    """MagCache's rule for one chunk of one run; ``ratios``: the calibrated table of this chunk's stream."""

    def __init__(self, ratios: Sequence[float], threshold: float, retention_ratio: float, max_skips: int):
        super().__init__()
        if not ratios:
            raise ValueError("MagCache: needs a calibrated ratio table, got an empty one; run the calibration first")
        self.ratios = list(ratios)
        self.threshold, self.retention_ratio, self.max_skips = threshold, retention_ratio, max_skips
        self._table: Dict[int, List[float]] = {}
        self._reset()

    def _reset(self) -> None:
        self.ratio, self.skipped, self.error = 1.0, 0, 0.0

    def gamma(self, step: int, steps: int) -> float:
        """The calibrated ratio of ``step`` in a run of ``steps`` (resampled when the table has another length)."""
        if len(self.ratios) == steps:
            return self.ratios[step]
        if steps not in self._table:
            self._table[steps] = nearest_interp(self.ratios, steps)
        return self._table[steps][step]

    def decide(self, step: int, steps: int, feature: Optional[torch.Tensor] = None) -> bool:
        if step < int(steps * self.retention_ratio) or self.cached is None:
            return False
        self.ratio *= self.gamma(step, steps)
        self.skipped += 1
        self.error += abs(1.0 - self.ratio)
        if self.error < self.threshold and self.skipped <= self.max_skips:
            return True
        self._reset()
        return False

    def store(self, step: int, residual: torch.Tensor) -> None:
        super().store(step, residual)
        self._reset()


class Recorder(Rule):
    """The calibration run's rule for one chunk: never reuses; records ``gamma_step`` of every full evaluation."""

    def __init__(self, calibration: Calibration, stream: int):
        super().__init__()
        self.calibration, self.stream = calibration, stream
        self.previous: Optional[torch.Tensor] = None

    def decide(self, step: int, steps: int, feature: Optional[torch.Tensor] = None) -> bool:
        return False

    def store(self, step: int, residual: torch.Tensor) -> None:
        residual = residual.detach().float()
        if self.previous is not None and self.previous.shape == residual.shape:
            gamma = (residual.norm(dim=-1) / self.previous.norm(dim=-1).clamp_min(1e-12)).mean()
            self.calibration.record(self.stream, step, float(gamma))
        self.previous = residual


class Calibration:
    """The ratio tables a calibration run records, per stream (0 cond, 1 uncond); outlives the run."""

    def __init__(self):
        self._sums: Dict[int, Dict[int, List[float]]] = {}

    def recorder(self, stream: int) -> Recorder:
        return Recorder(self, stream)

    def record(self, stream: int, step: int, gamma: float) -> None:
        self._sums.setdefault(stream, {}).setdefault(step, []).append(gamma)

    def ratios(self) -> Dict[int, List[float]]:
        """Per stream ``[1.0, gamma_1, ...]`` (the mean where several chunks of a stream recorded a step)."""
        tables = {}
        for stream, by_step in self._sums.items():
            last = max(by_step)
            tables[stream] = [1.0] + [sum(by_step.get(s, [1.0])) / len(by_step.get(s, [1.0]))
                                      for s in range(1, last + 1)]
        return tables
