"""A picture grid for the README: prompts (rows) x nodes (columns) on the trained SD1.5-layout model.

Every cell is one 20-step euler sample at 128x128 px (16x16 latent), the same seed in
every column, so a column shows what its node changes. Writes ``figures/shapes_grid.png``.

    .venv/bin/python bench/shapes_grid.py
    .venv/bin/python bench/shapes_grid.py --model flux_shapes --out bench/figures/shapes_grid_flux.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import _common

PROMPTS = ("red circle", "blue square", "yellow triangle", "white circle", "green triangle", "purple square")
COLUMNS = (
    ("full", None, {}, None),
    ("CFG 1", None, {}, 1.0),
    ("StepCache", "PatchLab_StepCache", {}, None),
    ("DeepCache 3", "PatchLab_DeepCache", {"interval": 3}, None),
    ("ToMe 0.5", "PatchLab_TokenMerging", {"ratio": 0.5, "max_downsample": 1}, None),
    ("PAG", "PatchLab_PerturbedAttentionGuidance", {}, None),
    ("SEG", "PatchLab_SmoothedEnergyGuidance", {}, None),
    ("SAG", "PatchLab_SelfAttentionGuidance", {}, None),
    ("FreeU", "PatchLab_FreeU", {}, None),
)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sd15_shapes", choices=["sd15_shapes", "flux_shapes"])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=_common.REPO_ROOT / "bench" / "figures" / "shapes_grid.png")
    args = parser.parse_args()
    _common.boot(cpu=True)
    import numpy as np
    import torch
    from PIL import Image, ImageDraw

    from devtools.testkit.shapes import evaluate, models
    from patchlab.nodes import NODE_CLASS_MAPPINGS

    trained = models.load(args.model)
    cells, labels = [], []
    for label, node_id, inputs, cfg in COLUMNS:
        try:
            model = trained.model if node_id is None else evaluate.with_defaults(
                NODE_CLASS_MAPPINGS[node_id], trained.model, **inputs)
        except Exception as error:  # noqa: BLE001 - a node that refuses this model leaves its column out
            print(f"{label}: {error}")
            continue
        samples = evaluate.sample(trained, PROMPTS, model=model, cfg=cfg, seed=args.seed)
        cells.append(trained.decode(samples.latents))  # [rows, 128, 128, 3]
        labels.append(label)
    tile, pad, left, top = 128, 4, 130, 24
    width = left + len(cells) * (tile + pad)
    height = top + len(PROMPTS) * (tile + pad)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for column, (images, label) in enumerate(zip(cells, labels)):
        x = left + column * (tile + pad)
        draw.text((x + 4, 6), label, fill=(0, 0, 0))
        for row in range(len(PROMPTS)):
            pixels = (images[row].clamp(0, 1).numpy() * 255).astype(np.uint8)
            canvas.paste(Image.fromarray(pixels), (x, top + row * (tile + pad)))
    for row, text in enumerate(PROMPTS):
        draw.text((6, top + row * (tile + pad) + tile // 2 - 6), text, fill=(0, 0, 0))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(args.out)
    print(f"{args.out}: {len(PROMPTS)} prompts x {len(cells)} columns ({', '.join(labels)}); "
          f"{args.model}, seed {args.seed}, torch {torch.__version__}")


if __name__ == "__main__":
    main()
