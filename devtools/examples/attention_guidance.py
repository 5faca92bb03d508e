"""Example workflows of the attention-guidance nodes (SAG, PAG, SEG)."""

from __future__ import annotations

from ..workflows import Builder
from ._common import SD15, SDXL, checkpoint, example, prompts, sample_and_save


def guided(wf: Builder, ckpt_name: str, prefix: str, cfg: float, size: int, *patches) -> None:
    ckpt = checkpoint(wf, ckpt_name)
    positive, negative = prompts(wf, ckpt)
    model = ckpt[0]
    for node, inputs in patches:
        model = wf.add(node, model=model, **inputs)[0]
    latent = wf.add("EmptyLatentImage", width=size, height=size, batch_size=1)
    sample_and_save(wf, model, ckpt, positive[0], negative[0], latent[0], prefix, steps=25, cfg=cfg,
                    sampler="euler", scheduler="normal")


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
