"""ModelSampling object patches.

A ComfyUI model samples through its ``model_sampling`` object: the sigma table the
schedulers pick from, ``timestep(sigma)`` (what the network is conditioned on),
``sigma(timestep)``, ``percent_to_sigma`` and, through the prediction-type mixin,
how the network output becomes a denoised latent. The patches here build such an
object from :mod:`..kernels.sigma_schedules` and install it on a clone with
``add_object_patch("model_sampling", obj)``.

The schedule classes subclass ComfyUI's own (and the prediction types are ComfyUI's
mixins), so ``isinstance`` checks in samplers and other packs (``CONST`` marks a flow
model, for instance) keep working; the tables and time maps are ours.

The tables (``sigmas``, ``log_sigmas``) are plain tensor attributes, not registered buffers
(:class:`_OwnTables`): ComfyUI's dynamic VRAM (0.16+, CUDA) backs a loaded model's buffers up
and writes them back by attribute path, into whatever object then sits at ``model_sampling``,
so a patched schedule and the checkpoint's own swap tables between runs (ComfyUI issue 16490).
Without buffers nothing of ours is backed up, and a by-path write into our object is ignored;
``model.to(...)`` still moves the tables.
"""

from __future__ import annotations

import functools
import logging
import math

import comfy.model_sampling as cms
import comfy.samplers
import torch

from ..kernels import sigma_schedules as ss

log = logging.getLogger(__name__)


class _OwnTables(torch.nn.Module):
    """The schedule's tables as plain attributes (see the module's docstring), first in a schedule's bases."""

    TABLES = ("sigmas", "log_sigmas")

    def _set_table(self, name: str, table: torch.Tensor) -> None:
        self._buffers.pop(name, None)
        self.__dict__[name] = table

    def set_sigmas(self, sigmas):
        self._set_table("sigmas", sigmas.float())
        self._set_table("log_sigmas", sigmas.log().float())

    def register_buffer(self, name, tensor, persistent=True):
        """Ignored: after construction only ComfyUI's dynamic loader writes buffers, restoring another object's."""
        log.debug("model_sampling: a by-path write of buffer %r left out (ComfyUI issue 16490)", name)

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        for name in self.TABLES:
            if name in self.__dict__:
                self.__dict__[name] = fn(self.__dict__[name])
        return out


# --- prediction types ---------------------------------------------------------

class LCM(cms.EPS):
    """EPS prediction read through the consistency boundary conditions (LCM, arXiv 2310.04378)."""

    def calculate_denoised(self, sigma, model_output, model_input):
        shape = sigma.shape[:1] + (1,) * (model_output.ndim - 1)
        timestep = self.timestep(sigma).view(shape)
        sigma = sigma.view(shape)
        x0 = model_input - model_output * sigma
        c_skip, c_out = ss.lcm_scalings(timestep)
        return c_out * x0 + c_skip * model_input


DISCRETE_PREDICTIONS = {
    "eps": cms.EPS,
    "v_prediction": cms.V_PREDICTION,
    "lcm": LCM,
    "x0": cms.X0,
    "img_to_img": cms.IMG_TO_IMG,
}

# name -> (prediction mixin, sigma_data, replaces the latent format with Playground v2.5's)
CONTINUOUS_EDM_PREDICTIONS = {
    "v_prediction": (cms.V_PREDICTION, 1.0, False),
    "edm": (cms.EDM, 0.5, False),
    "edm_playground_v2.5": (cms.EDM, 0.5, True),
    "eps": (cms.EPS, 1.0, False),
    "cosmos_rflow": (cms.COSMOS_RFLOW, 1.0, False),
}


# --- schedules ----------------------------------------------------------------

def _settings(model_config) -> dict:
    return dict(getattr(model_config, "sampling_settings", None) or {})


