"""Test-only ComfyUI nodes: a tiny checkpoint, text encoder and VAE for workflows.

They stand in for CheckpointLoaderSimple, CLIPTextEncode, VAEDecode and VAEEncode
so that real workflows run end to end without downloading weights. Not shipped in
the pack (see .comfyignore).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from . import tiny_models

CATEGORY = "PatchLab/testing"


class TinyClip:
    """What TinyCheckpoint returns as CLIP: turns text into seeded embeddings."""

    def __init__(self, layout_name: str):
        self.layout_name = layout_name

    def encode(self, text: str):
        return tiny_models.conditioning(self.layout_name, seed=tiny_models.text_seed(text))


class TinyVAE:
    """What TinyCheckpoint returns as VAE: a fixed linear map between latent channels and RGB."""

    def __init__(self, layout_name: str):
        spec = tiny_models.layout(layout_name)
        channels = spec.latent_channels
        self.factor = spec.vae_factor
        self.to_rgb = torch.randn(channels, 3, generator=torch.Generator().manual_seed(channels)) / channels ** 0.5

    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        """[B, C, h, w] latent (or a [B, C, T, h, w] video latent: B*T frames) -> [B, f*h, f*w, 3] image in [0, 1].

        ``f`` is the family's VAE factor (8; 16 for Wan 2.2 and Flux.2)."""
        if samples.ndim == 5:
            samples = samples.movedim(2, 1).flatten(0, 1)
        rgb = torch.einsum("bchw,cr->bhwr", samples.float(), self.to_rgb)
        rgb = torch.sigmoid(rgb).permute(0, 3, 1, 2)
        return F.interpolate(rgb, scale_factor=self.factor, mode="nearest").permute(0, 2, 3, 1).contiguous()

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, H, W, 3] image -> [B, C, H/f, W/f] latent (a least-squares inverse of decode's map)."""
        x = pixels[..., :3].float().permute(0, 3, 1, 2)
        x = F.avg_pool2d(x, self.factor, ceil_mode=True).clamp(1e-4, 1 - 1e-4)
        logits = torch.logit(x)
        return torch.einsum("brhw,rc->bchw", logits, torch.linalg.pinv(self.to_rgb))


class TrainedClip:
    """CLIP of a trained reference model: the prompt's known words through its word table."""

    def __init__(self, trained):
        self.trained = trained

    def encode(self, text: str):
        return self.trained.encode(text)


class TrainedVAE:
    """VAE of a trained reference model: its exact RGB map, decoded pictures upscaled 8x (nearest); the video
    model's latent [B, 16, T, h, w] decodes to B*T pictures (clip-major) and pictures encode as one clip."""

    def __init__(self, trained):
        self.trained = trained

    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        return self.trained.decode(samples)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.trained.encode_pixels(pixels)


def _trained_names():
    from .shapes import models as shapes

    return shapes.NAMES


@functools.lru_cache(maxsize=8)
def _checkpoint(layout_name: str, seed: int):
    if layout_name in _trained_names():
        from .shapes import models as shapes

        trained = shapes.load(layout_name)
        return trained.model, TrainedClip(trained), TrainedVAE(trained)
    model = tiny_models.build_model(layout_name, seed=seed)
    return model, TinyClip(layout_name), TinyVAE(layout_name)


class TinyCheckpoint:
    DESCRIPTION = ("A tiny model of a real layout (test only), with its text encoder and VAE: random weights, "
                   "or one of the trained reference models (sd15_shapes, flux_shapes, wan_shapes).")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "layout": (list(tiny_models.LAYOUTS) + list(_trained_names()),
                       {"tooltip": "Block layout (random weights): sd15, sdxl, flux, sd3 (MMDiT), lumina2 (NextDiT), "
                                   "qwen_image, wan21, wan22 (video, 48 channels), hunyuan_video, zimage, flux2, "
                                   "chroma; or a trained reference model: sd15_shapes (SD1.5-layout "
                                   "UNet) or flux_shapes (Flux-layout DiT), prompts like 'red circle'; "
                                   "wan_shapes (Wan 2.1 t2v layout, 128x128 px, length 13), prompts like "
                                   "'red circle moving left'."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1,
                             "tooltip": "Seed of the random weights (ignored by the trained models)."}),
        }}

    def load(self, layout, seed):
        return _checkpoint(layout, seed)


