"""Example workflows of the ModelSampling family and the schedule preview."""

from __future__ import annotations

from ._common import (
    AURAFLOW,
    CASCADE,
    FLUX,
    PLAYGROUND,
    SD3,
    SD15,
    SD21_V,
    SDXL_VPRED,
    checkpoint,
    example,
    prompts,
    sample_and_save,
    schedule_preview,
)
from .builder import Builder


@example("model_sampling_discrete")
def model_sampling_discrete(wf: Builder) -> None:
    wf.note("ModelSampling Discrete", "A v-prediction SDXL checkpoint trained with zero terminal SNR needs "
            "sampling=v_prediction and zsnr=true when the file does not say so. The chart compares the "
            "schedule with the checkpoint's own (log scale): zsnr raises the first sigma from 14.6 to about 4500.")
    ckpt = checkpoint(wf, SDXL_VPRED)
    positive, negative = prompts(wf, ckpt)
    patched = wf.add("PatchLab_ModelSamplingDiscrete", model=ckpt[0], sampling="v_prediction", zsnr=True)
    latent = wf.add("EmptyLatentImage", width=1024, height=1024, batch_size=1)
    sample_and_save(wf, patched[0], ckpt, positive[0], negative[0], latent[0], "model_sampling_discrete",
                    steps=28, cfg=5.0, sampler="euler", scheduler="normal")
    schedule_preview(wf, patched[0], ckpt[0], "model_sampling_discrete", steps=28, log_scale=True)


@example("model_sampling_sd3")
def model_sampling_sd3(wf: Builder) -> None:
    wf.note("ModelSampling SD3", "SD3.5 with the timestep shift set explicitly: 3 is SD3's default at 1024x1024; "
            "try 6 for more coherent composition at larger sizes. The chart compares with shift 1 (none).")
    ckpt = checkpoint(wf, SD3)
    positive, negative = prompts(wf, ckpt)
    patched = wf.add("PatchLab_ModelSamplingSD3", model=ckpt[0], shift=3.0)
    unshifted = wf.add("PatchLab_ModelSamplingSD3", model=ckpt[0], shift=1.0)
    latent = wf.add("EmptySD3LatentImage", width=1024, height=1024, batch_size=1)
    sample_and_save(wf, patched[0], ckpt, positive[0], negative[0], latent[0], "model_sampling_sd3",
                    steps=28, cfg=4.5, sampler="dpmpp_2m", scheduler="sgm_uniform")
    schedule_preview(wf, patched[0], unshifted[0], "model_sampling_sd3", scheduler="sgm_uniform", steps=28)


@example("model_sampling_auraflow")
def model_sampling_auraflow(wf: Builder) -> None:
    wf.note("ModelSampling AuraFlow", "AuraFlow conditions on timesteps in 0-1; its default shift is 1.73.")
    ckpt = checkpoint(wf, AURAFLOW)
    positive, negative = prompts(wf, ckpt)
    patched = wf.add("PatchLab_ModelSamplingAuraFlow", model=ckpt[0], shift=1.73)
    latent = wf.add("EmptyLatentImage", width=1024, height=1024, batch_size=1)
    sample_and_save(wf, patched[0], ckpt, positive[0], negative[0], latent[0], "model_sampling_auraflow",
                    steps=25, cfg=3.5, sampler="uni_pc", scheduler="normal")


@example("model_sampling_flux")
def model_sampling_flux(wf: Builder) -> None:
    wf.note("ModelSampling Flux", "The latent is wired into the ModelSampling node, so the resolution-dependent "
            "shift follows the image size without setting width/height by hand. Change the latent size and "
            "watch the schedule chart move.")
    ckpt = checkpoint(wf, FLUX)
    positive, negative = prompts(wf, ckpt, negative="")
    guided = wf.add("FluxGuidance", conditioning=positive[0], guidance=3.5)
    latent = wf.add("EmptySD3LatentImage", width=1360, height=768, batch_size=1)
    patched = wf.add("PatchLab_ModelSamplingFlux", model=ckpt[0], max_shift=1.15, base_shift=0.5,
                     width=1024, height=1024, latent=latent[0])
    sample_and_save(wf, patched[0], ckpt, guided[0], negative[0], latent[0], "model_sampling_flux",
                    steps=20, cfg=1.0, sampler="euler", scheduler="simple")
    schedule_preview(wf, patched[0], ckpt[0], "model_sampling_flux", scheduler="simple", steps=20)