class DiscreteSchedule(_OwnTables, cms.ModelSamplingDiscrete):
    """The DDPM table of SD1.x/SDXL-style models, from the model config's beta schedule."""

    def __init__(self, model_config=None, zsnr=None):
        torch.nn.Module.__init__(self)
        settings = _settings(model_config)
        self.num_timesteps = int(settings.get("timesteps", 1000))
        self.linear_start = settings.get("linear_start", 0.00085)
        self.linear_end = settings.get("linear_end", 0.012)
        self.zsnr = settings.get("zsnr", False) if zsnr is None else zsnr
        self.sigma_data = 1.0
        betas = ss.beta_schedule(settings.get("beta_schedule", "linear"), self.num_timesteps,
                                 self.linear_start, self.linear_end)
        sigmas = ss.vp_sigmas(betas)
        if self.zsnr:
            sigmas = ss.zero_terminal_snr(sigmas)
        self.set_sigmas(sigmas)

    def timestep(self, sigma):
        return ss.table_timestep(self.log_sigmas, sigma)

    def sigma(self, timestep):
        return ss.table_sigma(self.log_sigmas, timestep)

    def percent_to_sigma(self, percent):
        if percent <= 0.0:
            return 999999999.9
        if percent >= 1.0:
            return 0.0
        return self.sigma(torch.tensor((1.0 - percent) * 999.0)).item()


class DistilledSchedule(DiscreteSchedule):
    """The 50-entry sub-table LCM-distilled models were trained on (timesteps 19, 39, ..., 999)."""

    original_timesteps = 50

    def __init__(self, model_config=None, zsnr=None):
        super().__init__(model_config, zsnr=zsnr)
        table, self.skip_steps = ss.distill_table(self.sigmas, self.original_timesteps)
        self.set_sigmas(table)

    def timestep(self, sigma):
        return ss.table_timestep(self.log_sigmas, sigma, skip=self.skip_steps)

    def sigma(self, timestep):
        return ss.table_sigma(self.log_sigmas, timestep, skip=self.skip_steps)


class _FlowTimes(_OwnTables):
    """A flow schedule's time maps: timestep = sigma * multiplier, sigma = the shifted time (``shifted``), and
    sigma 1 at the start of the schedule, 0 at its end."""

    multiplier = 1.0

    def timestep(self, sigma):
        return sigma * self.multiplier

    def sigma(self, timestep):
        return self.shifted(timestep / self.multiplier)

    def percent_to_sigma(self, percent):
        if percent <= 0.0:
            return 1.0
        if percent >= 1.0:
            return 0.0
        return self.shifted(1.0 - percent)


class FlowSchedule(_FlowTimes, cms.ModelSamplingDiscreteFlow):
    """Rectified-flow schedule with the SD3 shift; timestep = sigma * multiplier."""

    def __init__(self, model_config=None):
        torch.nn.Module.__init__(self)
        settings = _settings(model_config)
        self.set_parameters(shift=settings.get("shift", 1.0), multiplier=settings.get("multiplier", 1000))

    def set_parameters(self, shift=1.0, timesteps=1000, multiplier=1000):
        self.shift = shift
        self.multiplier = multiplier
        self._set_table("sigmas", ss.flow_table(shift, multiplier, timesteps))

    def shifted(self, t):
        return ss.flow_shift(t, self.shift)


class FluxSchedule(_FlowTimes, cms.ModelSamplingFlux):
    """Flux's schedule: the flow shift written as ``mu = log(shift)``; timestep = sigma."""

    def __init__(self, model_config=None):
        torch.nn.Module.__init__(self)
        self.set_parameters(shift=_settings(model_config).get("shift", 1.15))

    def set_parameters(self, shift=1.15, timesteps=10000):
        self.shift = shift
        self._set_table("sigmas", ss.flux_table(shift, timesteps))

    def shifted(self, t):
        return ss.flux_shift(t, self.shift)


