"""Attention-guidance nodes: Self-Attention, Perturbed-Attention, Smoothed Energy and Skip-Layer Guidance."""

from __future__ import annotations

from ..kernels.attention import INFINITE_BLUR
from ..patches import attention_guidance as ag
from ._common import (
    MODEL_INPUT,
    WindowPatchNode,
    category,
    check_window,
    first_error,
    float_input,
    int_input,
    percent_input,
)

BLOCK_SYNTAX = ("Comma-separated UNet blocks: stage[.block[.transformer]] with stage input, middle or output, e.g. "
                "'middle', 'input.4', 'output.1.0', or 'all'.")
DIT_BLOCKS = ("Comma-separated blocks. UNets: stage[.block[.transformer]] with stage input, middle or output "
              "('middle', 'input.4', 'output.1.0'); Flux, Flux.2, Chroma, HunyuanVideo: 'double.7', 'single.0-5'; "
              "SD3/SD3.5: 'joint.10'; Qwen-Image, Wan: 'double.24'; Z-Image, Lumina 2: 'single.12'; 'all'; 'auto' = "
              "the family's recommended blocks (UNet: middle; Flux, HunyuanVideo: double.7-9; SD3: joint.7-9; "
              "starting points of ours, at the same relative depth: Qwen-Image double.22-28, Wan 1.3B/14B "
              "double.11-14/14-18, Z-Image single.11-14; the same relative depth in shallower models).")


def scale_input(source: str, default: float = 3.0, low: float = 0.0, high: float = 100.0, step: float = 0.01):
    """The guidance strength input; ``source`` ends its tooltip with the values the paper (or we) used."""
    return float_input(default, low, high, step, f"Strength of the guidance. 0 disables it; {source}")


def blocks_input(what: str, note: str):
    """The blocks input ('auto' by default): what the blocks are for, their syntax (DIT_BLOCKS), then ``note``."""
    return ("STRING", {"default": "auto", "tooltip": f"{what} {DIT_BLOCKS} {note}"})


class _AttentionGuidanceNode(WindowPatchNode):
    """What the attention-guidance nodes share: the blocks input, its check, and the patch call."""

    CATEGORY = category("guidance")
    BLOCK_INPUT = "blocks"
    DIT = True
    UNET_AUTO = None  # the UNet keys 'auto' stands for (None: the middle block)
    DIT_AUTO = None  # the DiT keys (None: ag.auto_blocks)

    @classmethod
    def VALIDATE_INPUTS(cls, start_percent=None, end_percent=None, **blocks):
        text = blocks.get(cls.BLOCK_INPUT)
        syntax = True
        if text is not None:
            try:
                ag.parse_blocks(text)
            except ValueError as error:
                syntax = str(error)
        return first_error(check_window(cls, start_percent, end_percent), syntax)

    def _patch(self, model, text, start_percent, end_percent, **spec):
        blocks = ag.resolve_blocks(model, text, self.NODE_ID, dit=self.DIT, unet_auto=self.UNET_AUTO,
                                   dit_auto=self.DIT_AUTO)
        window = self.window(model, start_percent, end_percent)
        return (ag.with_guidance(model, ag.GuidanceSpec(blocks=blocks, window=window, **spec)),)


class SelfAttentionGuidance(_AttentionGuidanceNode):
    NODE_ID = "PatchLab_SelfAttentionGuidance"
    DISPLAY_NAME = "Self-Attention Guidance (PatchLab)"
    DESCRIPTION = (
        "Self-Attention Guidance (Hong et al. 2023, arXiv 2210.00939): finds the regions the model attends to most "
        "in the negative prediction, blurs them, runs the model on that degraded input and guides away from its "
        "prediction, which sharpens uncertain areas. Unlike ComfyUI's SAG it keeps the attention of every model "
        "call and chunk (batches and split cond/uncond work), stores only a per-token mask, evaluates its extra "
        "pass as negative, and composes with PAG/SEG. UNet models (SD1.x, SD2.x, SDXL). Lower the CFG a little."
    )
    WHAT = "SAG"
    BLOCK_INPUT = "block"
    DIT = False
    OPTIONS = {
        "scale": scale_input("the paper uses 0.1-1 (0.5-0.75 common).", default=0.5, low=-2.0, high=5.0),
        "blur_sigma": float_input(2.0, 0.0, 10.0, 0.1, (
            "Std of the Gaussian blur of the attended regions (9-tap kernel, as SAG). 0 means no blur (and no "
            "effect).")),
        "threshold": float_input(1.0, 0.0, 10.0, 0.01, (
            "A region is blurred when the attention it receives exceeds this; 1 is the average (ComfyUI's fixed "
            "value). Lower blurs more of the image.")),
        "block": ("STRING", {
            "default": "middle.0.0",
            "tooltip": "Where to read the self-attention (as ComfyUI: the middle block's first transformer). "
                       + BLOCK_SYNTAX + " Several transformers: their attention is averaged.",
        }),
    }

    def patch(self, model, scale, blur_sigma, threshold, block, start_percent, end_percent):
        return self._patch(model, block, start_percent, end_percent, kind="sag", scale=scale,
                           blur_sigma=blur_sigma, threshold=threshold)