class TinyDiffusionModel:
    DESCRIPTION = ("A tiny diffusion model of a real layout, alone: random weights or a trained reference model "
                   "(test only; stands in for UNETLoader).")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "layout": (list(tiny_models.LAYOUTS) + list(_trained_names()),
                       {"tooltip": "Block layout (random weights) or trained reference model, as TinyCheckpoint's."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1,
                             "tooltip": "Seed of the random weights (two experts of one family: two seeds)."}),
        }}

    def load(self, layout, seed):
        return (_checkpoint(layout, seed)[0],)


class TinyTextEncoder:
    DESCRIPTION = ("The text encoder of a tiny layout or trained reference model, alone (test only; stands in for "
                   "CLIPLoader).")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("CLIP",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"layout": (list(tiny_models.LAYOUTS) + list(_trained_names()),
                                        {"tooltip": "The layout (or trained model) it encodes for."})}}

    def load(self, layout):
        return (_checkpoint(layout, 0)[1] if layout in _trained_names() else TinyClip(layout),)


class TinyVAELoader:
    DESCRIPTION = "The VAE of a tiny layout or trained reference model, alone (test only; stands in for VAELoader)."
    CATEGORY = CATEGORY
    RETURN_TYPES = ("VAE",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"layout": (list(tiny_models.LAYOUTS) + list(_trained_names()),
                                        {"tooltip": "The layout (or trained model) whose latent it maps."})}}

    def load(self, layout):
        return (_checkpoint(layout, 0)[2] if layout in _trained_names() else TinyVAE(layout),)


class TinyTextEncode:
    DESCRIPTION = "Seeded embeddings for a text (test only)."
    CATEGORY = CATEGORY
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "text": ("STRING", {"multiline": True, "dynamicPrompts": True, "tooltip": "Any text."}),
            "clip": ("CLIP", {"tooltip": "A TinyCheckpoint's CLIP."}),
        }}

    def encode(self, text, clip):
        return (clip.encode(text),)


class TinyVAEDecode:
    DESCRIPTION = "Latent to image with a fixed linear map (test only)."
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "decode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT", {"tooltip": "Latent."}),
                             "vae": ("VAE", {"tooltip": "A TinyCheckpoint's VAE."})}}

    def decode(self, samples, vae):
        return (vae.decode(samples["samples"]),)


class TinyVAEEncode:
    DESCRIPTION = "Image to latent with a fixed linear map (test only)."
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"pixels": ("IMAGE", {"tooltip": "Image."}),
                             "vae": ("VAE", {"tooltip": "A TinyCheckpoint's VAE."})}}

    def encode(self, pixels, vae):
        return ({"samples": vae.encode(pixels)},)


@functools.lru_cache(maxsize=2)
def _controlnet(layout_name: str):
    return tiny_models.build_controlnet(layout_name)


class TinyControlNet:
    DESCRIPTION = "A tiny random-weight SDXL-layout ControlNet (test only)."
    CATEGORY = CATEGORY
    RETURN_TYPES = ("CONTROL_NET",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"control_net_name": ("STRING", {"default": "", "tooltip": "Ignored: any name."})}}

    def load(self, control_net_name):
        return (_controlnet("sdxl"),)


NODE_CLASS_MAPPINGS = {
    "PatchLabTest_TinyControlNet": TinyControlNet,
    "PatchLabTest_TinyCheckpoint": TinyCheckpoint,
    "PatchLabTest_TinyDiffusionModel": TinyDiffusionModel,
    "PatchLabTest_TinyTextEncoder": TinyTextEncoder,
    "PatchLabTest_TinyVAELoader": TinyVAELoader,
    "PatchLabTest_TinyTextEncode": TinyTextEncode,
    "PatchLabTest_TinyVAEDecode": TinyVAEDecode,
    "PatchLabTest_TinyVAEEncode": TinyVAEEncode,
}