class ContinuousEDMSchedule(_OwnTables, cms.ModelSamplingContinuousEDM):
    """Continuous log-linear schedule between sigma_min and sigma_max; timestep = log(sigma) / 4."""

    def __init__(self, model_config=None):
        torch.nn.Module.__init__(self)
        settings = _settings(model_config)
        self.set_parameters(settings.get("sigma_min", 0.002), settings.get("sigma_max", 120.0),
                            settings.get("sigma_data", 1.0))

    def set_parameters(self, sigma_min, sigma_max, sigma_data):
        self.sigma_data = sigma_data
        sigmas = ss.log_linear_table(sigma_min, sigma_max)
        self._set_table("sigmas", sigmas)
        self._set_table("log_sigmas", sigmas.log())

    def timestep(self, sigma):
        return ss.edm_timestep(sigma)

    def sigma(self, timestep):
        return ss.edm_sigma(timestep)

    def percent_to_sigma(self, percent):
        if percent <= 0.0:
            return 999999999.9
        if percent >= 1.0:
            return 0.0
        return ss.log_linear_percent_to_sigma(percent, float(self.sigma_min), float(self.sigma_max))


class ContinuousVSchedule(ContinuousEDMSchedule, cms.ModelSamplingContinuousV):
    """Continuous schedule conditioned on the angle ``2/pi * atan(sigma)``."""

    def timestep(self, sigma):
        return ss.angular_timestep(sigma)

    def sigma(self, timestep):
        return ss.angular_sigma(timestep)


class RFlowSchedule(ContinuousEDMSchedule, cms.ModelSamplingCosmosRFlow):
    """Cosmos rectified flow over a log-linear sigma range; timestep = sigma / (sigma + 1)."""

    def timestep(self, sigma):
        return ss.rflow_timestep(sigma)

    def sigma(self, timestep):
        return ss.rflow_sigma(torch.as_tensor(timestep), self.sigma_max)


class CascadeSchedule(_OwnTables, cms.StableCascadeSampling):
    """Stable Cascade's shifted cosine schedule over a 10000-entry table."""

    def __init__(self, model_config=None):
        torch.nn.Module.__init__(self)
        self.set_parameters(_settings(model_config).get("shift", 1.0))

    def set_parameters(self, shift=1.0, cosine_s=8e-3):
        self.sigma_data = 1.0
        self.zsnr = False
        self.shift = shift
        self.cosine_s = torch.tensor(cosine_s)
        self._init_alpha_cumprod = torch.cos(self.cosine_s / (1 + self.cosine_s) * torch.pi * 0.5) ** 2
        self.num_timesteps = 10000
        self.set_sigmas(ss.cascade_table(shift, self.num_timesteps, cosine_s))

    def sigma(self, timestep):
        return ss.cascade_sigma(torch.as_tensor(timestep, dtype=torch.float32), self.shift, float(self.cosine_s))

    def timestep(self, sigma):
        return ss.cascade_timestep(sigma, float(self.cosine_s))

    def percent_to_sigma(self, percent):
        if percent <= 0.0:
            return 999999999.9
        if percent >= 1.0:
            return 0.0
        return float(self.sigma(1.0 - percent))


@functools.cache
def _sampling_class(schedule: type, prediction: type) -> type:
    """The class ``(schedule, prediction)`` ComfyUI expects, made once per pair."""
    name = f"PatchLab{schedule.__name__}{prediction.__name__}"
    return type(name, (schedule, prediction), {"__module__": __name__})


# --- factories: plain values in, a model_sampling object out --------------------

def discrete(model_config, prediction: str, zsnr: bool):
    """ModelSamplingDiscrete: a DDPM table with the given prediction type.

    ``lcm`` also switches to the 50-step distilled table (as ComfyUI does).
    """
    if prediction not in DISCRETE_PREDICTIONS:
        raise ValueError(f"sampling must be one of {', '.join(DISCRETE_PREDICTIONS)}, got {prediction!r}")
    schedule = DistilledSchedule if prediction == "lcm" else DiscreteSchedule
    return _sampling_class(schedule, DISCRETE_PREDICTIONS[prediction])(model_config, zsnr=zsnr)


def stable_cascade(model_config, shift: float):
    obj = _sampling_class(CascadeSchedule, cms.EPS)(model_config)
    obj.set_parameters(shift)
    return obj


def flow(model_config, shift: float, multiplier: float):
    """SD3 (multiplier 1000) and AuraFlow (multiplier 1) flow schedules."""
    obj = _sampling_class(FlowSchedule, cms.CONST)(model_config)
    obj.set_parameters(shift=shift, multiplier=multiplier)
    return obj


