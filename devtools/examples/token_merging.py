"""Example workflows of the speed-up nodes (ToMe, ToDo)."""

from __future__ import annotations

from ._common import SD15, SDXL, checkpoint, example, prompts, sample_and_save
from .builder import Builder


def faster(wf: Builder, ckpt_name: str, prefix: str, size: int, node: str, **inputs) -> None:
    ckpt = checkpoint(wf, ckpt_name)
    positive, negative = prompts(wf, ckpt)
    model = wf.add(node, model=ckpt[0], **inputs)
    latent = wf.add("EmptyLatentImage", width=size, height=size, batch_size=1)
    sample_and_save(wf, model[0], ckpt, positive[0], negative[0], latent[0], prefix, steps=25, cfg=7.0,
                    sampler="dpmpp_2m", scheduler="karras")


TOME = {"ratio": 0.5, "stride_x": 2, "stride_y": 2, "destinations": "random", "seed": 0, "metric": "input",
        "merge": "queries, keys and values"}


@example("token_merging_sd15")
def token_merging_sd15(wf: Builder) -> None:
    wf.note("Token Merging, SD1.5", "ToMe at ratio 0.5 on SD1.5's full-resolution attention: about 2.5x faster "
            "model evaluations at 512x512 in our CPU bench, more at larger sizes. Lower the ratio if details blur.")
    faster(wf, SD15, "token_merging_sd15", 768, "PatchLab_TokenMerging", max_downsample=1, **TOME)


@example("token_merging_sdxl")
def token_merging_sdxl(wf: Builder) -> None:
    wf.note("Token Merging, SDXL", "SDXL has no attention at full resolution: max_downsample 2 reaches its 1/2 "
            "resolution layers (4 reaches the 1/4 layers too, faster but softer).")
    faster(wf, SDXL, "token_merging_sdxl", 1536, "PatchLab_TokenMerging", max_downsample=2, **TOME)


@example("token_downsampling")
def token_downsampling(wf: Builder) -> None:
    wf.note("Token Downsampling", "ToDo keeps every query and takes keys/values from a 2x coarser grid: as fast as "
            "ToMe at 0.5 with no similarity search. For SDXL use max_downsample 2. end_percent 0.8 turns it off for "
            "the last steps, which restores fine detail.")
    faster(wf, SD15, "token_downsampling", 1024, "PatchLab_TokenDownsampling", downsample_factor=2.0,
           max_downsample=1, method="nearest-exact", start_percent=0.0, end_percent=0.8)
