"""Noise schedules of the model-sampling families, in pure torch.

Vocabulary (as in ComfyUI):

* *sigma* is the noise level. Variance-preserving models (SD1.x, SDXL) are sampled
  in the variance-exploding form ``x = x0 + sigma * eps`` with
  ``sigma = sqrt((1 - abar) / abar)``; flow models use the interpolation
  ``x = (1 - sigma) * x0 + sigma * eps`` with ``sigma`` in [0, 1].
* *timestep* is what the network is conditioned on: an index into a discrete table
  (0..T-1), ``t * multiplier`` for flow models, or a continuous function of sigma.
* a *table* is the ascending [T] tensor of sigmas schedulers pick from.

Every function is device- and dtype-agnostic unless its docstring says otherwise
and keeps float64 where ComfyUI's own tables are built in float64, so tables match
ComfyUI's to float32 precision.
"""

from __future__ import annotations

import math
from typing import Tuple, Union

import torch

Number = Union[float, int]
TensorOrNumber = Union[torch.Tensor, float]

BETA_SCHEDULES = ("linear", "cosine", "squaredcos_cap_v2", "sqrt_linear", "sqrt")

# ComfyUI's zero-terminal-SNR rescale pins abar_T to this instead of 0, so the last
# sigma stays finite (about 4519) while the terminal SNR is ~5e-8.
ZSNR_TERMINAL_ALPHA_BAR = 4.8973451890853435e-08


# --- variance-preserving discrete schedules (DDPM, SD1.x/SDXL) -----------------

def beta_schedule(name: str, timesteps: int, linear_start: float, linear_end: float,
                  cosine_s: float = 8e-3) -> torch.Tensor:
    """DDPM betas, [timesteps] float64.

    ``linear`` is the "scaled linear" schedule of Stable Diffusion:
    ``beta_i = (sqrt(start) + i / (T-1) * (sqrt(end) - sqrt(start)))**2``.
    ``cosine`` and ``squaredcos_cap_v2`` are Nichol & Dhariwal 2021 (arXiv 2102.09672),
    clipped at 0.999.
    """
    if name == "linear":
        return torch.linspace(linear_start ** 0.5, linear_end ** 0.5, timesteps, dtype=torch.float64) ** 2
    if name == "cosine":
        steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps + cosine_s
        alphas = torch.cos(steps / (1 + cosine_s) * math.pi / 2).pow(2)
        alphas = alphas / alphas[0]
        return torch.clamp(1 - alphas[1:] / alphas[:-1], min=0, max=0.999)
    if name == "squaredcos_cap_v2":
        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = [min(1 - alpha_bar((i + 1) / timesteps) / alpha_bar(i / timesteps), 0.999)
                 for i in range(timesteps)]
        return torch.tensor(betas, dtype=torch.float64)
    if name == "sqrt_linear":
        return torch.linspace(linear_start, linear_end, timesteps, dtype=torch.float64)
    if name == "sqrt":
        return torch.linspace(linear_start, linear_end, timesteps, dtype=torch.float64) ** 0.5
    raise ValueError(f"unknown beta schedule {name!r}; expected one of {', '.join(BETA_SCHEDULES)}")


def vp_sigmas(betas: torch.Tensor) -> torch.Tensor:
    """Sigmas of a DDPM schedule: ``sqrt((1 - abar) / abar)``, ``abar = prod(1 - beta)``.

    betas [T] -> sigmas [T], ascending, same dtype.
    """
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5


def zero_terminal_snr(sigmas: torch.Tensor) -> torch.Tensor:
    """Rescale a VP schedule to zero terminal SNR (Lin et al. 2023, arXiv 2305.08891, Alg. 1).

    ``sqrt(abar)`` is shifted so its last value is 0 and scaled so its first value is
    unchanged; the last ``abar`` is then set to :data:`ZSNR_TERMINAL_ALPHA_BAR`
    (ComfyUI's choice, keeping the last sigma finite). sigmas [T] -> [T].
    """
    sqrt_abar = (1 / (sigmas * sigmas + 1)).sqrt()
    first, last = sqrt_abar[0].clone(), sqrt_abar[-1].clone()
    sqrt_abar = (sqrt_abar - last) * (first / (first - last))
    alpha_bar = sqrt_abar ** 2
    alpha_bar[-1] = ZSNR_TERMINAL_ALPHA_BAR
    return ((1 - alpha_bar) / alpha_bar) ** 0.5