class PerturbedAttentionGuidance(_AttentionGuidanceNode):
    NODE_ID = "PatchLab_PerturbedAttentionGuidance"
    DISPLAY_NAME = "Perturbed-Attention Guidance (PatchLab)"
    DESCRIPTION = (
        "Perturbed-Attention Guidance (Ahn et al. 2024, arXiv 2403.17377): runs the model with the self-attention "
        "of chosen blocks replaced by the identity and guides away from that degraded prediction, which improves "
        "structure without a negative prompt. Any input, middle or output blocks (ComfyUI's node: middle only), a "
        "schedule window and an optional rescale; composes with SAG and shares its extra model call with SEG and "
        "SLG. UNets (SD1.x, SD2.x, SDXL) and DiTs (Flux, Flux.2, Chroma, SD3/SD3.5, Qwen-Image, HunyuanVideo, "
        "Z-Image, Lumina 2: each image token attends to itself and the text only; Wan 2.1/2.2: self-attention "
        "becomes the identity, cross-attention to the text stays). Works at CFG 1 (guidance-distilled Flux). "
        "Rule of thumb on UNets: PAG scale + CFG = your usual CFG."
    )
    WHAT = "PAG"
    OPTIONS = {
        "scale": scale_input("the paper uses 2-5 (3 typical)."),
        "blocks": blocks_input("Attention to perturb.", "The paper perturbs the UNet middle block."),
        "rescale": float_input(0.0, 0.0, 1.0, 0.01, (
            "Pull the guided result's std back toward the positive prediction's (as CFG rescale), against "
            "over-saturation at high scales. 0 disables it; 0.5-0.7 typical.")),
    }

    def patch(self, model, scale, blocks, rescale, start_percent, end_percent):
        return self._patch(model, blocks, start_percent, end_percent, kind="pag", scale=scale, rescale=rescale)


class SmoothedEnergyGuidance(_AttentionGuidanceNode):
    NODE_ID = "PatchLab_SmoothedEnergyGuidance"
    DISPLAY_NAME = "Smoothed Energy Guidance (PatchLab)"
    DESCRIPTION = (
        "Smoothed Energy Guidance (Hong 2024, arXiv 2408.00760): runs the model with the queries of chosen "
        "self-attention blocks blurred by a Gaussian on the token grid (a smoothed attention energy landscape) "
        "and guides away from that prediction, improving quality without a negative prompt and with fewer side "
        "effects than PAG at high scales. blur_sigma 9999 or more is the 'infinite blur' limit (uniform "
        "attention). Shares its extra model call with PAG and SLG. UNets (SD1.x, SD2.x, SDXL) and DiTs (Flux, "
        "Flux.2, Chroma, SD3/SD3.5, Qwen-Image, Z-Image, Lumina 2: the image-token queries are blurred on the "
        "image's patch grid, text tokens untouched; Wan 2.1/2.2, HunyuanVideo: frame by frame)."
    )
    WHAT = "SEG"
    OPTIONS = {
        "scale": scale_input("the paper uses 3."),
        "blur_sigma": float_input(10.0, 0.0, INFINITE_BLUR, 0.01, (
            f"Std (in tokens) of the query blur. 0 means no blur (no effect); the paper uses 10 for SDXL; "
            f"{INFINITE_BLUR:g} is infinite blur (every query the mean query).")),
        "blocks": blocks_input("Attention to smooth.", "The paper smooths the UNet middle block."),
    }

    def patch(self, model, scale, blur_sigma, blocks, start_percent, end_percent):
        return self._patch(model, blocks, start_percent, end_percent, kind="seg", scale=scale,
                           blur_sigma=blur_sigma)


