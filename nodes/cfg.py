"""CFG-space guidance nodes: RescaleCFG, RenormCFG, CFGNorm, APG, TCFG, Mahiro, CFG-Zero*, FreSca."""

from __future__ import annotations

from ..patches import cfg, guidance_skip
from ._common import HIDDEN_NODE_ID, WindowPatchNode, category, combo_input, float_input, int_input

CATEGORY = category("guidance")
MODES = ("paper", "comfyui")  # APG's and CFG-Zero*'s: the paper's rule or ComfyUI's node


class _GuidanceNode(WindowPatchNode):
    """What the CFG-space nodes share: their category (and, from WindowPatchNode, the window and its check)."""

    CATEGORY = CATEGORY
    WHAT = "the guidance change"


class RescaleCFG(_GuidanceNode):
    NODE_ID = "PatchLab_RescaleCFG"
    DISPLAY_NAME = "RescaleCFG (PatchLab)"
    DESCRIPTION = (
        "Rescales the CFG result toward the standard deviation of the positive prediction (Lin et al. 2023, "
        "arXiv 2305.08891), which tames the over-saturation of high CFG, especially on v-prediction and "
        "zero-terminal-SNR models. Works in each model's own output space: v-prediction for SD-style models "
        "(identical to ComfyUI's RescaleCFG there) and the velocity for flow models (SD3, Flux, AuraFlow), where "
        "ComfyUI's conversion assumes the wrong family. Runs as a post-CFG step, so it stacks with other "
        "guidance nodes instead of taking the single CFG-function slot."
    )
    WHAT = "the rescale"
    OPTIONS = {"multiplier": float_input(0.7, 0.0, 1.0, 0.01, (
        "Share of the rescaled result in the mix (phi in the paper). 0 disables it; the paper uses 0.7; 1 uses "
        "only the rescaled result."))}

    def patch(self, model, multiplier, start_percent, end_percent):
        return (cfg.with_post_cfg(model, cfg.rescale_cfg(multiplier, self.window(model, start_percent, end_percent))),)


class RenormCFG(_GuidanceNode):
    NODE_ID = "PatchLab_RenormCFG"
    DISPLAY_NAME = "RenormCFG (PatchLab)"
    DESCRIPTION = (
        "CFG renormalisation and truncation from Lumina-Image 2.0 (arXiv 2503.21758): caps the norm of the "
        "guided prediction at renorm_cfg times the positive prediction's norm, and turns guidance off where it "
        "is truncated: while sigma is at or above cfg_trunc (ComfyUI's rule, the default) or, with truncate "
        "'paper', after cfg_trunc percent of the schedule (the paper's CFG truncation of the late steps). At "
        "truncated steps the negative prompt is left out of the model call, so they cost one model pass instead "
        "of two (ComfyUI's node still evaluates it). Per sample, so batches work (ComfyUI's RenormCFG fails at "
        "batch > 1). Runs as a post-CFG step and stacks with other guidance nodes."
    )
    WHAT = "renormalisation"
    TRUNCATE_MODES = ("comfyui", "paper")
    OPTIONS = {
        "cfg_trunc": float_input(100.0, 0.0, 100.0, 0.01, (
            "Where guidance is truncated (off, the positive prediction used, no negative pass). truncate "
            "comfyui: while sigma >= this value; SD1.5/SDXL sigmas lie in 0.03-14.6 and flow models' in 0-1, so "
            "the default 100 never truncates. truncate paper: after this percent of the schedule, e.g. 70 "
            "truncates the last 30 %; 100 never truncates.")),
        "renorm_cfg": float_input(1.0, 0.0, 100.0, 0.01, (
            "Cap on ||guided|| as a multiple of ||positive||. 0 disables the cap; below 1 washes the image out "
            "quickly; larger values renormalise less often.")),
    }
    OPTIONAL_INPUTS = {"truncate": combo_input(TRUNCATE_MODES, "comfyui", (
        "Which end of the schedule cfg_trunc truncates. comfyui: the early, high-noise steps, where sigma >= cfg_trunc "
        "(ComfyUI's RenormCFG; cfg_trunc is a sigma). paper: the late, low-noise steps after cfg_trunc percent of the "
        "schedule (Lumina-Image 2.0's CFG-Trunc; cfg_trunc is a percent, 100 never truncates). Either way truncated "
        "steps skip the negative pass."))}
    HIDDEN_INPUTS = HIDDEN_NODE_ID

    @classmethod
    def VALIDATE_INPUTS(cls, start_percent=None, end_percent=None, truncate=None):
        if truncate is not None and truncate not in cls.TRUNCATE_MODES:
            return f"truncate is {truncate!r}; expected one of {', '.join(cls.TRUNCATE_MODES)}"
        return super().VALIDATE_INPUTS(start_percent=start_percent, end_percent=end_percent)

    def patch(self, model, cfg_trunc, renorm_cfg, start_percent, end_percent, truncate="comfyui", unique_id=None):
        channels = cfg.unet_in_channels(model, default=model.get_model_object("latent_format").latent_channels)
        window = self.window(model, start_percent, end_percent)
        truncation = guidance_skip.truncation(model, truncate, cfg_trunc)
        fn = cfg.renorm_cfg(truncation.mask, renorm_cfg, channels, window)
        patched = cfg.with_post_cfg(model, fn)
        if guidance_skip.can_truncate(model, truncation):
            patched = guidance_skip.with_rule(patched, guidance_skip.TruncationRule(self.NODE_ID, truncation, window,
                                                                                   unique_id))
        return (patched,)


