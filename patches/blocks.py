"""UNet block patches: FreeU (Si et al. 2024, arXiv 2309.11497).

Hook: ``set_model_output_block_patch``; the function receives ``(h, hsp,
transformer_options)`` before each output block concatenates the backbone features
``h`` [B, C, H, W] with the skip features ``hsp`` and returns both. FreeU scales the
first half of the backbone channels by ``b`` and the low frequencies of the skip by
``s`` at the two deepest resolutions (channels = 4x and 2x the base width).
"""

from __future__ import annotations

import logging

import torch

from ..kernels import frequency
from .cfg import in_window
from .window import SigmaWindow

log = logging.getLogger(__name__)


def unet_base_channels(model, node_id: str) -> int:
    """The UNet's base width; a clear error for models without UNet output blocks."""
    diffusion_model = model.model.diffusion_model
    channels = model.model.model_config.unet_config.get("model_channels")
    if not hasattr(diffusion_model, "output_blocks") or not isinstance(channels, int):
        raise RuntimeError(
            f"{node_id} works on UNet models (SD1.x, SD2.x, SDXL and their fine-tunes); this model is "
            f"{type(model.model).__name__} with a {type(diffusion_model).__name__} network, which has no UNet "
            "output blocks to patch. Remove the node for this model."
        )
    return channels


def _skip_filter(hsp: torch.Tensor, s: float, cpu_fallback: set) -> torch.Tensor:
    if hsp.device not in cpu_fallback:
        try:
            return frequency.scale_frequencies(hsp, s, 1.0, 1)
        except RuntimeError:
            cpu_fallback.add(hsp.device)
            log.warning("torch.fft is not available on %s; FreeU filters the skip features on the CPU", hsp.device)
    return frequency.scale_frequencies(hsp.cpu(), s, 1.0, 1).to(hsp.device)


def freeu(base_channels: int, b1: float, b2: float, s1: float, s2: float, version: int,
          window: SigmaWindow):
    """The output-block patch; ``version`` 2 scales the backbone by its normalised channel mean (FreeU v2)."""
    scales = {base_channels * 4: (b1, s1), base_channels * 2: (b2, s2)}
    cpu_fallback: set = set()

    def output_block_patch(h, hsp, transformer_options):
        scale = scales.get(int(h.shape[1]))
        if scale is None:
            return h, hsp
        b, s = scale
        half = h.shape[1] // 2
        factor = frequency.freeu_v2_backbone_factor(h, b) if version == 2 else b
        new_h = torch.cat([h[:, :half] * factor, h[:, half:]], dim=1)
        new_hsp = _skip_filter(hsp, s, cpu_fallback)
        sigma = transformer_options.get("sigmas")
        if sigma is None or window.is_always:
            return new_h, new_hsp
        return in_window(window, sigma, new_h, h), in_window(window, sigma, new_hsp, hsp)
    return output_block_patch


def with_freeu(model, node_id: str, b1: float, b2: float, s1: float, s2: float, version: int, window: SigmaWindow):
    patch = freeu(unet_base_channels(model, node_id), b1, b2, s1, s2, version, window)
    patched = model.clone()
    patched.set_model_output_block_patch(patch)
    return patched
