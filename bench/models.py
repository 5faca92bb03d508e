"""Real-size benchmark models: ComfyUI's own architectures at their released widths, random weights.

Speed figures must come from the architecture a user runs: on a toy UNet self-attention
is a far larger share of the work than in a real checkpoint. Each builder here writes
out the unet config ComfyUI detects from the released checkpoint (the dicts of
``comfy.model_detection``), lets ComfyUI pick the model class for it
(``model_config_from_unet_config``: SD15, SDXL, Flux) and fills the weights with
seeded noise (fan-in scaled, so activations stay O(1) through the depth). Nothing is
downloaded.

=============  ==========================================================  ==========
name           architecture                                                parameters
=============  ==========================================================  ==========
``sd15``       SD1.5 UNet (320 channels, 768-d context)                    860 M
``sdxl``       SDXL base UNet (320 channels, 2048-d context, 2816-d ADM)   2.57 B
``flux``       Flux.1-dev width (hidden 3072, 24 heads, MLP ratio 4),      1.6 B at
               depth reduced to ``FLUX_DEPTH`` double / ``FLUX_SINGLE``    2 / 4
               single blocks (Flux.1 has 19 / 38)                          blocks
``wan``        Wan 2.1 T2V 1.3B width (dim 1536, 12 heads, FFN 8960,       0.27 B at
               4096-d T5 context), depth reduced to ``WAN_DEPTH`` blocks   4 blocks
               (the 1.3B model has 30)
=============  ==========================================================  ==========

The Flux-width model's cost per block is the real one; a whole Flux.1 evaluation costs
about (19 + 38 / 2) / (FLUX_DEPTH + FLUX_SINGLE / 2) times more (a single block is about
half a double block). Likewise a whole Wan 2.1 1.3B evaluation costs about 30 / WAN_DEPTH
times the Wan-width model's blocks (plus the same embeddings and head).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

FLUX_DEPTH = 2
FLUX_SINGLE = 4
WAN_DEPTH = 4

_UNET_COMMON = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
    "legacy": False, "in_channels": 4, "model_channels": 320, "use_temporal_attention": False,
    "use_temporal_resblock": False,
}

CONFIGS: Dict[str, Dict] = {
    "sd15": {**_UNET_COMMON, "adm_in_channels": None, "num_res_blocks": [2, 2, 2, 2],
             "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4],
             "transformer_depth_middle": 1, "use_linear_in_transformer": False, "context_dim": 768,
             "num_heads": 8, "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0]},
    "sdxl": {**_UNET_COMMON, "num_classes": "sequential", "adm_in_channels": 2816, "num_res_blocks": [2, 2, 2],
             "transformer_depth": [0, 0, 2, 2, 10, 10], "channel_mult": [1, 2, 4], "transformer_depth_middle": 10,
             "use_linear_in_transformer": True, "context_dim": 2048, "num_head_channels": 64,
             "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10]},
    "flux": {"image_model": "flux", "guidance_embed": True, "in_channels": 16, "out_channels": 16,
             "vec_in_dim": 768, "context_in_dim": 4096, "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24,
             "depth": FLUX_DEPTH, "depth_single_blocks": FLUX_SINGLE, "axes_dim": [16, 56, 56], "theta": 10000,
             "patch_size": 2, "qkv_bias": True},
    "wan": {"image_model": "wan2.1", "model_type": "t2v", "patch_size": (1, 2, 2), "in_dim": 16, "out_dim": 16,
            "dim": 1536, "ffn_dim": 8960, "freq_dim": 256, "text_dim": 4096, "num_heads": 12,
            "num_layers": WAN_DEPTH, "window_size": (-1, -1), "qk_norm": True, "cross_attn_norm": True, "eps": 1e-6},
}


@dataclass(frozen=True)
class Inputs:
    """What one model needs besides the latent: text tokens and their width, pooled/ADM sizes."""

    latent_channels: int
    context_tokens: int
    context_dim: int
    pooled_dim: Optional[int] = None  # CLIP-L/G pooled output the model's extra conds are built from
    guidance: Optional[float] = None


INPUTS = {
    "sd15": Inputs(latent_channels=4, context_tokens=77, context_dim=768),
    "sdxl": Inputs(latent_channels=4, context_tokens=77, context_dim=2048, pooled_dim=1280),
    "flux": Inputs(latent_channels=16, context_tokens=256, context_dim=4096, pooled_dim=768, guidance=3.5),
    "wan": Inputs(latent_channels=16, context_tokens=512, context_dim=4096),
}


def unet_config(name: str) -> Dict:
    if name not in CONFIGS:
        raise ValueError(f"unknown bench model {name!r}; expected one of {', '.join(CONFIGS)}")
    from devtools.testkit.tiny_models import complete_unet_config

    return complete_unet_config(CONFIGS[name])  # fields newer ComfyUI releases added, at their real values


def build(name: str, dtype=None, seed: int = 0):
    """A ``ModelPatcher`` around the real-size ``name`` architecture with seeded random weights.

    ``dtype`` defaults to float32 on the CPU and float16 on CUDA. ComfyUI chooses the
    model class from the config, as it does for a loaded checkpoint.
    """
    import comfy.model_detection
    import comfy.model_management
    import comfy.model_patcher
    import torch

    from devtools.testkit import tiny_models

    device = comfy.model_management.get_torch_device()
    if dtype is None:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    config = comfy.model_detection.model_config_from_unet_config(unet_config(name))
    if config is None:
        raise RuntimeError(f"ComfyUI did not recognise the {name} config; its model detection changed")
    config.set_inference_dtype(dtype, None)
    model = config.get_model({})
    tiny_models.randomize(model, seed)
    model.to(dtype)
    return comfy.model_patcher.ModelPatcher(model, load_device=device,
                                            offload_device=comfy.model_management.unet_offload_device())


def parameters(patcher) -> int:
    return sum(p.numel() for p in patcher.model.diffusion_model.parameters())


def conditioning(name: str, seed: int, batch: int = 1):
    """A CONDITIONING list of seeded embeddings with the shapes the real text encoders give."""
    import torch

    spec = INPUTS[name]
    generator = torch.Generator().manual_seed(seed)
    extras = {}
    context = torch.randn(batch, spec.context_tokens, spec.context_dim, generator=generator)
    if spec.pooled_dim is not None:
        extras["pooled_output"] = torch.randn(batch, spec.pooled_dim, generator=generator)
    if spec.guidance is not None:
        extras["guidance"] = spec.guidance
    return [[context, extras]]


def empty_latent(name: str, pixels: int, batch: int = 1):
    """Zeros for a ``pixels`` x ``pixels`` image (8x VAE)."""
    import torch

    return torch.zeros(batch, INPUTS[name].latent_channels, pixels // 8, pixels // 8)


def empty_video_latent(name: str, width: int, height: int, frames: int, batch: int = 1):
    """Zeros for a ``frames``-frame video (Wan 2.1's VAE: 8x in space, 4x in time, the first frame alone)."""
    import torch

    return torch.zeros(batch, INPUTS[name].latent_channels, (frames - 1) // 4 + 1, height // 8, width // 8)
