"""Step caching: StepCache reuses (or forecasts) the model's last output on steps that change little."""

from __future__ import annotations

import math
from typing import Any, Optional

from ..patches import step_cache as sc
from ._common import (
    HIDDEN_NODE_ID,
    WindowPatchNode,
    category,
    check_window,
    combo_input,
    first_error,
    float_input,
    int_input,
)


def target_error(node_id: str, target_speedup: Any) -> Optional[str]:
    """What is wrong with a ``target_speedup`` (None if it is fine or not known yet): it is 0 or at least 1."""
    if not isinstance(target_speedup, (int, float)) or isinstance(target_speedup, bool):
        return None
    if not math.isfinite(target_speedup) or target_speedup < 0 or 0 < target_speedup < 1:
        return (f"{node_id}: target_speedup is {target_speedup}; it must be 0 (off: the threshold alone decides) "
                f"or a number from 1 to 10 (how many times fewer rows to evaluate; 1.5-4 is the useful range, "
                f"2 evaluates at most about half). Set 0 to turn it off, or e.g. 2.")
    return None


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
        "and never reuses in extra guidance passes. With target_speedup set it instead spends a budget of at most "
        "about 1/target of the evaluations on the steps whose indicator changes most, on any model without "
        "calibration. After each run the node shows how many evaluations it saved."
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
            "prediction as it is; taylor 2: a second-order (TaylorSeer) forecast through the last three; "
            "chebyshev: a smoothed Chebyshev fit (Spectrum) over the last four. Each keeps that many of the "
            "model's outputs per cond/uncond chunk in memory.")),
    }
    # Added after the first release: optional, so prompts saved without it keep running (as with 0, off).
    OPTIONAL_INPUTS = {
        "target_speedup": float_input(0.0, 0.0, 10.0, 0.1, (
            "Evaluate at most about 1/target of the rows (plus one step's): 2 runs the network for at most half "
            "of them, spent on the steps where the indicator sees the largest change, on any model, no "
            "calibration. 0 turns it off: the threshold alone decides, exactly as without this input. Useful: "
            "1.5-4 (between 0 and 1 is refused; 1 evaluates every step). With it set, threshold says how readily "
            "the budget is spent (the more budget left, the smaller the change that spends it; 0 spends it "
            "evenly), max_consecutive forces an evaluation only while budget is left (the budget wins), the last "
            "steps spend what is left, and steps outside start/end are always evaluated and paid from the "
            "budget.")),
    }
    HIDDEN_INPUTS = HIDDEN_NODE_ID

    @classmethod
    def VALIDATE_INPUTS(cls, threshold=None, max_consecutive=None, start_percent=None, end_percent=None,
                        target_speedup=None):
        return first_error(target_error(cls.NODE_ID, target_speedup),
                           check_window(cls, start_percent, end_percent, threshold=threshold,
                                        max_consecutive=max_consecutive, target_speedup=target_speedup))

    def patch(self, model, indicator, threshold, max_consecutive, reuse, start_percent, end_percent,
              target_speedup=0.0, unique_id=None):
        return (sc.with_step_cache(model, self.spec(model, indicator, threshold, max_consecutive, reuse,
                                                    start_percent, end_percent, unique_id, target_speedup)),)

    @classmethod
    def spec(cls, model, indicator, threshold, max_consecutive, reuse, start_percent, end_percent,
             unique_id=None, target_speedup=0.0) -> sc.CacheSpec:
        """The node's inputs checked and turned into the cache's spec (sigma window from the percents)."""
        if indicator not in sc.INDICATORS:
            raise ValueError(f"{cls.NODE_ID}: indicator must be one of {', '.join(sc.INDICATORS)}, got {indicator!r}")
        if reuse not in sc.REUSE_MODES:
            raise ValueError(f"{cls.NODE_ID}: reuse must be one of {', '.join(sc.REUSE_MODES)}, got {reuse!r}")
        if threshold < 0:
            raise ValueError(f"{cls.NODE_ID}: threshold must be >= 0 (0 disables it), got {threshold}")
        if max_consecutive < 1:
            raise ValueError(f"{cls.NODE_ID}: max_consecutive must be at least 1, got {max_consecutive}")
        error = target_error(cls.NODE_ID, target_speedup)
        if error:
            raise ValueError(error)
        window = cls.window(model, start_percent, end_percent)
        return sc.CacheSpec(node_id=cls.NODE_ID, indicator=indicator, threshold=float(threshold),
                            max_consecutive=int(max_consecutive), forecast=reuse != "plain", window=window,
                            canvas=unique_id, target_speedup=float(target_speedup),
                            method={"taylor 2": "taylor 2", "chebyshev": "chebyshev"}.get(reuse, "first"))


NODES = [StepCache]
