"""Inpainting nodes: Differential Diffusion."""

from __future__ import annotations

from ..patches import inpaint
from ._common import MODEL_INPUT, ModelPatchNode, category, float_input


class DifferentialDiffusion(ModelPatchNode):
    NODE_ID = "PatchLab_DifferentialDiffusion"
    DISPLAY_NAME = "Differential Diffusion (PatchLab)"
    DESCRIPTION = (
        "Differential Diffusion (Levin & Fried 2023, arXiv 2306.00950): reads a soft inpainting mask as 'how much "
        "to change each pixel': a pixel joins the inpainted area once sampling has progressed past its mask "
        "value, so borders blend instead of seaming. Needs a latent with a noise mask (Set Latent Noise Mask, "
        "VAE Encode for Inpainting, InpaintModelConditioning). A mask function set earlier in the chain is kept "
        "and runs first (ComfyUI's node replaces it)."
    )
    CATEGORY = category("inpaint")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": MODEL_INPUT,
            "strength": float_input(1.0, 0.0, 1.0, 0.01, (
                "Blend between the progressive mask (1, Differential Diffusion) and the mask as given (0 disables "
                "the effect; ComfyUI's node treats 0 as full strength).")),
        }}

    def patch(self, model, strength):
        return (inpaint.with_differential_diffusion(model, strength),)


NODES = [DifferentialDiffusion]