@example("model_sampling_continuous_edm")
def model_sampling_continuous_edm(wf: Builder) -> None:
    wf.note("ModelSampling Continuous EDM", "Playground v2.5 is an EDM model with its own latent format: "
            "sampling=edm_playground_v2.5 sets both. sigma_max 80 and sigma_min 0.002 are its training range.")
    ckpt = checkpoint(wf, PLAYGROUND)
    positive, negative = prompts(wf, ckpt)
    patched = wf.add("PatchLab_ModelSamplingContinuousEDM", model=ckpt[0], sampling="edm_playground_v2.5",
                     sigma_max=80.0, sigma_min=0.002)
    latent = wf.add("EmptyLatentImage", width=1024, height=1024, batch_size=1)
    sample_and_save(wf, patched[0], ckpt, positive[0], negative[0], latent[0], "model_sampling_continuous_edm",
                    steps=30, cfg=3.0, sampler="dpmpp_2m", scheduler="karras")


@example("model_sampling_continuous_v")
def model_sampling_continuous_v(wf: Builder) -> None:
    wf.note("ModelSampling Continuous V", "A continuous-time v-prediction schedule between sigma_min and "
            "sigma_max, conditioned on 2/pi*atan(sigma). The chart shows it against the checkpoint's discrete one.")
    ckpt = checkpoint(wf, SD21_V)
    positive, negative = prompts(wf, ckpt)
    patched = wf.add("PatchLab_ModelSamplingContinuousV", model=ckpt[0], sampling="v_prediction",
                     sigma_max=500.0, sigma_min=0.03)
    latent = wf.add("EmptyLatentImage", width=768, height=768, batch_size=1)
    sample_and_save(wf, patched[0], ckpt, positive[0], negative[0], latent[0], "model_sampling_continuous_v",
                    steps=25, cfg=7.0, sampler="dpmpp_2m", scheduler="karras")
    schedule_preview(wf, patched[0], ckpt[0], "model_sampling_continuous_v", scheduler="karras", steps=25,
                     log_scale=True)


@example("model_sampling_stable_cascade")
def model_sampling_stable_cascade(wf: Builder) -> None:
    wf.note("ModelSampling Stable Cascade", "Stage C's schedule with shift 2 (its default at 1024x1024) against "
            "shift 1. Wire the patched model into your usual stage C sampler.")
    ckpt = checkpoint(wf, CASCADE)
    shifted = wf.add("PatchLab_ModelSamplingStableCascade", model=ckpt[0], shift=2.0)
    plain = wf.add("PatchLab_ModelSamplingStableCascade", model=ckpt[0], shift=1.0)
    schedule_preview(wf, shifted[0], plain[0], "model_sampling_stable_cascade", scheduler="simple", steps=20,
                     log_scale=True)


@example("sigma_schedule_preview")
def sigma_schedule_preview(wf: Builder) -> None:
    wf.note("Sigma Schedule Preview", "See a schedule before sampling: here SD1.5's own schedule against the same "
            "model with zero terminal SNR, for the karras scheduler. The SIGMAS output plugs into "
            "SamplerCustom / SamplerCustomAdvanced.")
    ckpt = checkpoint(wf, SD15)
    patched = wf.add("PatchLab_ModelSamplingDiscrete", model=ckpt[0], sampling="eps", zsnr=True)
    schedule_preview(wf, patched[0], ckpt[0], "sigma_schedule_preview", scheduler="karras", steps=20,
                     log_scale=True)
