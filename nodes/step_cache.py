"""Step caching: StepCache reuses (or forecasts) the model's last output on steps that change little."""

from __future__ import annotations

from ..patches import step_cache as sc
from ._common import HIDDEN_NODE_ID, WindowPatchNode, category, check_window, combo_input, float_input, int_input


class StepCache(WindowPatchNode):
    NODE_ID = "PatchLab_StepCache"
    DISPLAY_NAME = "Step Cache (PatchLab)"
    CATEGORY = category("speed")
    DESCRIPTION = (
        "Skips whole model evaluations on steps that would change little: the output residual of the last full "
        "evaluation, rescaled to the current sigma (the model's noise or velocity prediction), is reused, or "
        "extrapolated in sigma from the last two (after TaylorSeer, arXiv 2503.06923), while the change accumulated "
        "since then (of the model input, or of the first block's residual) stays below the threshold. Works on every "
        "model ComfyUI samples (first block: UNets and "
        "most DiTs), per batch item and per cond/uncond chunk, starts fresh every run (any size, steps or sampler), "
        "and never reuses in extra guidance passes. After each run the node shows how many evaluations it saved."
    )
    WHAT = "reuse"
    # The first steps set the composition and change the most: like core EasyCache/LazyCache, start at 15 %.
    START = 0.15
    OPTIONS = {
        "indicator": combo_input(sc.INDICATORS, "input", (
            "What decides a reuse. input: relative change of the model input since the last full evaluation "
            "(free, every model). first block: the network runs its first block and the change of that block's "
            "residual decides (costs one block per step, follows the model more closely; UNets, Flux, Flux.2, "
            "Chroma, SD3/SD3.5, Qwen-Image, Wan 2.1/2.2, HunyuanVideo, AuraFlow; not Z-Image/Lumina 2).")),
        "threshold": float_input(0.3, 0.0, 10.0, 0.005, (
            "Largest accumulated relative change that still reuses. 0 disables it (never reuses). input: 0.1-0.6; "
            "first block: 0.05-0.2. Higher skips more steps and strays further; the help page has the measured "
            "trade-off.")),
        "max_consecutive": int_input(3, 1, 100, (
            "At most this many reused steps in a row before a full evaluation. 1-3 keeps quality; higher only "
            "matters at high thresholds.")),
        "reuse": combo_input(sc.REUSE_MODES, "forecast", (
            "forecast: extrapolate the model's prediction linearly in sigma from the last two full evaluations "
            "(half the first-order step; closer to the uncached result at the same speed); plain: reuse the last "
            "prediction as it is.")),
    }
    HIDDEN_INPUTS = HIDDEN_NODE_ID

    @classmethod
    def VALIDATE_INPUTS(cls, threshold=None, max_consecutive=None, start_percent=None, end_percent=None):
        return check_window(cls, start_percent, end_percent, threshold=threshold, max_consecutive=max_consecutive)

    def patch(self, model, indicator, threshold, max_consecutive, reuse, start_percent, end_percent, unique_id=None):
        return (sc.with_step_cache(model, self.spec(model, indicator, threshold, max_consecutive, reuse,
                                                    start_percent, end_percent, unique_id)),)

    @classmethod
    def spec(cls, model, indicator, threshold, max_consecutive, reuse, start_percent, end_percent,
             unique_id=None) -> sc.CacheSpec:
        """The node's inputs checked and turned into the cache's spec (sigma window from the percents)."""
        if indicator not in sc.INDICATORS:
            raise ValueError(f"{cls.NODE_ID}: indicator must be one of {', '.join(sc.INDICATORS)}, got {indicator!r}")
        if reuse not in sc.REUSE_MODES:
            raise ValueError(f"{cls.NODE_ID}: reuse must be one of {', '.join(sc.REUSE_MODES)}, got {reuse!r}")
        if threshold < 0:
            raise ValueError(f"{cls.NODE_ID}: threshold must be >= 0 (0 disables it), got {threshold}")
        if max_consecutive < 1:
            raise ValueError(f"{cls.NODE_ID}: max_consecutive must be at least 1, got {max_consecutive}")
        window = cls.window(model, start_percent, end_percent)
        return sc.CacheSpec(node_id=cls.NODE_ID, indicator=indicator, threshold=float(threshold),
                            max_consecutive=int(max_consecutive), forecast=reuse == "forecast", window=window,
                            canvas=unique_id)


NODES = [StepCache]
