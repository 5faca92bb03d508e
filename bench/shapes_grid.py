"""The README's picture: prompts (rows) x nodes (columns) on the trained reference models.

Every cell is one 20-step euler sample at 128x128 px (16x16 latent), the same seed and so
the same initial noise in every column, so a column shows what its node changes; the
columns of each model sit under its name. Writes ``figures/shapes_grid.png``.

    .venv/bin/python bench/shapes_grid.py
    .venv/bin/python bench/shapes_grid.py --seed 2 --out /tmp/grid.png
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import _common

PROMPTS = ("red circle", "blue square", "yellow triangle", "white circle")
# (label, node id or None, node inputs, CFG or None for the model's recommended CFG 5)
Column = Tuple[str, Optional[str], Dict, Optional[float]]
TOME = {"ratio": 0.5, "max_downsample": 1}  # at 128 px only the full-resolution layers have tokens to merge
COLUMNS: Dict[str, Tuple[Column, ...]] = {
    "sd15_shapes": (
        ("full", None, {}, None),
        ("StepCache", "PatchLab_StepCache", {}, None),
        ("DeepCache 3", "PatchLab_DeepCache", {"interval": 3}, None),
        ("ToMe 0.5", "PatchLab_TokenMerging", TOME, None),
        ("SAG", "PatchLab_SelfAttentionGuidance", {}, None),
        ("CFG 1", None, {}, 1.0),
        ("CFG 1 + NAG", "PatchLab_NormalizedAttentionGuidance", {}, 1.0),
    ),
    "flux_shapes": (
        ("full", None, {}, None),
        ("StepCache", "PatchLab_StepCache", {}, None),
        ("CFG 1", None, {}, 1.0),
        ("CFG 1 + NAG", "PatchLab_NormalizedAttentionGuidance", {}, 1.0),
    ),
}
TILE, PAD, LEFT, TOP = 128, 4, 116, 40


def sample_columns(name: str, columns: Sequence[Column], prompts: Sequence[str], seed: int,
                   memo: Optional[Dict] = None) -> List[Tuple[str, object]]:
    """(label, IMAGE [rows, 128, 128, 3]) per column on trained model ``name``; ``memo`` keeps samples by
    (model, node, inputs, CFG) across calls."""
    from devtools.testkit.shapes import evaluate, models
    from patchlab.nodes import NODE_CLASS_MAPPINGS

    memo = {} if memo is None else memo
    if name not in memo:
        memo[name] = models.load(name)
    trained = memo[name]
    out = []
    for label, node_id, inputs, cfg in columns:
        key = (name, node_id, tuple(sorted(inputs.items())), cfg, tuple(prompts), seed)
        if key not in memo:
            model = trained.model if node_id is None else evaluate.with_defaults(
                NODE_CLASS_MAPPINGS[node_id], trained.model, **inputs)
            memo[key] = trained.decode(evaluate.sample(trained, prompts, model=model, cfg=cfg, seed=seed).latents)
        out.append((label, memo[key]))
    return out


def draw(groups: Sequence[Tuple[str, List[Tuple[str, object]]]], prompts: Sequence[str], left: int = LEFT):
    """A white canvas: each group's name over its columns, column labels, prompts down the left (``left`` px)."""
    import numpy as np
    from PIL import Image, ImageDraw

    columns = sum(len(cells) for _, cells in groups)
    width = left + columns * (TILE + PAD) + (len(groups) - 1) * 2 * PAD
    height = TOP + len(prompts) * (TILE + PAD)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    pen = ImageDraw.Draw(canvas)
    x = left
    for group, cells in groups:
        span = len(cells) * (TILE + PAD) - PAD
        pen.text((x + 2, 4), group, fill=(0, 0, 0))
        pen.line([(x, 18), (x + span, 18)], fill=(120, 120, 120))
        for label, images in cells:
            pen.text((x + 4, 22), label, fill=(0, 0, 0))
            for row in range(len(prompts)):
                pixels = (images[row].clamp(0, 1).numpy() * 255).astype(np.uint8)
                canvas.paste(Image.fromarray(pixels), (x, TOP + row * (TILE + PAD)))
            x += TILE + PAD
        x += 2 * PAD
    for row, text in enumerate(prompts):
        pen.text((6, TOP + row * (TILE + PAD) + TILE // 2 - 6), text, fill=(0, 0, 0))
    return canvas


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=_common.REPO_ROOT / "bench" / "figures" / "shapes_grid.png")
    args = parser.parse_args()
    _common.boot(cpu=True)
    import torch

    groups = [(name, sample_columns(name, columns, PROMPTS, args.seed)) for name, columns in COLUMNS.items()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    draw(groups, PROMPTS).save(args.out)
    print(f"{args.out}: {len(PROMPTS)} prompts x {sum(len(c) for _, c in groups)} columns; seed {args.seed}, "
          f"torch {torch.__version__}")


if __name__ == "__main__":
    main()
