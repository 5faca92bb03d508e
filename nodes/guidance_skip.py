"""Guidance that saves model calls: GuidanceInterval and AdaptiveGuidance (no negative pass where guidance is off)."""

from __future__ import annotations

from ..patches import guidance_skip
from ._common import (
    HIDDEN_NODE_ID,
    MODEL_INPUT,
    ModelPatchNode,
    WindowPatchNode,
    category,
    check_ranges,
    float_input,
    percent_input,
)

CATEGORY = category("guidance")

# Kynkaanniemi et al. 2024 (arXiv 2404.07724), SD-XL: guidance on for sigma in (0.28, 5.42]. On the SD1.5/SDXL
# schedule sigma 5.42 lies at 18.6 % and sigma 0.28 at 92.8 % of the schedule.
INTERVAL_START = 0.186
INTERVAL_END = 0.928
# Castillo et al. 2023 (arXiv 2312.12487): the similarity threshold of Adaptive Guidance.
ADAPTIVE_THRESHOLD = 0.991


class GuidanceInterval(WindowPatchNode):
    NODE_ID = "PatchLab_GuidanceInterval"
    DISPLAY_NAME = "Guidance Interval (PatchLab)"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "Applies CFG only in a limited part of the schedule (Kynkaanniemi et al. 2024, arXiv 2404.07724: guidance "
        "harms at high noise and is not needed at low noise; better FID with fewer evaluations). Outside the "
        "interval the negative prompt is left out of the model call, so those steps cost one model pass instead "
        "of two and equal cfg = 1 steps. Works with KSampler and every sampler node, and chains with the other "
        "guidance nodes; steps where PatchLab's SAG reads the negative keep it."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": MODEL_INPUT,
            "start_percent": percent_input(INTERVAL_START, (
                "Where CFG starts (0 = the first step, 1 the last); before it no negative pass. The default 0.186 "
                "is sigma 5.42 on SD1.5/SDXL, the upper end of the paper's SD-XL interval (0.28, 5.42]. 0 (with "
                "end 1) guides the whole run, as without this node.")),
            "end_percent": percent_input(INTERVAL_END, (
                "Where CFG stops (not below start_percent); after it no negative pass. The default 0.928 is sigma "
                "0.28 on SD1.5/SDXL, the lower end of the paper's SD-XL interval.")),
        }, "hidden": HIDDEN_NODE_ID}

    def patch(self, model, start_percent, end_percent, unique_id=None):
        window = self.window(model, start_percent, end_percent)
        if window.is_always:
            return (model.clone(),)
        return (guidance_skip.with_rule(model, guidance_skip.IntervalRule(self.NODE_ID, window, unique_id)),)


class AdaptiveGuidance(ModelPatchNode):
    NODE_ID = "PatchLab_AdaptiveGuidance"
    DISPLAY_NAME = "Adaptive Guidance (PatchLab)"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "Stops CFG for the rest of the run once the positive and negative predictions agree (Castillo et al. "
        "2023, arXiv 2312.12487: about a quarter of the evaluations saved at equal quality). At each guided step "
        "it measures the cosine similarity of the two noise predictions per image (whole image, float32); once "
        "every image of the batch exceeds the threshold, the following steps leave the negative prompt out of the "
        "model call (cfg = 1 steps). A MODEL patch: works with KSampler and every sampler node, restarts every "
        "run, and chains with the other guidance nodes."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": MODEL_INPUT,
            "threshold": float_input(ADAPTIVE_THRESHOLD, 0.0, 1.0, 0.0001, (
                "Cosine similarity of the positive and negative noise predictions above which guidance stops for the "
                "rest of the run. 1.0 never stops (plain CFG); lower stops earlier and saves more. The default 0.991 "
                "is the paper's threshold (Castillo et al. 2023, arXiv 2312.12487); useful values lie in "
                "0.98-0.999.")),
            "start_percent": percent_input(0.0, (
                "Guidance never stops before this part of the schedule (0 = the first step, 1 the last): the "
                "similarity is checked from here on. 0 checks from the first step; 1 never stops.")),
        }, "hidden": HIDDEN_NODE_ID}

    @classmethod
    def VALIDATE_INPUTS(cls, threshold=None, start_percent=None):
        return check_ranges(cls, threshold=threshold, start_percent=start_percent)

    def patch(self, model, threshold, start_percent, unique_id=None):
        if threshold >= 1.0 or start_percent >= 1.0:
            return (model.clone(),)
        sigma_start = float(model.get_model_object("model_sampling").percent_to_sigma(start_percent))
        return (guidance_skip.with_rule(model, guidance_skip.AdaptiveRule(self.NODE_ID, threshold, sigma_start,
                                                                         unique_id)),)


NODES = [GuidanceInterval, AdaptiveGuidance]
