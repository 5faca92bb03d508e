"""Fourier-domain filters and FreeU's backbone scaling.

Filters act on the last two (spatial) dimensions only, so 4-D images ``[B, C, H, W]``
and 5-D video ``[B, C, T, H, W]`` are treated alike (the time axis is never
filtered). FFTs run in float32 and the result is cast back to the input dtype.
"""

from __future__ import annotations

import torch

from .guidance import per_sample


def low_frequency_mask(height: int, width: int, cutoff: int, device=None) -> torch.Tensor:
    """Boolean [H, W]: the centred (fftshifted) low-frequency square of half-size ``cutoff``.

    Rows ``[H//2 - c, H//2 + c)`` and columns likewise, ``c`` clamped to the size.
    """
    def band(size: int) -> torch.Tensor:
        centre = size // 2
        half = max(0, min(cutoff, centre))
        index = torch.arange(size, device=device)
        inside = (index >= centre - half) & (index < centre + half)
        if half == 0 and size == 1:
            inside = torch.ones_like(inside)  # a single frequency is the DC term
        return inside

    return band(height)[:, None] & band(width)[None, :]


def scale_frequencies(x: torch.Tensor, scale_low: float, scale_high: float, cutoff: int) -> torch.Tensor:
    """Multiply the low-frequency square of the spatial spectrum by ``scale_low`` and the rest by ``scale_high``.

    FreSca (Huang et al. 2025, arXiv 2504.02154) and FreeU's skip filter. x [..., H, W]
    -> same shape and dtype. With both scales 1 the input comes back (up to FFT
    round-off).
    """
    height, width = x.shape[-2:]
    spectrum = torch.fft.fftshift(torch.fft.fftn(x.float(), dim=(-2, -1)), dim=(-2, -1))
    low = low_frequency_mask(height, width, cutoff, device=x.device)
    weights = torch.where(low, torch.tensor(scale_low, device=x.device), torch.tensor(scale_high, device=x.device))
    spectrum = spectrum * weights
    out = torch.fft.ifftn(torch.fft.ifftshift(spectrum, dim=(-2, -1)), dim=(-2, -1)).real
    return out.to(x.dtype)


def freeu_v2_backbone_factor(h: torch.Tensor, b: float) -> torch.Tensor:
    """FreeU v2's structure-aware backbone factor ``1 + (b - 1) * normalised channel mean``.

    The channel mean of h [B, C, H, W] is min-max normalised per sample; a flat map
    (max == min) counts as 1 everywhere, i.e. the plain FreeU factor ``b``.
    Returns [B, 1, H, W] in h's dtype.
    """
    mean = h.float().mean(dim=1, keepdim=True)
    flat = mean.reshape(mean.shape[0], -1)
    low = per_sample(flat.min(dim=1).values, mean)
    span = per_sample(flat.max(dim=1).values, mean) - low
    normalised = torch.where(span > 0, (mean - low) / span.clamp_min(1e-12), torch.ones_like(mean))
    return ((b - 1) * normalised + 1).to(h.dtype)
