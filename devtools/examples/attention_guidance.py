"""Example workflows of the attention-guidance nodes (SAG, PAG, SEG, SLG)."""

from __future__ import annotations

from ._common import (
    FLUX,
    FLUX_VAE,
    SD3,
    SD15,
    SDXL,
    ZIMAGE,
    ZIMAGE_TEXT,
    checkpoint,
    example,
    prompts,
    sample_and_save,
    split_files,
)
from ._common import NEGATIVE as NEGATIVE_TEXT
from .builder import Builder


def guided(wf: Builder, ckpt_name: str, prefix: str, cfg: float, size: int, *patches, flux: bool = False,
           latent_node: str = "EmptyLatentImage", scheduler: str = "normal", steps: int = 25) -> None:
    ckpt = checkpoint(wf, ckpt_name)
    positive, negative = prompts(wf, ckpt, negative="" if flux else NEGATIVE_TEXT)
    positive = wf.add("FluxGuidance", conditioning=positive[0], guidance=3.5) if flux else positive
    model = ckpt[0]
    for node, inputs in patches:
        model = wf.add(node, model=model, **inputs)[0]
    latent = wf.add(latent_node, width=size, height=size, batch_size=1)
    sample_and_save(wf, model, ckpt, positive[0], negative[0], latent[0], prefix, steps=steps, cfg=cfg,
                    sampler="euler", scheduler=scheduler)


SAG = ("PatchLab_SelfAttentionGuidance", {"scale": 0.5, "blur_sigma": 2.0, "threshold": 1.0, "block": "middle.0.0"})
PAG = ("PatchLab_PerturbedAttentionGuidance", {"scale": 3.0, "blocks": "middle", "rescale": 0.0})
SEG = ("PatchLab_SmoothedEnergyGuidance", {"scale": 3.0, "blur_sigma": 10.0, "blocks": "middle"})


@example("self_attention_guidance")
def self_attention_guidance(wf: Builder) -> None:
    wf.note("Self-Attention Guidance", "SAG sharpens regions the model is unsure about. It costs one extra model "
            "pass per step; lower CFG slightly (here 6 instead of 7).")
    guided(wf, SD15, "self_attention_guidance", 6.0, 512, SAG)


@example("perturbed_attention_guidance")
def perturbed_attention_guidance(wf: Builder) -> None:
    wf.note("Perturbed-Attention Guidance", "PAG on the middle block, scale 3 with CFG 4 (PAG scale + CFG = the CFG "
            "you would use alone). Try 'middle, output.1' for a stronger structural effect on SDXL.")
    guided(wf, SDXL, "perturbed_attention_guidance", 4.0, 1024, PAG)


@example("smoothed_energy_guidance")
def smoothed_energy_guidance(wf: Builder) -> None:
    wf.note("Smoothed Energy Guidance", "SEG smooths the middle block's attention energy (blur sigma 10, the paper's "
            "SDXL setting); 9999 is infinite blur.")
    guided(wf, SDXL, "smoothed_energy_guidance", 5.0, 1024, SEG)


@example("attention_guidance_stack")
def attention_guidance_stack(wf: Builder) -> None:
    wf.note("SAG + PAG + SEG", "All three on one model: each keeps its effect (no attention replace shadows "
            "another), and PAG and SEG share one batched extra model call per step.")
    guided(wf, SD15, "attention_guidance_stack", 4.0, 512, SAG, PAG, SEG)


DIT_PAG = ("PatchLab_PerturbedAttentionGuidance", {"scale": 1.5, "blocks": "auto", "rescale": 0.0,
                                                    "start_percent": 0.0, "end_percent": 1.0})
DIT_SEG = ("PatchLab_SmoothedEnergyGuidance", {"scale": 2.0, "blur_sigma": 10.0, "blocks": "auto",
                                                "start_percent": 0.0, "end_percent": 1.0})
SLG = ("PatchLab_SkipLayerGuidance", {"scale": 3.0, "blocks": "auto", "start_percent": 0.01, "end_percent": 0.15,
                                      "rescaling_scale": 0.0})


@example("attention_guidance_flux")
def attention_guidance_flux(wf: Builder) -> None:
    wf.note("PAG + SEG + SLG on Flux", "Flux dev is guidance-distilled: CFG 1, so no negative pass runs and the "
            "three guidances share one batched extra model call per step. 'auto' picks double.7-9 on Flux.1; "
            "SLG acts in the first 15 % of the schedule only.")
    guided(wf, FLUX, "attention_guidance_flux", 1.0, 1024, DIT_PAG, DIT_SEG, SLG, flux=True,
           latent_node="EmptySD3LatentImage", scheduler="simple", steps=20)


@example("attention_guidance_sd35")
def attention_guidance_sd35(wf: Builder) -> None:
    wf.note("Skip-Layer Guidance + PAG on SD3.5", "SLG on joint.7-9 (the SD3.5 recommendation, 'auto') at scale 3 "
            "for 1-15 % of the schedule, PAG at a gentle 1.5 on the same blocks; both in one extra call per step.")
    guided(wf, SD3, "attention_guidance_sd35", 4.5, 1024, SLG, DIT_PAG, latent_node="EmptySD3LatentImage",
           scheduler="simple", steps=25)


@example("token_perturbation_guidance")
def token_perturbation_guidance(wf: Builder) -> None:
    wf.note("Token Perturbation Guidance", "TPG shuffles the tokens entering SDXL's input.7 and input.8 transformers "
            "('auto', the paper's choice) in one extra pass and guides away from it, scale 3 with CFG 3. The shuffles "
            "come from the node's seed: the same seed gives the same picture.")
    guided(wf, SDXL, "token_perturbation_guidance", 3.0, 1024,
           ("PatchLab_TokenPerturbationGuidance", {"scale": 3.0, "blocks": "auto", "seed": 0}))


@example("attention_guidance_zimage")
def attention_guidance_zimage(wf: Builder) -> None:
    wf.note("Skip-Layer Guidance, Z-Image Turbo", "Z-Image Turbo samples at CFG 1, so there is no negative pass; SLG "
            "adds one extra pass with the chosen layers skipped, early in the schedule ('auto': single.11-14 of 30, "
            "a starting point of ours). ComfyUI's own SkipLayerGuidanceDiT has no layer to skip on this model.")
    model, clip, vae = split_files(wf, ZIMAGE, ZIMAGE_TEXT, "lumina2", FLUX_VAE)
    shifted = wf.add("ModelSamplingAuraFlow", model=model[0], shift=3.0)
    guided_model = wf.add("PatchLab_SkipLayerGuidance", model=shifted[0], scale=2.0, blocks="auto",
                          start_percent=0.01, end_percent=0.3, rescaling_scale=0.0)
    positive = wf.add("CLIPTextEncode", text="a lighthouse on a rocky coast at dusk, detailed", clip=clip[0])
    negative = wf.add("CLIPTextEncode", text="", clip=clip[0])
    latent = wf.add("EmptySD3LatentImage", width=1024, height=1024, batch_size=1)
    samples = wf.add("KSampler", model=guided_model[0], seed=42, steps=9, cfg=1.0, sampler_name="res_multistep",
                     scheduler="simple", positive=positive[0], negative=negative[0], latent_image=latent[0],
                     denoise=1.0)
    image = wf.add("VAEDecode", samples=samples[0], vae=vae[0])
    wf.add("SaveImage", images=image[0], filename_prefix="PatchLab/attention_guidance_zimage")
