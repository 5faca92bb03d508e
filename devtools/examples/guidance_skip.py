"""Example workflows of the guidance-skipping nodes: GuidanceInterval, AdaptiveGuidance, and a composition stack."""

from __future__ import annotations

from ._common import SD15, SDXL, checkpoint, example, prompts, sample_and_save
from .builder import Builder


def _txt2img(wf: Builder, ckpt_name: str, prefix: str, model_fn, cfg: float = 7.0, size: int = 1024) -> None:
    ckpt = checkpoint(wf, ckpt_name)
    positive, negative = prompts(wf, ckpt)
    model = model_fn(ckpt[0])
    latent = wf.add("EmptyLatentImage", width=size, height=size, batch_size=1)
    sample_and_save(wf, model, ckpt, positive[0], negative[0], latent[0], prefix, steps=20, cfg=cfg,
                    sampler="euler", scheduler="normal")


@example("guidance_interval")
def guidance_interval(wf: Builder) -> None:
    wf.note("Guidance Interval", "CFG only where it helps: the paper's SD-XL interval, sigma 0.28-5.42 (18.6 % to "
            "92.8 % of the schedule). The 6 of 20 steps outside it skip the negative prompt: 34 model evaluations "
            "instead of 40.")
    _txt2img(wf, SDXL, "guidance_interval",
             lambda model: wf.add("PatchLab_GuidanceInterval", model=model, start_percent=0.186,
                                  end_percent=0.928)[0])


@example("adaptive_guidance")
def adaptive_guidance(wf: Builder) -> None:
    wf.note("Adaptive Guidance", "CFG stops for the rest of the run once the positive and negative predictions "
            "agree (cosine similarity above 0.991, the paper's threshold); the remaining steps skip the negative "
            "prompt. The log says how many evaluations were saved.")
    _txt2img(wf, SDXL, "adaptive_guidance",
             lambda model: wf.add("PatchLab_AdaptiveGuidance", model=model, threshold=0.991, start_percent=0.0)[0])


@example("guidance_skip_stack")
def guidance_skip_stack(wf: Builder) -> None:
    wf.note("Guidance skipping in a stack", "Guidance Interval and Adaptive Guidance share one decision per step "
            "and chain with the CFG-space nodes (PatchLab's RescaleCFG and APG, ComfyUI's RescaleCFG in the "
            "CFG-function slot), PAG and SAG (SAG keeps the negative pass inside its window, 30-60 %) and FreeU_V2.")

    def stack(model):
        model = wf.add("PatchLab_FreeU_V2", model=model, b1=1.3, b2=1.4, s1=0.9, s2=0.2)[0]
        model = wf.add("PatchLab_GuidanceInterval", model=model, start_percent=0.186, end_percent=0.928)[0]
        model = wf.add("PatchLab_SelfAttentionGuidance", model=model, scale=0.5, blur_sigma=2.0, threshold=1.0,
                       block="middle.0.0", start_percent=0.3, end_percent=0.6)[0]
        model = wf.add("PatchLab_PerturbedAttentionGuidance", model=model, scale=3.0, blocks="auto", rescale=0.0,
                       start_percent=0.0, end_percent=1.0)[0]
        model = wf.add("PatchLab_AdaptiveProjectedGuidance", model=model, eta=0.5, norm_threshold=15.0,
                       momentum=0.0, mode="paper", start_percent=0.0, end_percent=1.0)[0]
        model = wf.add("PatchLab_AdaptiveGuidance", model=model, threshold=0.991, start_percent=0.5)[0]
        model = wf.add("PatchLab_RescaleCFG", model=model, multiplier=0.7, start_percent=0.0, end_percent=1.0)[0]
        return wf.add("RescaleCFG", model=model, multiplier=0.5)[0]

    _txt2img(wf, SD15, "guidance_skip_stack", stack, cfg=6.0, size=512)
