"""ModelSampling nodes: how a model maps noise levels to timesteps and outputs to denoised latents."""

from __future__ import annotations

from ..patches import model_sampling as ms
from ._common import (
    MAX_RESOLUTION,
    MODEL_INPUT,
    ModelPatchNode,
    category,
    check_ranges,
    combo_input,
    first_error,
    float_input,
    int_input,
)

CATEGORY = category("model sampling")


class ModelSamplingDiscrete(ModelPatchNode):
    NODE_ID = "PatchLab_ModelSamplingDiscrete"
    DISPLAY_NAME = "ModelSampling Discrete (PatchLab)"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "Sets the prediction type and noise schedule of a discrete-timestep model (SD1.x, SD2.x, SDXL and "
        "their fine-tunes). Use it when a checkpoint does not say how it was trained: v_prediction for "
        "v-models, lcm for LCM/Lightning/Hyper/DMD2-style distilled models, x0 and img_to_img for models "
        "that predict the clean image. zsnr rescales the schedule to zero terminal SNR (Lin et al. 2023, "
        "arXiv 2305.08891), meant for v-prediction models trained that way. Same results as ComfyUI's "
        "ModelSamplingDiscrete."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": MODEL_INPUT,
            "sampling": combo_input(ms.DISCRETE_PREDICTIONS, "eps", (
                "What the network predicts: eps (noise, SD1.5/SDXL default), v_prediction, lcm (eps read through "
                "consistency-model scalings on a 50-step table), x0 (the clean latent), img_to_img (x0 without input "
                "scaling).")),
            "zsnr": ("BOOLEAN", {
                "default": False,
                "tooltip": "Zero terminal SNR: the last timestep becomes (almost) pure noise. Only for models "
                           "trained with it (usually v_prediction). Off leaves the schedule as trained.",
            }),
        }}

    def patch(self, model, sampling, zsnr):
        return (ms.install(model, ms.discrete(ms.model_config(model), sampling, zsnr)),)


class ModelSamplingSD3(ModelPatchNode):
    NODE_ID = "PatchLab_ModelSamplingSD3"
    DISPLAY_NAME = "ModelSampling SD3 (PatchLab)"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "Flow-matching schedule with the SD3 timestep shift sigma = shift*t / (1 + (shift-1)*t) (Esser et al. "
        "2024, arXiv 2403.03206), timesteps on a 0-1000 scale. Higher shift spends more of the steps at high "
        "noise: better composition at large resolutions, less fine detail. For SD3/SD3.5, HunyuanVideo, Wan "
        "and other flow models conditioned on 0-1000 timesteps. Same results as ComfyUI's ModelSamplingSD3."
    )
    MULTIPLIER = 1000.0
    DEFAULT_SHIFT = 3.0

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": MODEL_INPUT,
            "shift": float_input(cls.DEFAULT_SHIFT, 0.01, 100.0, 0.01, (
                "Timestep shift. 1 disables it; 3 is SD3's default at 1024x1024 (6 was a close second); larger "
                "values push steps toward high noise.")),
        }}

    def patch(self, model, shift):
        return (ms.install(model, ms.flow(ms.model_config(model), shift, self.MULTIPLIER)),)


class ModelSamplingAuraFlow(ModelSamplingSD3):
    NODE_ID = "PatchLab_ModelSamplingAuraFlow"
    DISPLAY_NAME = "ModelSampling AuraFlow (PatchLab)"
    DESCRIPTION = (
        "Flow-matching schedule with the SD3 timestep shift, for models conditioned on timesteps in 0-1 "
        "(AuraFlow, Lumina 2, HiDream and similar). Higher shift spends more steps at high noise; 1 disables "
        "it. Same results as ComfyUI's ModelSamplingAuraFlow."
    )
    MULTIPLIER = 1.0
    DEFAULT_SHIFT = 1.73


class ModelSamplingFlux(ModelPatchNode):
    NODE_ID = "PatchLab_ModelSamplingFlux"
    DISPLAY_NAME = "ModelSampling Flux (PatchLab)"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "Flux's resolution-dependent timestep shift: mu grows linearly with the number of image patches, "
        "from base_shift at 256 patches to max_shift at 4096 (a 1024x1024 image), and "
        "sigma = e^mu / (e^mu + 1/t - 1). Connect the latent you sample to take the size from it (counting "
        "the model's real patches); otherwise width and height are used with the model's VAE factor and "
        "patch size. With the default 8x VAE and 2x2 patches it matches ComfyUI's ModelSamplingFlux."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": MODEL_INPUT,
                "max_shift": float_input(1.15, 0.0, 100.0, 0.01, (
                    "mu at 4096 patches (1024x1024). Flux default 1.15; higher pushes large images toward high "
                    "noise. Set equal to base_shift for a size-independent shift.")),
                "base_shift": float_input(0.5, 0.0, 100.0, 0.01, "mu at 256 patches (256x256). Flux default 0.5."),
                "width": int_input(1024, 16, MAX_RESOLUTION, (
                    "Image width in pixels the shift is computed for. Ignored when a latent is connected."), step=8),
                "height": int_input(1024, 16, MAX_RESOLUTION, (
                    "Image height in pixels the shift is computed for. Ignored when a latent is connected."), step=8),
            },
            "optional": {
                "latent": ("LATENT", {
                    "tooltip": "Optional: the latent you are about to sample. Its size (and the model's patch "
                               "size) sets the shift, so width/height need not be wired by hand.",
                }),
            },
        }

    def patch(self, model, max_shift, base_shift, width, height, latent=None):
        if latent is not None:
            tokens = ms.image_tokens_from_latent(model, latent["samples"])
        else:
            tokens = ms.image_tokens_from_size(model, width, height)
        return (ms.install(model, ms.flux(ms.model_config(model), tokens, base_shift, max_shift)),)


