"""Run real ComfyUI sampling on tiny models (tests and benchmarks)."""

from __future__ import annotations

import threading
from typing import Optional

import comfy.sample
import torch

from .testkit import tiny_models

# ComfyUI draws the initial noise once per prompt, on the prompt thread; only model calls run in
# the multi-device threads. Two test runs preparing noise at once would interleave
# ``torch.manual_seed`` and ``torch.randn`` on the one global generator and get each other's noise.
_NOISE_LOCK = threading.Lock()


def server_sample(*args, **kwargs) -> torch.Tensor:
    """``comfy.sample.sample(*args, **kwargs)`` under ``torch.inference_mode()``, as ComfyUI's server runs every
    node (``execution.py``); without it autograd records every operation of the network, which the server never
    does, and a timing of the in-process run is not what a user gets. The result is returned as an ordinary
    tensor (usable in place and in autograd afterwards)."""
    with torch.inference_mode():
        out = comfy.sample.sample(*args, **kwargs)
    return out.clone()


def sample(model, layout_name: str, steps: int = 4, cfg: float = 5.0, sampler: str = "euler",
           scheduler: str = "normal", seed: int = 0, height: int = 16, width: int = 16, batch: int = 1,
           positive=None, negative=None, latent: Optional[torch.Tensor] = None, denoise: float = 1.0,
           noise_mask: Optional[torch.Tensor] = None, sigmas: Optional[torch.Tensor] = None,
           noise: Optional[torch.Tensor] = None, callback=None) -> torch.Tensor:
    """``comfy.sample.sample`` as KSampler runs it (in inference mode, as the server); returns the latent [B, C, H, W].

    Prompts default to seeded tiny conditionings (positive seed 1, negative seed 2) with one
    different embedding per batch item (pass a batch-1 conditioning to repeat one prompt);
    ``noise`` defaults to KSampler's seeded noise for ``seed``; ``callback(step, x0, x, total)`` runs per step.
    """
    if latent is None:
        latent = tiny_models.empty_latent(layout_name, height, width, batch)
    batch = latent.shape[0]
    positive = positive if positive is not None else tiny_models.conditioning(layout_name, seed=1, batch=batch)
    negative = negative if negative is not None else tiny_models.conditioning(layout_name, seed=2, batch=batch)
    latent = comfy.sample.fix_empty_latent_channels(model, latent)
    if noise is None:
        with _NOISE_LOCK:  # prepare_noise seeds torch's process-global generator, then draws from it
            noise = comfy.sample.prepare_noise(latent, seed)
    return server_sample(model, noise, steps, cfg, sampler, scheduler, positive, negative, latent,
                         denoise=denoise, noise_mask=noise_mask, sigmas=sigmas, callback=callback,
                         disable_pbar=True, seed=seed)
