"""Example workflows of Normalized Attention Guidance."""

from __future__ import annotations

from ._common import FLUX, SDXL, WAN21, WAN21_VAE, WAN_TEXT, checkpoint, example, split_files
from .builder import Builder


@example("nag_wan21")
def nag_wan21(wf: Builder) -> None:
    wf.note("Normalized Attention Guidance, Wan 2.1 at CFG 1", "With a speed LoRA (CausVid, lightx2v) Wan samples at "
            "CFG 1 and the negative prompt does nothing. NAG applies it inside the cross-attention: one more "
            "attention per block, no negative pass (scale 11, tau 2.5, alpha 0.25: kijai's WanVideoNAG defaults). "
            "The negative comes from the sampler's negative input, as with CFG.")
    model, clip, vae = split_files(wf, WAN21, WAN_TEXT, "wan", WAN21_VAE)
    shifted = wf.add("ModelSamplingSD3", model=model[0], shift=8.0)
    guided = wf.add("PatchLab_NormalizedAttentionGuidance", model=shifted[0], scale=11.0, tau=2.5, alpha=0.25,
                    start_percent=0.0, end_percent=1.0)
    positive = wf.add("CLIPTextEncode", text="a red fox running through fresh snow, cinematic", clip=clip[0])
    negative = wf.add("CLIPTextEncode", text="static, blurry, low quality, watermark", clip=clip[0])
    latent = wf.add("EmptyHunyuanLatentVideo", width=832, height=480, length=33, batch_size=1)
    samples = wf.add("KSampler", model=guided[0], seed=42, steps=8, cfg=1.0, sampler_name="euler",
                     scheduler="simple", positive=positive[0], negative=negative[0], latent_image=latent[0],
                     denoise=1.0)
    frames = wf.add("VAEDecode", samples=samples[0], vae=vae[0])
    wf.add("SaveImage", images=frames[0], filename_prefix="PatchLab/nag_wan21")


@example("nag_sdxl")
def nag_sdxl(wf: Builder) -> None:
    wf.note("Normalized Attention Guidance, SDXL at CFG 1", "Few-step SDXL models (DMD2, Lightning) sample at CFG 1. "
            "NAG gives them a negative prompt back at the cost of one more cross-attention per transformer (scale "
            "3 as in the paper's DMD2 demo). Load your few-step checkpoint in place of the base model.")
    ckpt = checkpoint(wf, SDXL)
    guided = wf.add("PatchLab_NormalizedAttentionGuidance", model=ckpt[0], scale=3.0, tau=2.5, alpha=0.25,
                    start_percent=0.0, end_percent=1.0)
    positive = wf.add("CLIPTextEncode", text="portrait of a researcher in a library, soft light", clip=ckpt[1])
    negative = wf.add("CLIPTextEncode", text="glasses, blurry", clip=ckpt[1])
    latent = wf.add("EmptyLatentImage", width=1024, height=1024, batch_size=1)
    samples = wf.add("KSampler", model=guided[0], seed=42, steps=4, cfg=1.0, sampler_name="lcm",
                     scheduler="sgm_uniform", positive=positive[0], negative=negative[0], latent_image=latent[0],
                     denoise=1.0)
    image = wf.add("VAEDecode", samples=samples[0], vae=ckpt[2])
    wf.add("SaveImage", images=image[0], filename_prefix="PatchLab/nag_sdxl")


@example("nag_flux")
def nag_flux(wf: Builder) -> None:
    wf.note("Normalized Attention Guidance, Flux dev at CFG 1", "Guidance-distilled Flux samples at CFG 1: no negative "
            "pass, so the negative prompt does nothing. NAG applies it inside the joint attention (scale 5, tau 2.5, "
            "alpha 0.25: the paper's Flux values). Flux guidance 3.5 stays as usual.")
    ckpt = checkpoint(wf, FLUX)
    guided = wf.add("PatchLab_NormalizedAttentionGuidance", model=ckpt[0], scale=5.0, tau=2.5, alpha=0.25,
                    start_percent=0.0, end_percent=1.0)
    positive = wf.add("CLIPTextEncode", text="portrait of an AI researcher in a library, soft light", clip=ckpt[1])
    flux_guidance = wf.add("FluxGuidance", conditioning=positive[0], guidance=3.5)
    negative = wf.add("CLIPTextEncode", text="glasses", clip=ckpt[1])
    latent = wf.add("EmptySD3LatentImage", width=1024, height=1024, batch_size=1)
    samples = wf.add("KSampler", model=guided[0], seed=42, steps=20, cfg=1.0, sampler_name="euler",
                     scheduler="simple", positive=flux_guidance[0], negative=negative[0], latent_image=latent[0],
                     denoise=1.0)
    image = wf.add("VAEDecode", samples=samples[0], vae=ckpt[2])
    wf.add("SaveImage", images=image[0], filename_prefix="PatchLab/nag_flux")
