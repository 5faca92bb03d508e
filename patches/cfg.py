"""CFG-space patches: functions for ComfyUI's pre- and post-CFG hooks.

Hooks used (both are lists in ComfyUI, so these patches stack with each other and
with other packs; none takes the single ``sampler_cfg_function`` slot):

* pre-CFG (``set_model_sampler_pre_cfg_function``): receives ``conds_out``, the
  denoised predictions ``[cond, uncond, ...]`` (uncond is None when cfg == 1 skipped
  it) and returns a modified list; CFG is computed from it afterwards.
* post-CFG (``set_model_sampler_post_cfg_function``): receives the CFG result
  ``denoised`` with ``cond_denoised`` / ``uncond_denoised`` and returns a new denoised.

All work is per sample and on device. Outside a node's sigma window the input
passes through unchanged (``torch.where`` per sample, no host sync). State that must
live across the steps of one run (APG's momentum) is kept in that run's own
``model_options`` copy, so it starts empty every run and dies with it.
"""

from __future__ import annotations

import itertools
import logging
from typing import Callable, Dict, List, Optional

import comfy.model_sampling
import torch

from ..kernels import guidance
from . import run
from .window import SigmaWindow

log = logging.getLogger(__name__)

MOMENTUM_KEY = "patchlab_apg_momentum"  # transformer_options: one APG node's MomentumRun (a suffix per node)
_apg_instances = itertools.count()
PreCFG = Callable[[Dict], List]
PostCFG = Callable[[Dict], torch.Tensor]


def in_window(window: SigmaWindow, sigma: torch.Tensor, patched: torch.Tensor, plain: torch.Tensor) -> torch.Tensor:
    """``patched`` where the window covers the sample's sigma, else exactly ``plain``."""
    if window.is_always:
        return patched
    mask = guidance.per_sample(window.row_mask(sigma.to(plain.device), plain.shape[0]), plain)
    return torch.where(mask, patched, plain)


class MomentumRun(run.RunState):
    """APG's momentum buffer for one sampling run (the run-state protocol, :mod:`.run`): every run starts from
    zero, and nothing is kept after it."""

    def __init__(self):
        super().__init__()
        self.running: Optional[torch.Tensor] = None

    def finish(self, finished: bool) -> None:
        self.running = None


# --- prediction spaces -------------------------------------------------------------