class SkipLayerGuidance(_AttentionGuidanceNode):
    NODE_ID = "PatchLab_SkipLayerGuidance"
    DISPLAY_NAME = "Skip-Layer Guidance (PatchLab)"
    DESCRIPTION = (
        "Skip-Layer Guidance (Stability AI's SD3.5 technique, after PAG, arXiv 2403.17377): runs the model with "
        "chosen blocks skipped and guides away from that prediction, which sharpens anatomy and structure. "
        "The same result as ComfyUI's SkipLayerGuidanceDiT / SkipLayerGuidanceSD3 on one image, with rescaling "
        "statistics per image, no host sync per step, and its extra pass batched with PAG and SEG in one model "
        "call. DiTs (Flux, Flux.2, Chroma, SD3/SD3.5, Qwen-Image, Wan 2.1/2.2, HunyuanVideo, Z-Image, Lumina 2: the "
        "block's output is its input) and UNets "
        "(the chosen transformers' self- and cross-attention are removed). Use a short window early in the schedule."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": MODEL_INPUT,
            "scale": scale_input("3 is the SD3.5 recommendation (2-4 usual).", high=10.0, step=0.1),
            "blocks": blocks_input("Blocks to skip.", "SD3.5 Medium's recommended layers are joint.7-9."),
            "start_percent": percent_input(0.01, "Where in the schedule SLG starts: 0 is the first step, 1 the last. "
                                                 "0.01 (ComfyUI's default) skips the very first step."),
            "end_percent": percent_input(0.15, "Where SLG stops (not below start_percent); 0.15 by default, up to "
                                               "0.2-0.3 for more effect. Outside the window the result is exactly "
                                               "what it would be without it."),
            "rescaling_scale": float_input(0.0, 0.0, 10.0, 0.01, (
                "Pull the guided result's std toward the positive prediction's, per image (ComfyUI pools the whole "
                "batch). 0 disables it; 0-1 blends, as CFG rescale.")),
        }}

    def patch(self, model, scale, blocks, start_percent, end_percent, rescaling_scale):
        return self._patch(model, blocks, start_percent, end_percent, kind="slg", scale=scale,
                           rescale=rescaling_scale)


class TokenPerturbationGuidance(_AttentionGuidanceNode):
    NODE_ID = "PatchLab_TokenPerturbationGuidance"
    DISPLAY_NAME = "Token Perturbation Guidance (PatchLab)"
    DESCRIPTION = (
        "Token Perturbation Guidance (Rajabi et al. 2025, arXiv 2506.10036, NeurIPS 2025): runs the model with the "
        "tokens entering chosen blocks shuffled (a norm-preserving perturbation: the same token vectors in another "
        "order) and guides away from that prediction; it improves quality without a negative prompt and works at "
        "CFG 1. The shuffles come from the node's seed (never the global RNG), so a run repeats exactly. Shares "
        "its extra model call with PAG, SEG and SLG. UNets (SD1.x, SD2.x, SDXL: the transformer blocks' input "
        "stays shuffled, as in the paper's code) and the DiTs PAG addresses (image tokens only; each block's "
        "update goes back to its own token where positions are rotary, as Flux, Wan or Z-Image; see the help "
        "page)."
    )
    WHAT = "TPG"
    OPTIONS = {
        "scale": scale_input("3 is the paper's SDXL value (its range is similar to PAG's, 2-5); on DiTs 1-3 (a "
                             "starting point of ours)."),
        "blocks": blocks_input("Blocks whose input tokens are shuffled.", (
            "For TPG, 'auto' is not PAG's: on UNets the last two input blocks with transformers (SDXL input.7, "
            "input.8, the paper's SDXL layers; SD1.5 input.7, input.8); on DiTs the blocks from a third to half "
            "of the depth, all stacks counted in order (Flux single.0-9, Wan 2.1 double.10-14, SD3.5 Large "
            "joint.12-18; starting points of ours). Early DiT blocks are too strong.")),
        "seed": int_input(0, 0, 0xFFFFFFFF, (
            "Seed of the shuffles (each block and step gets its own permutation from it). The same seed gives "
            "the same result.")),
    }

    UNET_AUTO = staticmethod(ag.tpg_auto_keys)
    DIT_AUTO = staticmethod(ag.tpg_auto_blocks)

    def patch(self, model, scale, blocks, seed, start_percent, end_percent):
        return self._patch(model, blocks, start_percent, end_percent, kind="tpg", scale=scale, seed=seed)


NODES = [SelfAttentionGuidance, PerturbedAttentionGuidance, SmoothedEnergyGuidance, SkipLayerGuidance,
         TokenPerturbationGuidance]