def snr(sigma: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio of a VP sigma: ``abar / (1 - abar) = 1 / sigma**2``."""
    return 1.0 / (sigma * sigma)


def distill_table(sigmas: torch.Tensor, steps: int) -> Tuple[torch.Tensor, int]:
    """The ``steps``-entry sub-table used by LCM-style distilled models.

    Keeps every ``skip = T // steps``-th sigma counted back from the last one.
    sigmas [T] -> (table [steps] float32, skip).
    """
    skip = sigmas.shape[0] // steps
    picks = sigmas.shape[0] - 1 - torch.arange(steps - 1, -1, -1) * skip
    return sigmas[picks].to(torch.float32), skip


def table_sigma(log_sigmas: torch.Tensor, t: torch.Tensor, skip: int = 1) -> torch.Tensor:
    """sigma(timestep) of a discrete table: log-linear interpolation between entries.

    ``t`` (any shape) is a timestep in table units times ``skip`` plus ``skip - 1``
    (``skip = 1`` for a plain table); it is clamped to the table. Returns a tensor
    of t's shape on t's device.
    """
    idx = (t.float().to(log_sigmas.device) - (skip - 1)) / skip if skip != 1 else t.float().to(log_sigmas.device)
    idx = torch.clamp(idx, min=0, max=log_sigmas.shape[0] - 1)
    low, high, w = idx.floor().long(), idx.ceil().long(), idx.frac()
    log_sigma = (1 - w) * log_sigmas[low] + w * log_sigmas[high]
    return log_sigma.exp().to(t.device)


def table_timestep(log_sigmas: torch.Tensor, sigma: torch.Tensor, skip: int = 1) -> torch.Tensor:
    """timestep(sigma) of a discrete table: the nearest entry in log space.

    Returns an integer tensor of sigma's shape: ``index * skip + (skip - 1)``.
    """
    dists = sigma.log().to(log_sigmas.device) - log_sigmas[:, None]
    index = dists.abs().argmin(dim=0).view(sigma.shape)
    if skip != 1:
        index = index * skip + (skip - 1)
    return index.to(sigma.device)


def lcm_scalings(timestep: torch.Tensor, sigma_data: float = 0.5,
                 timestep_scaling: float = 10.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Consistency-model boundary conditions (Song et al. 2023; LCM, arXiv 2310.04378).

    ``denoised = c_out * x0_pred + c_skip * x`` with
    ``c_skip = sd^2 / ((s t)^2 + sd^2)`` and ``c_out = s t / sqrt((s t)^2 + sd^2)``.
    Returns (c_skip, c_out) of timestep's shape.
    """
    scaled = timestep * timestep_scaling
    c_skip = sigma_data ** 2 / (scaled ** 2 + sigma_data ** 2)
    c_out = scaled / (scaled ** 2 + sigma_data ** 2) ** 0.5
    return c_skip, c_out


# --- flow matching (SD3, AuraFlow, Flux) --------------------------------------

def flow_shift(t: TensorOrNumber, shift: float) -> TensorOrNumber:
    """SD3 timestep shift (Esser et al. 2024, arXiv 2403.03206, eq. 23):

    ``sigma = shift * t / (1 + (shift - 1) * t)``; ``shift = 1`` is the identity.
    """
    if shift == 1.0:
        return t
    return shift * t / (1 + (shift - 1) * t)


def flow_unshift(sigma: TensorOrNumber, shift: float) -> TensorOrNumber:
    """Inverse of :func:`flow_shift`: ``t = sigma / (shift - (shift - 1) * sigma)``."""
    if shift == 1.0:
        return sigma
    return sigma / (shift - (shift - 1) * sigma)


def flow_table(shift: float, multiplier: float, timesteps: int = 1000) -> torch.Tensor:
    """Ascending [timesteps] float32 table ``flow_shift(i / T)`` for i = 1..T.

    The timestep grid is built as ComfyUI does (``i / T * multiplier`` then divided by
    the multiplier) so the table matches it bit for bit.
    """
    grid = (torch.arange(1, timesteps + 1, 1) / timesteps) * multiplier
    return flow_shift(grid / multiplier, shift)


def flux_shift(t: TensorOrNumber, mu: float) -> TensorOrNumber:
    """Flux's resolution-dependent shift: ``sigma = e^mu / (e^mu + (1/t - 1))``.

    Equal to :func:`flow_shift` with ``shift = e^mu``.
    """
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1))


def flux_mu(image_tokens: float, base_shift: float, max_shift: float,
            min_tokens: float = 256.0, max_tokens: float = 4096.0) -> float:
    """The Flux shift ``mu`` for an image of ``image_tokens`` patches.

    Linear in the token count through (min_tokens, base_shift) and
    (max_tokens, max_shift), extrapolated outside that range.
    """
    slope = (max_shift - base_shift) / (max_tokens - min_tokens)
    return image_tokens * slope + (base_shift - slope * min_tokens)


