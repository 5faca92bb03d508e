"""Pure math for guidance skipping: how closely the positive and negative predictions agree."""

from __future__ import annotations

import torch


def prediction_similarity(x: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
    """Cosine similarity per sample of the two noise predictions, in float32.

    ``x``, ``cond``, ``uncond``: [B, ...] (the input and the two denoised predictions).
    The noise predictions are ``x - denoised`` (for eps and v models ``sigma * eps``, for
    flow models ``sigma * velocity``); the positive per-sample factor ``sigma`` does not
    change a cosine. Each sample is flattened whole (channels and every spatial or time
    axis). Returns [B] float32, on the input's device; 1 for two identical predictions.
    """
    a = (x - cond).flatten(1).float()
    b = (x - uncond).flatten(1).float()
    dot = (a * b).sum(dim=1)
    norms = a.norm(dim=1) * b.norm(dim=1)
    same = (a == b).all(dim=1)
    similarity = dot / norms.clamp_min(torch.finfo(torch.float32).tiny)
    return torch.where(same, torch.ones_like(similarity), similarity.clamp(-1.0, 1.0))