def flux(model_config, image_tokens: float, base_shift: float, max_shift: float):
    """Flux schedule with ``mu`` interpolated for ``image_tokens`` patches."""
    obj = _sampling_class(FluxSchedule, cms.CONST)(model_config)
    obj.set_parameters(shift=ss.flux_mu(image_tokens, base_shift, max_shift))
    return obj


def continuous_edm(model_config, prediction: str, sigma_min: float, sigma_max: float):
    """Returns (model_sampling, latent_format or None)."""
    if prediction not in CONTINUOUS_EDM_PREDICTIONS:
        raise ValueError(f"sampling must be one of {', '.join(CONTINUOUS_EDM_PREDICTIONS)}, got {prediction!r}")
    mixin, sigma_data, playground = CONTINUOUS_EDM_PREDICTIONS[prediction]
    schedule = RFlowSchedule if prediction == "cosmos_rflow" else ContinuousEDMSchedule
    obj = _sampling_class(schedule, mixin)(model_config)
    obj.set_parameters(sigma_min, sigma_max, sigma_data)
    latent_format = None
    if playground:
        import comfy.latent_formats
        latent_format = comfy.latent_formats.SDXL_Playground_2_5()
    return obj, latent_format


def continuous_v(model_config, sigma_min: float, sigma_max: float):
    obj = _sampling_class(ContinuousVSchedule, cms.V_PREDICTION)(model_config)
    obj.set_parameters(sigma_min, sigma_max, 1.0)
    return obj


# --- model glue -----------------------------------------------------------------

def model_config(model):
    """The ``model_config`` of a ModelPatcher's base model."""
    return model.model.model_config


def install(model, model_sampling, latent_format=None):
    """A clone of ``model`` sampling through ``model_sampling``; the input is untouched."""
    patched = model.clone()
    patched.add_object_patch("model_sampling", model_sampling)
    if latent_format is not None:
        patched.add_object_patch("latent_format", latent_format)
    return patched


def patch_size(model) -> int:
    """Side of the square patches a DiT cuts the latent into (2 when the model has none)."""
    size = getattr(model.model.diffusion_model, "patch_size", None)
    return size if isinstance(size, int) and size > 0 else 2


def vae_downscale(model) -> int:
    """Pixels per latent cell of the model's VAE (8 when the latent format does not say)."""
    ratio = getattr(model.get_model_object("latent_format"), "spacial_downscale_ratio", None)
    return ratio if isinstance(ratio, int) and ratio > 0 else 8


def image_tokens_from_size(model, width: int, height: int) -> float:
    """Patches of a width x height image: ``w * h / (vae^2 * patch^2)``, as ComfyUI counts them."""
    factor = vae_downscale(model)
    size = patch_size(model)
    return width * height / (factor * factor * size * size)


def image_tokens_from_latent(model, samples: torch.Tensor) -> int:
    """Patches the model really makes of a latent [..., H, W] (the DiT pads to whole patches)."""
    size = patch_size(model)
    height, width = samples.shape[-2:]
    return math.ceil(height / size) * math.ceil(width / size)


def scheduler_names() -> list:
    """The schedulers this ComfyUI offers (KSampler's list)."""
    return list(comfy.samplers.SCHEDULER_NAMES)


def sampler_sigmas(model, scheduler: str, steps: int, denoise: float = 1.0) -> torch.Tensor:
    """The sigmas KSampler would use for ``model`` ([steps + 1] float32 on the CPU, ending at 0).

    ``denoise < 1`` keeps the last ``steps`` steps of a longer schedule, as KSampler does.
    """
    if scheduler not in comfy.samplers.SCHEDULER_NAMES:
        names = ", ".join(comfy.samplers.SCHEDULER_NAMES)
        raise ValueError(f"unknown scheduler {scheduler!r}; expected one of {names}")
    if steps <= 0 or denoise <= 0.0:
        return torch.zeros(0)
    total = steps if denoise > 0.9999 else int(steps / denoise)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, total)
    return sigmas.float().cpu()[-(steps + 1):]
