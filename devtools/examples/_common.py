"""Building blocks shared by the example workflows: checkpoints, prompts, sampling, saving."""

from __future__ import annotations

from typing import Callable, Dict, Tuple

from .builder import Builder, NodeRef

SD15 = "v1-5-pruned-emaonly.safetensors"
SDXL = "sd_xl_base_1.0.safetensors"
SDXL_VPRED = "noobaiXLNAIXL_vPred10Version.safetensors"
SD3 = "sd3.5_medium_incl_clips_t5xxlfp8scaled.safetensors"
FLUX = "flux1-dev-fp8.safetensors"
AURAFLOW = "aura_flow_0.3.safetensors"
PLAYGROUND = "playground-v2.5-1024px-aesthetic.fp16.safetensors"
SD21_V = "v2-1_768-ema-pruned.safetensors"
CASCADE = "stable_cascade_stage_c.safetensors"
# Split files (UNETLoader / CLIPLoader / VAELoader), as ComfyUI's own templates for these families load them
WAN21 = "wan2.1_t2v_1.3B_fp16.safetensors"
WAN22_HIGH = "wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors"
WAN22_LOW = "wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors"
WAN_TEXT = "umt5_xxl_fp8_e4m3fn_scaled.safetensors"
WAN21_VAE = "wan_2.1_vae.safetensors"
ZIMAGE = "z_image_turbo_bf16.safetensors"
ZIMAGE_TEXT = "qwen_3_4b.safetensors"
FLUX_VAE = "ae.safetensors"

POSITIVE = "a lighthouse on a rocky coast at dusk, detailed, soft light"
NEGATIVE = "blurry, low quality, watermark"

EXAMPLES: Dict[str, Callable[[Builder], None]] = {}


def example(name: str):
    def register(fn):
        EXAMPLES[name] = fn
        return fn
    return register


def checkpoint(wf: Builder, name: str) -> NodeRef:
    return wf.add("CheckpointLoaderSimple", ckpt_name=name)


def prompts(wf: Builder, ckpt: NodeRef, positive: str = POSITIVE, negative: str = NEGATIVE) -> Tuple[NodeRef, NodeRef]:
    return (wf.add("CLIPTextEncode", text=positive, clip=ckpt[1]),
            wf.add("CLIPTextEncode", text=negative, clip=ckpt[1]))


def sample_and_save(wf: Builder, model, ckpt: NodeRef, positive, negative, latent, prefix: str,
                    steps: int = 20, cfg: float = 7.0, sampler: str = "euler", scheduler: str = "normal") -> NodeRef:
    samples = wf.add("KSampler", model=model, seed=42, steps=steps, cfg=cfg, sampler_name=sampler,
                     scheduler=scheduler, positive=positive, negative=negative, latent_image=latent, denoise=1.0)
    image = wf.add("VAEDecode", samples=samples[0], vae=ckpt[2])
    wf.add("SaveImage", images=image[0], filename_prefix=f"PatchLab/{prefix}")
    return samples


def schedule_preview(wf: Builder, model, compare, prefix: str, scheduler: str = "normal", steps: int = 20,
                     log_scale: bool = False) -> NodeRef:
    preview = wf.add("PatchLab_SigmaSchedulePreview", model=model, scheduler=scheduler, steps=steps, denoise=1.0,
                     log_scale=log_scale, compare_model=compare)
    wf.add("SaveImage", images=preview[0], filename_prefix=f"PatchLab/{prefix}_schedule")
    return preview


def diffusion_model(wf: Builder, name: str) -> NodeRef:
    """A diffusion model loaded alone from its file (UNETLoader)."""
    return wf.add("UNETLoader", unet_name=name, weight_dtype="default")


def split_files(wf: Builder, unet: str, text: str, clip_type: str, vae: str) -> Tuple[NodeRef, NodeRef, NodeRef]:
    """A diffusion model, text encoder and VAE loaded from their own files: (MODEL, CLIP, VAE) node refs."""
    return (diffusion_model(wf, unet),
            wf.add("CLIPLoader", clip_name=text, type=clip_type, device="default"),
            wf.add("VAELoader", vae_name=vae))
