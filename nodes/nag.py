"""Normalized Attention Guidance: negative prompts that work at CFG 1."""

from __future__ import annotations

from ..patches import nag
from ._common import WindowPatchNode, category, float_input


class NormalizedAttentionGuidance(WindowPatchNode):
    NODE_ID = nag.NODE_ID
    DISPLAY_NAME = "Normalized Attention Guidance (PatchLab)"
    CATEGORY = category("guidance")
    DESCRIPTION = (
        "Normalized Attention Guidance (Chen et al. 2025, arXiv 2505.21179): makes the negative prompt work where "
        "CFG is off (CFG 1: guidance-distilled and few-step models, Wan with speed LoRAs). In every attention that "
        "reads the text, the same queries also attend to the negative prompt; the result is pushed away from it "
        "(Z = s*Z+ - (s-1)*Z-), its L1 norm per token capped at tau times the positive's and blended by alpha. "
        "The negative is the sampler's own negative conditioning (also at CFG 1) or the optional 'negative' "
        "input. It costs one more cross-attention per layer, never a second model pass (ComfyUI's NAGuidance "
        "runs the whole negative pass). Works with the plain KSampler and every sampler node; at CFG > 1 it "
        "guides the positive branch. UNets (SD1.x, SD2.x, SDXL), Wan 2.1/2.2 (text- and image-to-video), and "
        "Flux, Flux.2, Chroma, HunyuanVideo, SD3/SD3.5, Qwen-Image, Z-Image, Lumina 2 (a text stream for the "
        "negative beside the one image stream)."
    )

    WHAT = "NAG"
    OPTIONS = {
        "scale": float_input(5.0, 1.0, 50.0, 0.1, (
            "How far to push away from the negative prompt. 1 disables it. The paper's demos: Flux schnell/dev 5, "
            "SD3.5 Turbo 5, SDXL DMD2 3, Wan 2.1 9 (at CFG 5) to 11 (CausVid, CFG 1); SD1.5 3, Qwen-Image, "
            "Z-Image and HunyuanVideo 5 (starting points of ours).")),
        "tau": float_input(2.5, 1.0, 10.0, 0.05, (
            "Cap on each token's L1 norm relative to the positive attention output: higher lets the guidance go "
            "further. The reference code uses 2.5 for every family.")),
        "alpha": float_input(0.25, 0.0, 1.0, 0.01, (
            "Blend of the guided features into the positive ones. 0 disables it; the reference code uses 0.25 "
            "(Flux, Wan), up to 0.5 for UNets.")),
    }
    OPTIONAL_INPUTS = {"negative": ("CONDITIONING", {
        "tooltip": "The prompt to guide away from. Unconnected: the sampler's negative conditioning (its first entry). "
                   "Connect one for samplers without a negative (BasicGuider) or to use a different negative for NAG "
                   "than for CFG.",
    })}

    def patch(self, model, scale, tau, alpha, start_percent, end_percent, negative=None):
        if negative is not None and (not negative or negative[0][0] is None):
            raise ValueError(f"{self.NODE_ID}: the 'negative' input holds no prompt; connect a CLIPTextEncode "
                             "output or leave it unconnected to use the sampler's negative")
        window = self.window(model, start_percent, end_percent)
        spec = nag.NagSpec(scale=scale, tau=tau, alpha=alpha, window=window, negative=negative)
        return (nag.with_nag(model, spec),)


NODES = [NormalizedAttentionGuidance]