def to_velocity(model_sampling, x: torch.Tensor, denoised: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The model's native output space for a denoised prediction.

    Flow models (CONST): the velocity ``(x - denoised) / sigma``. Others: the
    v-prediction ``(c_skip * x - denoised) / c_out`` with ``c_skip = sd^2 / (sigma^2 +
    sd^2)``, ``c_out = sigma * sd / sqrt(sigma^2 + sd^2)`` (sd = sigma_data; for SD1.x/SDXL,
    sd = 1, ComfyUI's RescaleCFG conversion).
    """
    s = guidance.per_sample(sigma, x).clamp_min(1e-8)
    if isinstance(model_sampling, comfy.model_sampling.CONST):
        return (x - denoised) / s
    sd = float(getattr(model_sampling, "sigma_data", 1.0))
    c_skip = sd * sd / (s * s + sd * sd)
    c_out = s * sd / (s * s + sd * sd) ** 0.5
    return (x * c_skip - denoised) / c_out


def from_velocity(model_sampling, x: torch.Tensor, velocity: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`to_velocity`."""
    s = guidance.per_sample(sigma, x).clamp_min(1e-8)
    if isinstance(model_sampling, comfy.model_sampling.CONST):
        return x - velocity * s
    sd = float(getattr(model_sampling, "sigma_data", 1.0))
    c_skip = sd * sd / (s * s + sd * sd)
    c_out = s * sd / (s * s + sd * sd) ** 0.5
    return x * c_skip - velocity * c_out


# --- post-CFG patches ----------------------------------------------------------------

def rescale_cfg(multiplier: float, window: SigmaWindow) -> PostCFG:
    """RescaleCFG as a post-CFG function: rescale the CFG result in the model's v-space."""
    def post_cfg(args):
        denoised = args["denoised"]
        if args["uncond_denoised"] is None or multiplier == 0:
            return denoised
        sampling, x, sigma = args["model"].model_sampling, args["input"], args["sigma"]
        guided_v = to_velocity(sampling, x, denoised, sigma)
        cond_v = to_velocity(sampling, x, args["cond_denoised"], sigma)
        rescaled = from_velocity(sampling, x, guidance.rescale(guided_v, cond_v, multiplier), sigma)
        return in_window(window, sigma, rescaled, denoised)
    return post_cfg


def renorm_cfg(truncated: Callable[[torch.Tensor], torch.Tensor], renorm_factor: float, channels: int,
               window: SigmaWindow) -> PostCFG:
    """RenormCFG as a post-CFG function, per sample.

    Where ``truncated(sigma)`` (per-sample boolean [B]) holds, the result is the cond
    prediction (no guidance); elsewhere the first ``channels`` channels of the CFG result
    have their norm capped at ``renorm_factor * ||cond||`` and the remaining channels come
    from cond. (PatchLab_RenormCFG also leaves the negative pass out at truncated steps,
    see ``patches/guidance_skip.py``; this function keeps the result right where it cannot.)
    """
    def post_cfg(args):
        denoised, cond = args["denoised"], args["cond_denoised"]
        if args["uncond_denoised"] is None:
            return denoised
        sigma = args["sigma"]
        guided = guidance.renorm(denoised[:, :channels], cond[:, :channels], renorm_factor)
        guided = torch.cat([guided, cond[:, channels:]], dim=1)
        cut = guidance.per_sample(truncated(sigma.to(denoised.device)), denoised)
        return in_window(window, sigma, torch.where(cut, cond, guided), denoised)
    return post_cfg


def cfg_norm(strength: float, window: SigmaWindow) -> PostCFG:
    """CFGNorm: shrink the CFG result where its channel norm exceeds cond's.

    ``out = denoised * (1 + strength * (scale - 1))`` with CFGNorm's per-pixel
    ``scale`` in [0, 1]; strength 1 is ComfyUI's CFGNorm, 0 disables it.
    """
    def post_cfg(args):
        denoised = args["denoised"]
        scale = guidance.channel_norm_scale(denoised, args["cond_denoised"])
        return in_window(window, args["sigma"], denoised * (1 + strength * (scale - 1)), denoised)
    return post_cfg


def mahiro(window: SigmaWindow) -> PostCFG:
    """Mahiro guidance with per-sample similarity (ComfyUI's pools it over the batch)."""
    def post_cfg(args):
        denoised = args["denoised"]
        if args["uncond_denoised"] is None:
            return denoised
        out = guidance.mahiro(args["cond_denoised"], args["uncond_denoised"], denoised, args["cond_scale"])
        return in_window(window, args["sigma"], out, denoised)
    return post_cfg


def step_index(model_options: Dict, sigma: torch.Tensor) -> torch.Tensor:
    """Per sample, how many sigmas of this run's schedule lie above ``sigma`` (0 on the first step)."""
    schedule = model_options.get("transformer_options", {}).get("sample_sigmas")
    if schedule is None:
        return torch.full_like(sigma, 10**9, dtype=torch.long)
    schedule = schedule.to(sigma.device, torch.float32)
    return (schedule[None, :] > sigma.float()[:, None] * (1 + 1e-5)).sum(dim=1)


def cfg_zero_star(mode: str, zero_init_steps: int, window: SigmaWindow) -> PostCFG:
    """CFG-Zero* (arXiv 2503.18886) as a post-CFG function.

    ``paper``: the paper's rule on scores ``e = x - denoised``:
    ``e = alpha*e_u + s*(e_c - alpha*e_u)``. ``comfyui``: ComfyUI's CFGZeroStar, the same
    rule applied to denoised predictions (differs by ``x (1 - alpha)(1 - s)``). The first
    ``zero_init_steps`` steps of the run return ``x`` itself (zero velocity: the sample
    does not move), the paper's zero-init.
    """
    def post_cfg(args):
        denoised, uncond = args["denoised"], args["uncond_denoised"]
        if uncond is None:
            return denoised
        x, cond, scale, sigma = args["input"], args["cond_denoised"], args["cond_scale"], args["sigma"]
        if mode == "paper":
            out = x - guidance.zero_star(x - cond, x - uncond, scale)
        else:
            alpha = guidance.zero_star_alpha(x - cond, x - uncond)
            out = denoised + uncond * (alpha - 1.0) + scale * uncond * (1.0 - alpha)
        if zero_init_steps > 0:
            first = step_index(args["model_options"], sigma.to(x.device)) < zero_init_steps
            out = torch.where(guidance.per_sample(first, x), x, out)
        return in_window(window, sigma, out, denoised)
    return post_cfg


# --- pre-CFG patches ---------------------------------------------------------------------

def _cond_uncond(args):
    out = args["conds_out"]
    if len(out) < 2 or out[1] is None or None in args["conds"][:2]:
        return out, None, None
    return out, out[0], out[1]


def adaptive_projected_guidance(eta: float, norm_threshold: float, momentum: float, mode: str,
                                window: SigmaWindow) -> PreCFG:
    """APG (arXiv 2410.02416) as a pre-CFG function.

    The guidance ``cond - uncond`` gets reverse momentum, a norm cap and its component
    along ``cond`` scaled by ``eta``. ``paper`` mode produces
    ``cond + (s - 1) * update`` (the paper's and diffusers' rule: eta 1, no cap, no
    momentum is plain CFG); ``comfyui`` mode ComfyUI's APG, ``cond + s * update``. The
    momentum buffer lives in this run's :class:`MomentumRun` under ``pre_cfg.run_key`` (:func:`with_apg`
    installs it): every run starts from zero; a call outside a sampling run has no momentum to carry.
    """
    key = f"{MOMENTUM_KEY}.{next(_apg_instances)}"

    def pre_cfg(args):
        out, cond, uncond = _cond_uncond(args)
        scale = args["cond_scale"]
        if cond is None or scale == 0:
            return out
        sigma = args["sigma"]
        diff = cond - uncond
        if momentum != 0:
            state = run.of(args["model_options"], key) or MomentumRun()
            running = torch.zeros_like(diff) if state.running is None else state.running
            state.running = in_window(window, sigma, guidance.momentum_update(running, diff, momentum), running)
            diff = state.running
        update = guidance.apg_update(diff, cond, eta, norm_threshold)
        if mode == "paper":
            modified = uncond + (cond + (scale - 1) * update - uncond) / scale
        else:
            modified = uncond + update + (cond - uncond) / scale
        return [in_window(window, sigma, modified, cond), uncond] + list(out[2:])

    pre_cfg.run_key = key
    return pre_cfg


def with_apg(model, fn: PreCFG):
    """A clone with APG's pre-CFG function and the run state of its momentum."""
    patched = with_pre_cfg(model, fn)
    run.install(patched, fn.run_key, lambda guider, sigmas: MomentumRun())
    return patched


def tangential_damping_cfg(window: SigmaWindow) -> PreCFG:
    """TCFG (arXiv 2503.18137): replace uncond by its projection on the top singular direction of [uncond; cond]."""
    def pre_cfg(args):
        out, cond, uncond = _cond_uncond(args)
        if cond is None:
            return out
        x = args["input"]
        damped = x - guidance.tangential_damping(x - cond, x - uncond)
        return [cond, in_window(window, args["sigma"], damped, uncond)] + list(out[2:])
    return pre_cfg


def fresca(scale_low: float, scale_high: float, freq_cutoff: int, window: SigmaWindow) -> PreCFG:
    """FreSca (arXiv 2504.02154): scale low and high spatial frequencies of the guidance separately."""
    from ..kernels import frequency

    def pre_cfg(args):
        out, cond, uncond = _cond_uncond(args)
        if cond is None:
            return out
        filtered = uncond + frequency.scale_frequencies(cond - uncond, scale_low, scale_high, freq_cutoff)
        return [in_window(window, args["sigma"], filtered, cond), uncond] + list(out[2:])
    return pre_cfg


# --- installing -------------------------------------------------------------------------------

def with_post_cfg(model, fn: PostCFG, disable_cfg1_optimization: bool = False):
    patched = model.clone()
    patched.set_model_sampler_post_cfg_function(fn, disable_cfg1_optimization=disable_cfg1_optimization)
    return patched


def with_pre_cfg(model, fn: PreCFG):
    patched = model.clone()
    patched.set_model_sampler_pre_cfg_function(fn)
    return patched


def unet_in_channels(model, default: int) -> int:
    """Channels the diffusion model takes in (RenormCFG guides only those)."""
    channels = getattr(model.model.diffusion_model, "in_channels", None)
    return channels if isinstance(channels, int) and channels > 0 else default
