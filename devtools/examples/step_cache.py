"""Example workflows of StepCache (reuse of the network's output residual between steps)."""

from __future__ import annotations

from ._common import (
    FLUX,
    SDXL,
    WAN21,
    WAN21_VAE,
    WAN22_HIGH,
    WAN22_LOW,
    WAN_TEXT,
    checkpoint,
    diffusion_model,
    example,
    prompts,
    sample_and_save,
    split_files,
)
from .builder import Builder

STEP_CACHE = {"indicator": "input", "threshold": 0.25, "max_consecutive": 2, "reuse": "forecast",
              "start_percent": 0.0, "end_percent": 1.0}


@example("step_cache_sdxl_hires")
def step_cache_sdxl_hires(wf: Builder) -> None:
    wf.note("Step Cache, SDXL with a hires pass", "One StepCache model feeds both samplers: the first pass at "
            "1024x1024 and, after a latent upscale, the hires pass at 1536x1536 (denoise 0.5). Every run starts with "
            "an empty cache, so the size change is safe. The log tells per run how many steps were reused; raise "
            "threshold for more speed, lower it if details change.")
    ckpt = checkpoint(wf, SDXL)
    positive, negative = prompts(wf, ckpt)
    model = wf.add("PatchLab_StepCache", model=ckpt[0], **STEP_CACHE)
    latent = wf.add("EmptyLatentImage", width=1024, height=1024, batch_size=1)
    first = wf.add("KSampler", model=model[0], seed=42, steps=20, cfg=7.0, sampler_name="dpmpp_2m",
                   scheduler="karras", positive=positive[0], negative=negative[0], latent_image=latent[0], denoise=1.0)
    larger = wf.add("LatentUpscaleBy", samples=first[0], upscale_method="nearest-exact", scale_by=1.5)
    second = wf.add("KSampler", model=model[0], seed=42, steps=20, cfg=7.0, sampler_name="dpmpp_2m",
                    scheduler="karras", positive=positive[0], negative=negative[0], latent_image=larger[0],
                    denoise=0.5)
    image = wf.add("VAEDecode", samples=second[0], vae=ckpt[2])
    wf.add("SaveImage", images=image[0], filename_prefix="PatchLab/step_cache_sdxl_hires")


@example("step_cache_flux")
def step_cache_flux(wf: Builder) -> None:
    wf.note("Step Cache, Flux", "first block: the network runs its first double block every step and skips the "
            "rest when that block's residual changed little since the last full evaluation. The skipped steps are "
            "forecast from the last two full evaluations.")
    ckpt = checkpoint(wf, FLUX)
    positive, negative = prompts(wf, ckpt)
    model = wf.add("PatchLab_StepCache", model=ckpt[0], **{**STEP_CACHE, "indicator": "first block",
                                                          "threshold": 0.2})
    latent = wf.add("EmptySD3LatentImage", width=1024, height=1024, batch_size=1)
    sample_and_save(wf, model[0], ckpt, positive[0], negative[0], latent[0], "step_cache_flux", steps=20, cfg=1.0)


@example("step_cache_wan21")
def step_cache_wan21(wf: Builder) -> None:
    wf.note("Step Cache, Wan 2.1 text to video", "StepCache at its defaults on Wan 2.1 (the 1.3B model, 832x480, "
            "13 frames): steps whose input changed little since the last full evaluation forecast the model's "
            "output instead of running it, for the positive and the negative pass alike. SaveAnimatedWEBP writes "
            "the decoded frames as one animation. The log tells per run how many evaluations were saved.")
    model, clip, vae = split_files(wf, WAN21, WAN_TEXT, "wan", WAN21_VAE)
    shifted = wf.add("ModelSamplingSD3", model=model[0], shift=8.0)
    cached = wf.add("PatchLab_StepCache", model=shifted[0])
    positive = wf.add("CLIPTextEncode", text="a red kite drifting right across a clear blue sky", clip=clip[0])
    negative = wf.add("CLIPTextEncode", text="static, blurry, low quality, watermark", clip=clip[0])
    latent = wf.add("EmptyHunyuanLatentVideo", width=832, height=480, length=13, batch_size=1)
    samples = wf.add("KSampler", model=cached[0], seed=42, steps=20, cfg=5.0, sampler_name="euler",
                     scheduler="normal", positive=positive[0], negative=negative[0], latent_image=latent[0],
                     denoise=1.0)
    frames = wf.add("VAEDecode", samples=samples[0], vae=vae[0])
    wf.add("SaveAnimatedWEBP", images=frames[0], filename_prefix="PatchLab/step_cache_wan21", fps=16.0,
           lossless=False, quality=90, method="default")


@example("step_cache_wan22_experts")
def step_cache_wan22_experts(wf: Builder) -> None:
    wf.note("Step Cache, Wan 2.2 14B (two experts)", "Wan 2.2 runs a high-noise expert on the first half of the "
            "steps and a low-noise expert on the second (two KSamplerAdvanced). Put a StepCache on each expert: "
            "each sampler is its own run with its own cache, and the low-noise expert evaluates its first step in "
            "full (nothing of the high-noise expert's is reused after the switch).")
    high, clip, vae = split_files(wf, WAN22_HIGH, WAN_TEXT, "wan", WAN21_VAE)
    low = diffusion_model(wf, WAN22_LOW)
    positive = wf.add("CLIPTextEncode", text="a red fox running through fresh snow, cinematic", clip=clip[0])
    negative = wf.add("CLIPTextEncode", text="blurry, static, low quality", clip=clip[0])
    experts = []
    for expert in (high, low):
        shifted = wf.add("ModelSamplingSD3", model=expert[0], shift=8.0)
        experts.append(wf.add("PatchLab_StepCache", model=shifted[0], **STEP_CACHE))
    latent = wf.add("EmptyHunyuanLatentVideo", width=640, height=640, length=81, batch_size=1)
    common = {"noise_seed": 42, "steps": 20, "cfg": 3.5, "sampler_name": "euler", "scheduler": "simple",
              "positive": positive[0], "negative": negative[0]}
    first = wf.add("KSamplerAdvanced", model=experts[0][0], add_noise="enable", latent_image=latent[0],
                   start_at_step=0, end_at_step=10, return_with_leftover_noise="enable", **common)
    second = wf.add("KSamplerAdvanced", model=experts[1][0], add_noise="disable", latent_image=first[0],
                    start_at_step=10, end_at_step=10000, return_with_leftover_noise="disable", **common)
    frames = wf.add("VAEDecode", samples=second[0], vae=vae[0])
    wf.add("SaveImage", images=frames[0], filename_prefix="PatchLab/step_cache_wan22_experts")
