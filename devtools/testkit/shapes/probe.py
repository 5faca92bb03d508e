"""Does the video model listen to the direction word? Its denoising loss on held-out clips with the asked prompt,
the opposite direction, no direction, and the empty prompt, per noise level.

A model that has learned the direction has a clearly lower loss with the asked direction than with the opposite
one; one that ignores it has the same loss for both. A second, more sensitive reading (``next_frames``) gives the
first frame clearly (sigma 0.2) and the others noisy (0.95), as ``train.py --frame-noise`` trains: where the object
is in the later frames then depends on the word. Cheap (forward passes only), so it can follow a training run:

    python -m devtools.testkit.shapes.probe wan_shapes \\
        --weights devtools/testkit/shapes/weights/in_training/wan_shapes.safetensors
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Dict, List

import torch

if __name__ == "__main__":  # run as a command: ComfyUI first, models.py imports it
    from devtools import bootstrap

    bootstrap.import_comfyui(cpu=True)

from . import data, models  # noqa: E402

log = logging.getLogger(__name__)
SIGMAS = (0.95, 0.9, 0.8, 0.6, 0.4, 0.2)
OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}


def prompts(clips: data.Clips, variant: str) -> List[str]:
    """Per clip, its prompt as ``variant`` words it: ``asked``, ``opposite`` (the other way), ``none`` (no
    direction) or ``empty``."""
    out = []
    for c, s, d in zip(clips.colour.tolist(), clips.shape.tolist(), clips.direction.tolist()):
        direction = data.DIRECTIONS[d]
        words = {"asked": f"moving {direction}", "opposite": f"moving {OPPOSITE[direction]}", "none": ""}
        out.append("" if variant == "empty" else f"{data.COLOUR_NAMES[c]} {data.SHAPES[s]} {words[variant]}".strip())
    return out


@torch.no_grad()
def direction_losses(trained: models.Trained, count: int = 64, seed: int = 777) -> Dict[float, Dict[str, float]]:
    """Per sigma, the mean squared error of the network's velocity [B, 16, T, h, w] on ``count`` held-out clips
    noised to it, per prompt variant (the same noise for every variant)."""
    network = trained.model.model.diffusion_model.float().eval()
    sampling = trained.model.model.model_sampling
    clips = data.held_out_clips(count, seed=seed)
    x0 = models.clips_to_internal(clips.frames, models.spec(trained.name).latent_channels)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed + 1))
    contexts = {v: torch.cat([trained.encode(p)[0][0] for p in prompts(clips, v)])
                for v in ("asked", "opposite", "none", "empty")}
    out = {}
    for value in SIGMAS:
        sigma = torch.full((count,), value)
        x = sampling.noise_scaling(sigma.view(-1, 1, 1, 1, 1), noise, x0)
        out[value] = {v: round(float((network(x, sampling.timestep(sigma).float(), context=context)
                                      - (noise - x0)).square().mean()), 5) for v, context in contexts.items()}
    return out


NEXT_FRAMES_SIGMAS = (0.2, 0.95)  # the first frame's, the others'


@torch.no_grad()
def next_frames_losses(trained: models.Trained, count: int = 64, seed: int = 777) -> Dict[str, float]:
    """The mean squared error of the velocity on frames 2-4 of ``count`` held-out clips whose first frame is noised to
    sigma 0.2 and the others to 0.95 (one timestep per frame, :data:`NEXT_FRAMES_SIGMAS`), per prompt variant."""
    network = trained.model.model.diffusion_model.float().eval()
    sampling = trained.model.model.model_sampling
    clips = data.held_out_clips(count, seed=seed)
    x0 = models.clips_to_internal(clips.frames, models.spec(trained.name).latent_channels)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed + 1))
    frames = x0.shape[2]
    sigma = torch.full((frames,), NEXT_FRAMES_SIGMAS[1])
    sigma[0] = NEXT_FRAMES_SIGMAS[0]
    per_frame = sigma.view(1, 1, frames, 1, 1)
    x = per_frame * noise + (1 - per_frame) * x0  # the flow model's noise_scaling, per frame
    timestep = sampling.timestep(sigma).float().expand(count, frames)
    out = {}
    for variant in ("asked", "opposite", "none"):
        context = torch.cat([trained.encode(p)[0][0] for p in prompts(clips, variant)])
        error = network(x, timestep, context=context) - (noise - x0)
        out[variant] = round(float(error[:, :, 1:].square().mean()), 5)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", choices=models.VIDEO_NAMES)
    parser.add_argument("--weights", type=Path, default=None, help="this weights file instead of the committed one")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    trained = models.load(args.name, path=args.weights, check=args.weights is None)
    print(json.dumps({"per_sigma": direction_losses(trained), "next_frames": next_frames_losses(trained)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
