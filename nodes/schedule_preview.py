"""SigmaSchedulePreview: see the noise schedule a model will be sampled with."""

from __future__ import annotations

from ..patches import model_sampling as ms
from ..viz import sigma_plot
from ._common import category, combo_input, float_input, int_input


class SigmaSchedulePreview:
    NODE_ID = "PatchLab_SigmaSchedulePreview"
    DISPLAY_NAME = "Sigma Schedule Preview (PatchLab)"
    DESCRIPTION = (
        "Plots the sigmas KSampler would use for this model, scheduler, step count and denoise, and outputs "
        "them as SIGMAS for the custom samplers. Connect a second model to compare, e.g. the model before "
        "and after a ModelSampling shift or zsnr, before spending time on sampling."
    )
    CATEGORY = category("model sampling")
    RETURN_TYPES = ("IMAGE", "SIGMAS")
    RETURN_NAMES = ("plot", "sigmas")
    OUTPUT_TOOLTIPS = (
        "A chart of sigma against step (the compare model's curve too, if connected).",
        "The schedule of `model`: steps + 1 sigmas ending at 0, as KSampler would use them.",
    )
    FUNCTION = "preview"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The model whose schedule is shown (after any ModelSampling node)."}),
                "scheduler": combo_input(ms.scheduler_names(), "normal", "The scheduler, as chosen in KSampler."),
                "steps": int_input(20, 1, 10000, (
                    "Sampling steps, as in KSampler. Samplers that discard the penultimate sigma (dpm_2, uni_pc) "
                    "differ slightly.")),
                "denoise": float_input(1.0, 0.0, 1.0, 0.01, (
                    "As in KSampler: below 1 keeps the last steps of a longer schedule (img2img). 0 gives an empty "
                    "schedule.")),
                "log_scale": ("BOOLEAN", {"default": False,
                                          "tooltip": "Plot log10(sigma), which shows the low-noise end of "
                                                     "discrete schedules better."}),
            },
            "optional": {
                "compare_model": ("MODEL", {"tooltip": "Optional second model drawn on the same chart."}),
            },
        }

    def preview(self, model, scheduler, steps, denoise, log_scale, compare_model=None):
        sigmas = ms.sampler_sigmas(model, scheduler, steps, denoise)
        curves = [(_label("model", sigmas), sigmas.tolist())]
        if compare_model is not None:
            other = ms.sampler_sigmas(compare_model, scheduler, steps, denoise)
            curves.append((_label("compare_model", other), other.tolist()))
        title = f"{scheduler}, {steps} steps, denoise {denoise:g}"
        return (sigma_plot.render(curves, title, log_scale=log_scale), sigmas)


def _label(name, sigmas):
    if sigmas.numel() == 0:
        return f"{name} (empty)"
    return f"{name}: {float(sigmas[0]):.4g} -> {float(sigmas[-1]):.4g}"


NODES = [SigmaSchedulePreview]
