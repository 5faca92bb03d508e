"""Soft inpainting masks (Differential Diffusion)."""

from __future__ import annotations

import torch


def progress_threshold(current: torch.Tensor, start: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
    """Where sampling stands between ``start`` (1) and ``end`` (0), from timesteps: ``(t - t_end) / (t_start - t_end)``.

    Finite when start == end (returns 0).
    """
    span = start - end
    safe = torch.where(span.abs() > 1e-12, span, torch.ones_like(span))
    return torch.where(span.abs() > 1e-12, (current - end) / safe, torch.zeros_like(span))


def progressive_mask(denoise_mask: torch.Tensor, threshold: torch.Tensor, strength: float) -> torch.Tensor:
    """Differential Diffusion (Levin & Fried 2023, arXiv 2306.00950).

    A pixel whose mask value is at least ``threshold`` is changed at this step, so a
    soft mask lets the area of change grow as sampling proceeds. The binary mask is
    blended with the original by ``strength``: 1 is Differential Diffusion, 0 leaves
    the mask as given. denoise_mask [B, 1|C, ...] -> same shape and dtype.
    """
    binary = (denoise_mask >= threshold).to(denoise_mask.dtype)
    return strength * binary + (1 - strength) * denoise_mask
