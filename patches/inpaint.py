"""Denoise-mask patches (ComfyUI's ``denoise_mask_function`` slot).

The slot holds one function, called once per step while an inpainting mask exists:
``fn(sigma, denoise_mask, extra_options) -> denoise_mask`` with
``extra_options["model"]`` (the sampler's model wrapper) and ``extra_options["sigmas"]``
(this run's schedule). A function already in the slot is chained, not replaced: it
runs first and its mask is what this one transforms.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from ..kernels import inpaint

MaskFunction = Callable[..., torch.Tensor]


def differential_diffusion(strength: float, previous: Optional[MaskFunction] = None) -> MaskFunction:
    def mask_function(sigma, denoise_mask, extra_options):
        if previous is not None:
            denoise_mask = previous(sigma, denoise_mask, extra_options)
        sampling = extra_options["model"].inner_model.model_sampling
        schedule = extra_options["sigmas"]
        sigma_end = torch.maximum(torch.as_tensor(sampling.sigma_min, device=schedule.device), schedule[-1])
        threshold = inpaint.progress_threshold(sampling.timestep(sigma[0]), sampling.timestep(schedule[0]),
                                               sampling.timestep(sigma_end))
        return inpaint.progressive_mask(denoise_mask, threshold.to(denoise_mask.device), strength)
    return mask_function


def with_differential_diffusion(model, strength: float):
    """A clone whose denoise mask follows Differential Diffusion, after any mask function already set."""
    patched = model.clone()
    previous = model.model_options.get("denoise_mask_function")
    patched.set_model_denoise_mask_function(differential_diffusion(strength, previous))
    return patched
