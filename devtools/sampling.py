"""Run real ComfyUI sampling on tiny models (tests and benchmarks)."""

from __future__ import annotations

from typing import Optional

import comfy.sample
import torch

from .testkit import tiny_models


def sample(model, layout_name: str, steps: int = 4, cfg: float = 5.0, sampler: str = "euler",
           scheduler: str = "normal", seed: int = 0, height: int = 16, width: int = 16, batch: int = 1,
           positive=None, negative=None, latent: Optional[torch.Tensor] = None, denoise: float = 1.0,
           noise_mask: Optional[torch.Tensor] = None, sigmas: Optional[torch.Tensor] = None,
           noise: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``comfy.sample.sample`` as KSampler runs it; returns the sampled latent [B, C, H, W].

    Prompts default to seeded tiny conditionings (positive seed 1, negative seed 2) with one
    different embedding per batch item (pass a batch-1 conditioning to repeat one prompt);
    ``noise`` defaults to KSampler's seeded noise for ``seed``.
    """
    if latent is None:
        latent = tiny_models.empty_latent(layout_name, height, width, batch)
    batch = latent.shape[0]
    positive = positive if positive is not None else tiny_models.conditioning(layout_name, seed=1, batch=batch)
    negative = negative if negative is not None else tiny_models.conditioning(layout_name, seed=2, batch=batch)
    latent = comfy.sample.fix_empty_latent_channels(model, latent)
    noise = comfy.sample.prepare_noise(latent, seed) if noise is None else noise
    return comfy.sample.sample(model, noise, steps, cfg, sampler, scheduler, positive, negative, latent,
                               denoise=denoise, noise_mask=noise_mask, sigmas=sigmas, disable_pbar=True, seed=seed)
