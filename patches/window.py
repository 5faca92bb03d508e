"""The part of the sampling schedule where a patch acts, as a sigma interval.

Nodes expose ``start_percent`` / ``end_percent`` (0 = the first step, 1 = the last);
they are converted once, when the node runs, with the model's own
``model_sampling.percent_to_sigma``, so the window follows any ModelSampling patch
applied before it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SigmaWindow:
    """Active while ``sigma_end <= sigma <= sigma_start`` (sigmas fall as sampling goes on)."""

    sigma_start: float
    sigma_end: float

    @classmethod
    def from_percents(cls, model, start_percent: float, end_percent: float) -> SigmaWindow:
        if not 0.0 <= start_percent <= end_percent <= 1.0:
            raise ValueError(f"start_percent ({start_percent}) and end_percent ({end_percent}) must satisfy "
                             "0 <= start_percent <= end_percent <= 1")
        if start_percent == 0.0 and end_percent == 1.0:
            return cls.always()
        sampling = model.get_model_object("model_sampling")
        return cls(float(sampling.percent_to_sigma(start_percent)), float(sampling.percent_to_sigma(end_percent)))

    @classmethod
    def always(cls) -> SigmaWindow:
        return cls(float("inf"), 0.0)

    @property
    def is_always(self) -> bool:
        return self.sigma_start == float("inf") and self.sigma_end <= 0.0

    def mask(self, sigma: torch.Tensor) -> torch.Tensor:
        """Per-sample boolean [B] (no host sync): where the window covers ``sigma`` [B]."""
        return (sigma <= self.sigma_start) & (sigma >= self.sigma_end)

    def row_mask(self, sigma: torch.Tensor, rows: int) -> torch.Tensor:
        """Boolean [rows] for a network call whose rows stack chunks of the sampler's batch.

        ``transformer_options["sigmas"]`` holds the sampler's batch [B] while the call may
        stack cond and uncond ([k * B] rows, chunk after chunk): the mask is tiled over the
        chunks. Where the rows are not a multiple of B, any sample inside counts (as in
        :meth:`contains`). No host sync.
        """
        mask = self.mask(sigma.reshape(-1))
        if mask.numel() == rows:
            return mask
        if mask.numel() and rows % mask.numel() == 0:
            return mask.repeat(rows // mask.numel())
        return mask.any().expand(rows)

    def contains(self, sigma: torch.Tensor) -> bool:
        """Whether the step at ``sigma`` is inside the window.

        One host sync per call: use it once per sampling step to skip work (an extra
        model pass), never per layer. Inside the window for any sample counts.
        """
        if self.is_always:
            return True
        return bool(self.mask(sigma.detach().float().flatten()).any())