class CFGNorm(_GuidanceNode):
    NODE_ID = "PatchLab_CFGNorm"
    DISPLAY_NAME = "CFGNorm (PatchLab)"
    DESCRIPTION = (
        "Shrinks the CFG result wherever its per-pixel channel norm exceeds the positive prediction's (from "
        "HiDream-E1), which keeps strong guidance from overshooting. strength blends the effect in: 1 is "
        "ComfyUI's CFGNorm, 0 disables it (ComfyUI's node multiplies the whole image by strength instead)."
    )
    WHAT = "the norm cap"
    OPTIONS = {"strength": float_input(1.0, 0.0, 1.0, 0.01, (
        "How much of the norm cap to apply: 0 disables it, 1 applies it fully."))}

    def patch(self, model, strength, start_percent, end_percent):
        return (cfg.with_post_cfg(model, cfg.cfg_norm(strength, self.window(model, start_percent, end_percent))),)


class AdaptiveProjectedGuidance(_GuidanceNode):
    NODE_ID = "PatchLab_AdaptiveProjectedGuidance"
    DISPLAY_NAME = "Adaptive Projected Guidance (PatchLab)"
    DESCRIPTION = (
        "APG (Sadat et al. 2024, arXiv 2410.02416): splits the guidance into parts parallel and orthogonal to the "
        "positive prediction and damps the parallel part, which causes over-saturation; adds a norm cap and "
        "reverse momentum, so high CFG scales stay clean. mode 'paper' follows the paper and diffusers (eta 1, "
        "no cap, no momentum is plain CFG); 'comfyui' reproduces ComfyUI's APG, which acts like CFG at scale+1. "
        "The momentum restarts with every run."
    )
    WHAT = "APG"
    OPTIONS = {
        "eta": float_input(1.0, -10.0, 10.0, 0.01, (
            "Weight of the guidance component parallel to the positive prediction. 1 keeps it (with no cap and "
            "no momentum: plain CFG in paper mode); 0 removes it (the paper's choice); values above 1 saturate.")),
        "norm_threshold": float_input(5.0, 0.0, 50.0, 0.1, (
            "Cap on the L2 norm of the guidance vector. 0 disables the cap; lower values rein in strong guidance "
            "more (the paper tunes it per model, e.g. 5-20).")),
        "momentum": float_input(0.0, -5.0, 1.0, 0.01, (
            "Running average of past guidance. 0 disables it; negative values (the paper uses -0.5) push away "
            "from directions already taken.")),
        "mode": combo_input(MODES, "paper", (
            "paper: cond + (cfg - 1) * update (paper, diffusers). comfyui: cond + cfg * update (ComfyUI's APG, "
            "one CFG step stronger).")),
    }

    def patch(self, model, eta, norm_threshold, momentum, mode, start_percent, end_percent):
        if mode not in MODES:
            raise ValueError(f"{self.NODE_ID}: mode must be 'paper' or 'comfyui', got {mode!r}")
        fn = cfg.adaptive_projected_guidance(eta, norm_threshold, momentum, mode,
                                             self.window(model, start_percent, end_percent))
        return (cfg.with_apg(model, fn),)


