"""The video reference model's pictures: prompts (rows) x nodes (columns) on ``wan_shapes``, as clips.

Every cell is one 20-step euler clip at 128x128 px, length 13 (4 latent frames of 16x16), the same seed and so the
same initial noise in every column, so a column shows what its node changes. Writes two figures:

- ``figures/wan_clips.webp``: an animated WEBP, every cell playing its clip in step (what the demo's
  SaveAnimatedWEBP shows, one cell per run);
- ``figures/wan_clips.png``: the full-compute clips frame by frame (columns: frames 1-4), for where an animation
  does not play.

    .venv/bin/python bench/clips_grid.py
    .venv/bin/python bench/clips_grid.py --seed 2 --out /tmp/clips
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import List, Tuple

import _common
import shapes_grid

MODEL = "wan_shapes"
PROMPTS = ("red circle moving right", "blue square moving up", "yellow triangle moving left",
           "white circle moving down")
COLUMNS: Tuple[shapes_grid.Column, ...] = (
    ("full", None, {}, None),
    ("StepCache", "PatchLab_StepCache", {}, None),
    ("CFG 1", None, {}, 1.0),
    ("CFG 1 + NAG", "PatchLab_NormalizedAttentionGuidance", {}, 1.0),
)
FRAME_MS = 250  # four frames a second: the 13-frame clip's 4 latent frames
LEFT = 170  # room for "yellow triangle moving left"


def frames_of(cells: List[Tuple[str, object]], frames: int) -> List[List[Tuple[str, object]]]:
    """Per frame, the cells with that frame of each row's clip: IMAGE [rows * frames, H, W, 3] clip-major in,
    [rows, H, W, 3] per frame out."""
    return [[(label, images.unflatten(0, (-1, frames))[:, t]) for label, images in cells] for t in range(frames)]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=_common.REPO_ROOT / "bench" / "figures",
                        help="folder for wan_clips.webp and wan_clips.png")
    args = parser.parse_args()
    _common.boot(cpu=True)
    import torch

    from devtools.testkit.shapes import models

    frames = models.spec(MODEL).frames
    cells = shapes_grid.sample_columns(MODEL, COLUMNS, PROMPTS, args.seed)
    pictures = [shapes_grid.draw([(MODEL, frame)], PROMPTS, LEFT) for frame in frames_of(cells, frames)]
    args.out.mkdir(parents=True, exist_ok=True)
    animation = args.out / "wan_clips.webp"
    pictures[0].save(animation, save_all=True, append_images=pictures[1:], duration=FRAME_MS, loop=0, lossless=True)
    full = frames_of(cells[:1], frames)
    strip = [(f"frame {t + 1}", cell[0][1]) for t, cell in enumerate(full)]
    shapes_grid.draw([(f"{MODEL}, full compute", strip)], PROMPTS, LEFT).save(args.out / "wan_clips.png")
    print(f"{animation}: {len(PROMPTS)} prompts x {len(COLUMNS)} columns x {frames} frames; seed {args.seed}, "
          f"torch {torch.__version__}")


if __name__ == "__main__":
    main()