def flux_table(mu: float, timesteps: int = 10000) -> torch.Tensor:
    """Ascending [timesteps] float32 table ``flux_shift(i / T, mu)`` for i = 1..T."""
    return flux_shift(torch.arange(1, timesteps + 1, 1) / timesteps, mu)


# --- continuous schedules (EDM, v-prediction, Stable Cascade) ------------------

def log_linear_table(sigma_min: float, sigma_max: float, n: int = 1000) -> torch.Tensor:
    """[n] float32 sigmas evenly spaced in log space from sigma_min to sigma_max."""
    return torch.linspace(math.log(sigma_min), math.log(sigma_max), n).exp()


def log_linear_percent_to_sigma(percent: float, sigma_min: float, sigma_max: float) -> float:
    """Sigma at ``percent`` of a log-linear schedule (0 -> sigma_max, 1 -> sigma_min)."""
    log_min = math.log(sigma_min)
    return math.exp((math.log(sigma_max) - log_min) * (1.0 - percent) + log_min)


def edm_timestep(sigma: torch.Tensor) -> torch.Tensor:
    """EDM's network conditioning ``c_noise = log(sigma) / 4`` (Karras et al. 2022)."""
    return 0.25 * sigma.log()


def edm_sigma(timestep: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`edm_timestep`."""
    return (timestep / 0.25).exp()


def angular_timestep(sigma: torch.Tensor) -> torch.Tensor:
    """Continuous v-prediction time ``t = 2/pi * atan(sigma)`` in [0, 1)."""
    return sigma.atan() / math.pi * 2


def angular_sigma(timestep: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`angular_timestep`: ``sigma = tan(t * pi / 2)``."""
    return (timestep * math.pi / 2).tan()


def rflow_timestep(sigma: torch.Tensor) -> torch.Tensor:
    """Cosmos rectified-flow time ``t = sigma / (sigma + 1)``."""
    return sigma / (sigma + 1)


def rflow_sigma(timestep: torch.Tensor, sigma_max: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rflow_timestep`, saturating at ``sigma_max``."""
    limit = sigma_max / (sigma_max + 1)
    return torch.where(timestep >= limit, sigma_max, timestep / (1 - timestep))


def cascade_sigma(t: torch.Tensor, shift: float, cosine_s: float = 8e-3) -> torch.Tensor:
    """Stable Cascade's cosine schedule with a log-SNR shift (Würstchen, arXiv 2306.00637).

    ``abar(t) = cos((t + s) / (1 + s) * pi/2)^2 / cos(s / (1 + s) * pi/2)^2``; a shift
    adds ``-2 log(shift)`` to the log-SNR. ``abar`` is clamped to [1e-4, 0.9999].
    t in [0, 1] (any shape, float32) -> sigma of the same shape.
    """
    s = torch.tensor(cosine_s)
    init = torch.cos(s / (1 + s) * torch.pi * 0.5) ** 2
    alpha_bar = torch.cos((t + s) / (1 + s) * torch.pi * 0.5) ** 2 / init
    if shift != 1.0:
        log_snr = (alpha_bar / (1 - alpha_bar)).log() + 2 * torch.log(1.0 / torch.tensor(shift))
        alpha_bar = log_snr.sigmoid()
    alpha_bar = alpha_bar.clamp(0.0001, 0.9999)
    return ((1 - alpha_bar) / alpha_bar) ** 0.5


def cascade_timestep(sigma: torch.Tensor, cosine_s: float = 8e-3) -> torch.Tensor:
    """Inverse of the unshifted :func:`cascade_sigma`, as Stable Cascade conditions on it."""
    s = torch.tensor(cosine_s, device=sigma.device)
    init = torch.cos(s / (1 + s) * torch.pi * 0.5) ** 2
    alpha_bar = (1 / (sigma * sigma + 1)).clamp(0, 1.0)
    return ((alpha_bar * init) ** 0.5).acos() / (torch.pi * 0.5) * (1 + s) - s


def cascade_table(shift: float, timesteps: int = 10000, cosine_s: float = 8e-3) -> torch.Tensor:
    """Ascending [timesteps] float32 table ``cascade_sigma(i / T)`` for i = 1..T."""
    t = (torch.arange(1, timesteps + 1, dtype=torch.float64) / timesteps).to(torch.float32)
    return cascade_sigma(t, shift, cosine_s).to(torch.float32)