class TangentialDampingCFG(_GuidanceNode):
    NODE_ID = "PatchLab_TangentialDampingCFG"
    DISPLAY_NAME = "Tangential Damping CFG (PatchLab)"
    DESCRIPTION = (
        "TCFG (arXiv 2503.18137): keeps only the part of the negative prediction that lies along the dominant "
        "direction shared with the positive one, so guidance pushes away from what the negative prompt adds "
        "without pushing away from natural images in general. Per sample; the singular direction comes from a "
        "2x2 Gram matrix in closed form (float64), the same answer as ComfyUI's SVD at a fraction of the cost."
    )
    WHAT = "tangential damping"

    def patch(self, model, start_percent, end_percent):
        fn = cfg.tangential_damping_cfg(self.window(model, start_percent, end_percent))
        return (cfg.with_pre_cfg(model, fn),)


class Mahiro(_GuidanceNode):
    NODE_ID = "PatchLab_Mahiro"
    DISPLAY_NAME = "Mahiro Guidance (PatchLab)"
    DESCRIPTION = (
        "Mahiro guidance (blue-arxiv 2024-1208.1): blends CFG with the positive prediction's own 'leap' by how "
        "similar their average is to the negative leap, so guidance follows the direction of the positive prompt "
        "rather than the opposite of the negative. Similarity is measured per image (ComfyUI's Mahiro averages it "
        "over the whole batch, so images in a batch change each other)."
    )
    WHAT = "Mahiro guidance"

    def patch(self, model, start_percent, end_percent):
        return (cfg.with_post_cfg(model, cfg.mahiro(self.window(model, start_percent, end_percent))),)


class CFGZeroStar(_GuidanceNode):
    NODE_ID = "PatchLab_CFGZeroStar"
    DISPLAY_NAME = "CFG-Zero* (PatchLab)"
    DESCRIPTION = (
        "CFG-Zero* (Fan et al. 2025, arXiv 2503.18886): scales the negative prediction by the optimal alpha = "
        "<cond, uncond> / ||uncond||^2 before guiding, which corrects early-step errors of flow models, and can "
        "zero the first steps (zero-init). mode 'paper' applies the rule to the scores as in the paper; "
        "'comfyui' reproduces ComfyUI's CFGZeroStar, which applies it to denoised predictions and differs by "
        "x(1-alpha)(1-cfg)."
    )
    WHAT = "CFG-Zero*"
    OPTIONS = {
        "mode": combo_input(MODES, "paper",
                            "paper: the paper's rule on scores (x - denoised). comfyui: ComfyUI's CFGZeroStar."),
        "zero_init_steps": int_input(0, 0, 1000, (
            "Number of first steps of the run that output zero velocity (the sample does not move). 0 disables "
            "zero-init; the paper zeroes about the first 4% of steps (1 of 25).")),
    }

    def patch(self, model, mode, zero_init_steps, start_percent, end_percent):
        if mode not in MODES:
            raise ValueError(f"{self.NODE_ID}: mode must be 'paper' or 'comfyui', got {mode!r}")
        fn = cfg.cfg_zero_star(mode, zero_init_steps, self.window(model, start_percent, end_percent))
        return (cfg.with_post_cfg(model, fn),)


class FreSca(_GuidanceNode):
    NODE_ID = "PatchLab_FreSca"
    DISPLAY_NAME = "FreSca (PatchLab)"
    DESCRIPTION = (
        "FreSca (Huang et al. 2025, arXiv 2504.02154): scales the low and high spatial frequencies of the guidance "
        "separately: scale_high above 1 enhances fine detail, scale_low above 1 with scale_high below 1 smooths. "
        "Filters only the two spatial axes, so video latents keep their time axis intact (ComfyUI's FreSca also "
        "narrows time)."
    )
    WHAT = "frequency scaling"
    OPTIONS = {
        "scale_low": float_input(1.0, 0.0, 10.0, 0.01, (
            "Factor for low frequencies (structure). 1 leaves them; with scale_high 1 the node does nothing.")),
        "scale_high": float_input(1.25, 0.0, 10.0, 0.01, (
            "Factor for high frequencies (detail). Above 1 enhances detail (1.1-1.5 typical); 1 leaves them.")),
        "freq_cutoff": int_input(20, 1, 10000, (
            "Half-size, in frequency indices around the centre, of the band counted as low frequency. Larger "
            "values treat more of the spectrum as structure."), step=1),
    }

    def patch(self, model, scale_low, scale_high, freq_cutoff, start_percent, end_percent):
        fn = cfg.fresca(scale_low, scale_high, freq_cutoff, self.window(model, start_percent, end_percent))
        return (cfg.with_pre_cfg(model, fn),)


NODES = [RescaleCFG, RenormCFG, CFGNorm, AdaptiveProjectedGuidance, TangentialDampingCFG, Mahiro, CFGZeroStar, FreSca]
