"""Example workflows of the CFG-space, UNet-block and inpainting nodes."""

from __future__ import annotations

from typing import Callable, Dict

from ._common import SD3, SD15, SDXL, SDXL_VPRED, checkpoint, example, prompts, sample_and_save
from .builder import Builder, NodeRef

EXAMPLE_IMAGE = "example.png"  # an image with an alpha channel: transparent = area to inpaint


def txt2img(wf: Builder, ckpt_name: str, prefix: str, patch: Callable[[Builder, NodeRef], NodeRef],
            cfg: float = 7.0, size: int = 1024, steps: int = 25, sampler: str = "dpmpp_2m",
            scheduler: str = "karras", latent_node: str = "EmptyLatentImage") -> None:
    ckpt = checkpoint(wf, ckpt_name)
    positive, negative = prompts(wf, ckpt)
    model = patch(wf, ckpt[0])
    latent = wf.add(latent_node, width=size, height=size, batch_size=1)
    sample_and_save(wf, model, ckpt, positive[0], negative[0], latent[0], prefix, steps=steps, cfg=cfg,
                    sampler=sampler, scheduler=scheduler)


def single(node: str, **inputs) -> Callable[[Builder, NodeRef], NodeRef]:
    return lambda wf, model: wf.add(node, model=model, **inputs)[0]


SIMPLE: Dict[str, tuple] = {
    # example name: (note, checkpoint, cfg, node, inputs)
    "rescale_cfg": ("RescaleCFG keeps a v-prediction model's high CFG from burning: multiplier 0.7 as in the paper.",
                    SDXL_VPRED, 7.0, "PatchLab_RescaleCFG", {"multiplier": 0.7}),
    "renorm_cfg": ("RenormCFG caps the guided prediction's norm at renorm_cfg x the positive's, and truncates "
                   "guidance as the paper does: truncate 'paper' with cfg_trunc 70 guides the first 70 % of the "
                   "schedule; the last 30 % skip the negative prompt (one model pass per step instead of two).",
                   SDXL, 8.0, "PatchLab_RenormCFG", {"cfg_trunc": 70.0, "renorm_cfg": 1.0, "truncate": "paper"}),
    "cfg_norm": ("CFGNorm shrinks the CFG result wherever its channel norm exceeds the positive prediction's.",
                 SDXL, 9.0, "PatchLab_CFGNorm", {"strength": 1.0}),
    "adaptive_projected_guidance": ("APG at a high CFG: the parallel component damped (eta 0), norm cap 15, "
                                    "reverse momentum -0.5, as in the paper.",
                                    SDXL, 12.0, "PatchLab_AdaptiveProjectedGuidance",
                                    {"eta": 0.0, "norm_threshold": 15.0, "momentum": -0.5, "mode": "paper"}),
    "tangential_damping_cfg": ("TCFG aligns the negative prediction with the positive one before guiding.",
                               SDXL, 7.0, "PatchLab_TangentialDampingCFG", {}),
    "mahiro": ("Mahiro guidance follows the positive prompt's direction rather than the negative's opposite.",
               SD15, 7.0, "PatchLab_Mahiro", {}),
    "fresca": ("FreSca: high frequencies of the guidance x1.25 for crisper detail, structure unchanged.",
               SDXL, 7.0, "PatchLab_FreSca", {"scale_low": 1.0, "scale_high": 1.25, "freq_cutoff": 20}),
    "freeu": ("FreeU with the paper's SD1.5 values.", SD15, 7.0, "PatchLab_FreeU",
              {"b1": 1.5, "b2": 1.6, "s1": 0.9, "s2": 0.2}),
    "freeu_v2": ("FreeU v2 with the paper's SDXL values.", SDXL, 7.0, "PatchLab_FreeU_V2",
                 {"b1": 1.3, "b2": 1.4, "s1": 0.9, "s2": 0.2}),
}


def _simple(name: str):
    note, ckpt_name, cfg, node, inputs = SIMPLE[name]

    def build(wf: Builder) -> None:
        wf.note(node.replace("PatchLab_", ""), note)
        txt2img(wf, ckpt_name, name, single(node, **inputs), cfg=cfg, size=512 if ckpt_name == SD15 else 1024)
    return build


for _name in SIMPLE:
    example(_name)(_simple(_name))


@example("cfg_zero_star")
def cfg_zero_star(wf: Builder) -> None:
    wf.note("CFG-Zero*", "CFG-Zero* on a flow model (SD3.5): the optimised negative scale and zero-init of the "
            "first step (about 4% of 25 steps), as in the paper.")
    txt2img(wf, SD3, "cfg_zero_star",
            single("PatchLab_CFGZeroStar", mode="paper", zero_init_steps=1), cfg=4.5, steps=25, sampler="euler",
            scheduler="simple", latent_node="EmptySD3LatentImage")


def inpaint_latent(wf: Builder, ckpt: NodeRef):
    image = wf.add("LoadImage", image=EXAMPLE_IMAGE)
    latent = wf.add("VAEEncode", pixels=image[0], vae=ckpt[2])
    return wf.add("SetLatentNoiseMask", samples=latent[0], mask=image[1])


def inpaint_and_save(wf: Builder, ckpt: NodeRef, model, prefix: str, cfg: float = 7.0) -> None:
    positive, negative = prompts(wf, ckpt)
    masked = inpaint_latent(wf, ckpt)
    sample_and_save(wf, model, ckpt, positive[0], negative[0], masked[0], prefix, steps=25, cfg=cfg,
                    sampler="dpmpp_2m", scheduler="karras")


@example("differential_diffusion")
def differential_diffusion(wf: Builder) -> None:
    wf.note("Differential Diffusion", "Soft inpainting: the image's alpha channel is the mask (transparent = "
            "change fully, half-transparent = change half). Load your own image with a painted alpha.")
    ckpt = checkpoint(wf, SDXL)
    model = wf.add("PatchLab_DifferentialDiffusion", model=ckpt[0], strength=1.0)
    inpaint_and_save(wf, ckpt, model[0], "differential_diffusion")


@example("guidance_stack")
def guidance_stack(wf: Builder) -> None:
    wf.note("Guidance stack", "PatchLab patches compose: RescaleCFG, APG and FreSca act on the CFG result or its "
            "inputs (lists of hooks, no slot taken), FreeU_V2 on the UNet blocks and Differential Diffusion on "
            "the inpainting mask. Remove any node and the others keep working.")
    ckpt = checkpoint(wf, SDXL)
    model = wf.add("PatchLab_FreeU_V2", model=ckpt[0], b1=1.3, b2=1.4, s1=0.9, s2=0.2)
    model = wf.add("PatchLab_AdaptiveProjectedGuidance", model=model[0], eta=0.5, norm_threshold=15.0,
                   momentum=-0.5, mode="paper")
    model = wf.add("PatchLab_FreSca", model=model[0], scale_low=1.0, scale_high=1.25, freq_cutoff=20)
    model = wf.add("PatchLab_RescaleCFG", model=model[0], multiplier=0.7)
    model = wf.add("PatchLab_DifferentialDiffusion", model=model[0], strength=1.0)
    inpaint_and_save(wf, ckpt, model[0], "guidance_stack", cfg=9.0)
