"""A procedural, prompt-conditioned image set: one coloured shape on a dark background.

Every picture is drawn from a seeded ``torch.Generator`` (infinite, nothing downloaded).
The prompt names the object as ``"<colour> <shape>"``. Pictures are rendered with 4x4
supersampling (anti-aliased edges) at the requested size; the models see them at
16x16 (a 128x128 px picture after the test kit's 8x nearest upscale).

- background: one dark colour per picture (each channel in [0.02, 0.18]) with a faint
  linear gradient (+-0.03), every channel at most 0.25;
- object: one of ``COLOURS`` (+-0.03 jitter per channel), one of ``SHAPES`` (circle,
  axis-aligned square, upright isosceles triangle with height = base), covering 12-35 %
  of the picture (inside the 10-40 % the spec allows), anywhere it fits whole.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, List, Optional

import torch

COLOURS = {
    "red": (0.90, 0.15, 0.15),
    "green": (0.15, 0.75, 0.20),
    "blue": (0.20, 0.30, 0.95),
    "yellow": (0.95, 0.85, 0.15),
    "purple": (0.65, 0.20, 0.85),
    "white": (0.95, 0.95, 0.95),
}
SHAPES = ("circle", "square", "triangle")
COLOUR_NAMES = tuple(COLOURS)
BACKGROUND_MAX = 0.25
AREA_RANGE = (0.12, 0.35)
SUPERSAMPLE = 4


@dataclass
class Batch:
    """Pictures [B, 3, H, W] (RGB in 0-1), their labels [B] and prompts."""

    images: torch.Tensor
    colour: torch.Tensor
    shape: torch.Tensor
    area: torch.Tensor
    prompts: List[str]
    coverage: torch.Tensor  # [B] share of the picture the object covers (anti-aliased)


def prompt(colour: int, shape: int) -> str:
    return f"{COLOUR_NAMES[colour]} {SHAPES[shape]}"


def _extent(shape: torch.Tensor, area: torch.Tensor) -> torch.Tensor:
    """Half of the object's bounding box side (in picture widths) for an area fraction."""
    circle = torch.sqrt(area / math.pi)          # radius
    square = torch.sqrt(area) / 2                 # half side
    triangle = torch.sqrt(2 * area) / 2           # half base = half height (area = b * b / 2)
    return torch.stack([circle, square, triangle], -1).gather(-1, shape[:, None])[:, 0]


def render(colour: torch.Tensor, shape: torch.Tensor, area: torch.Tensor, centre: torch.Tensor,
           background: torch.Tensor, gradient: torch.Tensor, jitter: torch.Tensor, size: int = 16):
    """Draw pictures [B, 3, size, size] from their parameters; returns them and the coverage [B, 1, size, size].

    colour, shape: [B] indices into COLOUR_NAMES / SHAPES; area: [B] fraction of the picture;
    centre: [B, 2] (x, y) in picture widths; background: [B, 3]; gradient: [B, 2] per-unit
    slopes of the background's brightness along x and y; jitter: [B, 3] added to the colour.
    """
    fine = size * SUPERSAMPLE
    axis = (torch.arange(fine, dtype=torch.float32) + 0.5) / fine
    y, x = axis[None, :, None], axis[None, None, :]
    cx, cy = centre[:, 0, None, None], centre[:, 1, None, None]
    half = _extent(shape, area)[:, None, None]
    circle = (x - cx) ** 2 + (y - cy) ** 2 <= half ** 2
    square = ((x - cx).abs() <= half) & ((y - cy).abs() <= half)
    depth = (y - (cy - half)) / (2 * half)  # 0 at the apex, 1 at the base
    triangle = (depth >= 0) & (depth <= 1) & ((x - cx).abs() <= half * depth)
    masks = torch.stack([circle, square, triangle], 1).float()  # [B, 3, fine, fine]
    mask = masks.gather(1, shape[:, None, None, None].expand(-1, 1, fine, fine))
    mask = torch.nn.functional.avg_pool2d(mask, SUPERSAMPLE)  # [B, 1, size, size] coverage
    ramp = (axis[::SUPERSAMPLE] + 0.5 / size - 0.5)  # pixel centres of the coarse grid, centred
    shade = gradient[:, 0, None, None] * ramp[None, None, :] + gradient[:, 1, None, None] * ramp[None, :, None]
    back = (background[:, :, None, None] + shade[:, None]).clamp(0.0, BACKGROUND_MAX)
    palette = torch.tensor([COLOURS[name] for name in COLOUR_NAMES])
    front = (palette[colour] + jitter).clamp(0.0, 1.0)[:, :, None, None]
    return back * (1 - mask) + front * mask, mask


def draw(batch: int, generator: torch.Generator, size: int = 16, colour: Optional[torch.Tensor] = None,
         shape: Optional[torch.Tensor] = None) -> Batch:
    """A batch of random pictures; ``colour``/``shape`` [B] fix the labels (drawn at random otherwise)."""
    def uniform(*dims, low=0.0, high=1.0):
        return low + (high - low) * torch.rand(*dims, generator=generator)

    colour = torch.randint(len(COLOURS), (batch,), generator=generator) if colour is None else colour
    shape = torch.randint(len(SHAPES), (batch,), generator=generator) if shape is None else shape
    area = uniform(batch, low=AREA_RANGE[0], high=AREA_RANGE[1])
    half = _extent(shape, area)
    margin = 1.0 / size  # keep a pixel of background around the object
    low, high = half + margin, 1 - half - margin
    centre = torch.stack([low + (high - low) * uniform(batch), low + (high - low) * uniform(batch)], -1)
    background = uniform(batch, 3, low=0.02, high=0.18)
    gradient = uniform(batch, 2, low=-0.03, high=0.03) * 2
    jitter = uniform(batch, 3, low=-0.03, high=0.03)
    images, mask = render(colour, shape, area, centre, background, gradient, jitter, size)
    prompts = [prompt(int(c), int(s)) for c, s in zip(colour, shape)]
    return Batch(images, colour, shape, area, prompts, mask.flatten(1).mean(1))


def stream(batch: int, seed: int, size: int = 16) -> Iterator[Batch]:
    """An endless, seeded sequence of batches."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        yield draw(batch, generator, size)


def held_out(count: int, seed: int = 10_000, size: int = 16) -> Batch:
    """``count`` pictures from a seed no training run uses (the oracle's reference set)."""
    return draw(count, torch.Generator().manual_seed(seed), size)
