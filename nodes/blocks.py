"""UNet block nodes: FreeU and FreeU_V2."""

from __future__ import annotations

from ..patches import blocks
from ._common import WindowPatchNode, category, float_input


def freeu_factors(b1: float, b2: float, s1: float, s2: float):
    """FreeU's four factor inputs with their defaults (FreeU and FreeU V2 differ only in them)."""
    def factor(default, what, stage):
        return float_input(default, 0.0, 10.0, 0.01, (
            f"{what} at the {stage} stage. 1 leaves it unchanged. The paper's SD1.5 values: b1 1.5, b2 1.6, s1 0.9, "
            "s2 0.2; SDXL: b1 1.3, b2 1.4, s1 0.9, s2 0.2."))
    return {
        "b1": factor(b1, "Backbone factor", "deepest (4x width)"),
        "b2": factor(b2, "Backbone factor", "second deepest (2x width)"),
        "s1": factor(s1, "Skip low-frequency factor", "deepest (4x width)"),
        "s2": factor(s2, "Skip low-frequency factor", "second deepest (2x width)"),
    }


class FreeU(WindowPatchNode):
    NODE_ID = "PatchLab_FreeU"
    DISPLAY_NAME = "FreeU (PatchLab)"
    DESCRIPTION = (
        "FreeU (Si et al. 2024, arXiv 2309.11497): in the two deepest decoder stages of a UNet, strengthens half "
        "of the backbone channels by b and damps the low frequencies of the skip connections by s, for more "
        "coherent structure at no extra cost. UNet models only (SD1.x, SD2.x, SDXL): on a DiT (Flux, SD3) the "
        "node stops with a clear message instead of ComfyUI's KeyError."
    )
    CATEGORY = category("unet")
    WHAT = "FreeU"
    VERSION = 1
    OPTIONS = freeu_factors(b1=1.1, b2=1.2, s1=0.9, s2=0.2)

    def patch(self, model, b1, b2, s1, s2, start_percent, end_percent):
        window = self.window(model, start_percent, end_percent)
        return (blocks.with_freeu(model, self.NODE_ID, b1, b2, s1, s2, self.VERSION, window),)


class FreeU_V2(FreeU):
    NODE_ID = "PatchLab_FreeU_V2"
    DISPLAY_NAME = "FreeU V2 (PatchLab)"
    DESCRIPTION = (
        "FreeU v2: like FreeU, but the backbone factor follows the feature map's normalised channel mean, so "
        "strong structure is boosted more than flat areas. A flat map gets the plain factor b instead of "
        "ComfyUI's division by zero. UNet models only (SD1.x, SD2.x, SDXL); a DiT gets a clear message."
    )
    VERSION = 2
    OPTIONS = freeu_factors(b1=1.3, b2=1.4, s1=0.9, s2=0.2)


NODES = [FreeU, FreeU_V2]