class ModelSamplingStableCascade(ModelPatchNode):
    NODE_ID = "PatchLab_ModelSamplingStableCascade"
    DISPLAY_NAME = "ModelSampling Stable Cascade (PatchLab)"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "Stable Cascade's cosine noise schedule (Würstchen, arXiv 2306.00637) with a log-SNR shift of "
        "-2*log(shift): higher shift means noisier steps. For Stable Cascade stage C/B models. Same results "
        "as ComfyUI's ModelSamplingStableCascade."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": MODEL_INPUT,
            "shift": float_input(2.0, 0.01, 100.0, 0.01, "Log-SNR shift. 1 disables it; stage C uses 2 at 1024x1024."),
        }}

    def patch(self, model, shift):
        return (ms.install(model, ms.stable_cascade(ms.model_config(model), shift)),)


class _ContinuousNode(ModelPatchNode):
    """What the two continuous-time schedules share: sampling and sigma range inputs, and their checks."""

    CATEGORY = CATEGORY
    SIGMA_MAX = 120.0
    SIGMA_MIN = 0.002
    SAMPLINGS = ("v_prediction",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": MODEL_INPUT,
            "sampling": (list(cls.SAMPLINGS), {"tooltip": cls.SAMPLING_TOOLTIP}),
            "sigma_max": float_input(cls.SIGMA_MAX, 0.0, 1000.0, 0.001,
                                     "Largest noise level of the schedule; must exceed sigma_min.", round=False),
            "sigma_min": float_input(cls.SIGMA_MIN, 0.0, 1000.0, 0.001,
                                     "Smallest noise level of the schedule; must be above 0.", round=False),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, sigma_max=None, sigma_min=None):
        return first_error(check_ranges(cls, sigma_max=sigma_max, sigma_min=sigma_min),
                           cls._check_sigmas(sigma_max, sigma_min, strict=False))

    @classmethod
    def _check_sigmas(cls, sigma_max, sigma_min, strict=True):
        if sigma_min is not None and sigma_min <= 0:
            message = f"sigma_min is {sigma_min}; it must be above 0 (the schedule is log-spaced)."
        elif sigma_max is not None and sigma_min is not None and sigma_max <= sigma_min:
            message = f"sigma_max ({sigma_max}) must be larger than sigma_min ({sigma_min}); swap them."
        else:
            return True
        if strict:
            raise ValueError(f"{cls.NODE_ID}: {message}")
        return message


class ModelSamplingContinuousEDM(_ContinuousNode):
    NODE_ID = "PatchLab_ModelSamplingContinuousEDM"
    DISPLAY_NAME = "ModelSampling Continuous EDM (PatchLab)"
    DESCRIPTION = (
        "Continuous-time schedule, log-spaced between sigma_min and sigma_max, conditioned on log(sigma)/4 "
        "(Karras et al. 2022, arXiv 2206.00364). For EDM-trained models such as Playground v2.5 (which also "
        "swaps in its latent format), CosXL and Cosmos. Same results as ComfyUI's ModelSamplingContinuousEDM."
    )
    SAMPLINGS = tuple(ms.CONTINUOUS_EDM_PREDICTIONS)
    SAMPLING_TOOLTIP = ("Prediction type: v_prediction, edm (sigma_data 0.5), edm_playground_v2.5 (edm plus "
                        "Playground's latent format), eps, cosmos_rflow (rectified flow on this sigma range).")

    def patch(self, model, sampling, sigma_max, sigma_min):
        self._check_sigmas(sigma_max, sigma_min)
        sampling_obj, latent_format = ms.continuous_edm(ms.model_config(model), sampling, sigma_min, sigma_max)
        return (ms.install(model, sampling_obj, latent_format),)


class ModelSamplingContinuousV(_ContinuousNode):
    NODE_ID = "PatchLab_ModelSamplingContinuousV"
    DISPLAY_NAME = "ModelSampling Continuous V (PatchLab)"
    DESCRIPTION = (
        "Continuous-time v-prediction schedule, log-spaced between sigma_min and sigma_max and conditioned on "
        "the angle 2/pi*atan(sigma). For continuous v-prediction models. Same results as ComfyUI's "
        "ModelSamplingContinuousV."
    )
    SIGMA_MAX = 500.0
    SIGMA_MIN = 0.03
    SAMPLING_TOOLTIP = "Prediction type: v_prediction is the only one this schedule is used with."

    def patch(self, model, sampling, sigma_max, sigma_min):
        self._check_sigmas(sigma_max, sigma_min)
        return (ms.install(model, ms.continuous_v(ms.model_config(model), sigma_min, sigma_max)),)


NODES = [
    ModelSamplingDiscrete,
    ModelSamplingSD3,
    ModelSamplingAuraFlow,
    ModelSamplingFlux,
    ModelSamplingContinuousEDM,
    ModelSamplingContinuousV,
    ModelSamplingStableCascade,
]
