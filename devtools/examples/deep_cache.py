"""Example workflows of DeepCache (UNet feature caching between steps)."""

from __future__ import annotations

from ._common import SD15, SDXL, checkpoint, example, prompts, sample_and_save
from .builder import Builder


def cached(wf: Builder, ckpt_name: str, prefix: str, size: int, **inputs) -> None:
    ckpt = checkpoint(wf, ckpt_name)
    positive, negative = prompts(wf, ckpt)
    model = wf.add("PatchLab_DeepCache", model=ckpt[0], **inputs)
    latent = wf.add("EmptyLatentImage", width=size, height=size, batch_size=1)
    sample_and_save(wf, model[0], ckpt, positive[0], negative[0], latent[0], prefix, steps=20, cfg=7.0,
                    sampler="dpmpp_2m", scheduler="karras")


@example("deep_cache_sd15")
def deep_cache_sd15(wf: Builder) -> None:
    wf.note("DeepCache, SD1.5", "One full UNet evaluation every 3 steps; the 2 in between run only the first "
            "convolution and the last output block on the cached deep features (depth 0, the paper's shallowest "
            "branch): about 2.4x faster sampling at 20 steps. Raise depth for more detail, 1 interval turns it off.")
    cached(wf, SD15, "deep_cache_sd15", 512, interval=3, depth=0, start_percent=0.0, end_percent=1.0)


@example("deep_cache_sdxl_hires")
def deep_cache_sdxl_hires(wf: Builder) -> None:
    wf.note("DeepCache, SDXL with a hires pass", "One DeepCache model feeds both samplers: 1024x1024 first, then "
            "after a latent upscale a 1536x1536 pass at denoise 0.5. Every run starts with an empty cache, so the "
            "size change is safe. SDXL has 9 skip branches (depth 0-8); depth 1 keeps a little more detail. The "
            "cache starts after the first 10 % of the schedule, where the composition is laid out.")
    ckpt = checkpoint(wf, SDXL)
    positive, negative = prompts(wf, ckpt)
    model = wf.add("PatchLab_DeepCache", model=ckpt[0], interval=3, depth=1, start_percent=0.1, end_percent=1.0)
    latent = wf.add("EmptyLatentImage", width=1024, height=1024, batch_size=1)
    first = wf.add("KSampler", model=model[0], seed=42, steps=20, cfg=7.0, sampler_name="dpmpp_2m",
                   scheduler="karras", positive=positive[0], negative=negative[0], latent_image=latent[0], denoise=1.0)
    larger = wf.add("LatentUpscaleBy", samples=first[0], upscale_method="nearest-exact", scale_by=1.5)
    second = wf.add("KSampler", model=model[0], seed=42, steps=20, cfg=7.0, sampler_name="dpmpp_2m",
                    scheduler="karras", positive=positive[0], negative=negative[0], latent_image=larger[0],
                    denoise=0.5)
    image = wf.add("VAEDecode", samples=second[0], vae=ckpt[2])
    wf.add("SaveImage", images=image[0], filename_prefix="PatchLab/deep_cache_sdxl_hires")
