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

Clips (``draw_clips``, for the video model): ``FRAMES`` pictures of one object on one
background, the object moving in a straight line at constant speed in one of
``DIRECTIONS``, its centre travelling 25-50 % of the picture's side from the first frame
to the last, whole inside every frame; the prompt is ``"<colour> <shape> moving <direction>"``.
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


def coverage(half: torch.Tensor, centre: torch.Tensor, size: int = 16) -> torch.Tensor:
    """Coverage [B, 3, size, size] in 0-1 of a circle, a square and a triangle (apex up, base down) with
    half-extent ``half`` [B] (radius, half side, half base = half height; picture widths) centred at ``centre``
    [B, 2] (x, y; the triangle's box centre), each pixel supersampled ``SUPERSAMPLE`` x ``SUPERSAMPLE``."""
    fine = size * SUPERSAMPLE
    axis = (torch.arange(fine, dtype=torch.float32) + 0.5) / fine
    y, x = axis[None, :, None], axis[None, None, :]
    cx, cy = centre[:, 0, None, None], centre[:, 1, None, None]
    half = half[:, None, None]
    circle = (x - cx) ** 2 + (y - cy) ** 2 <= half ** 2
    square = ((x - cx).abs() <= half) & ((y - cy).abs() <= half)
    depth = (y - (cy - half)) / (2 * half)  # 0 at the apex, 1 at the base
    triangle = (depth >= 0) & (depth <= 1) & ((x - cx).abs() <= half * depth)
    masks = torch.stack([circle, square, triangle], 1).float()  # [B, 3, fine, fine]
    return torch.nn.functional.avg_pool2d(masks, SUPERSAMPLE)


def render(colour: torch.Tensor, shape: torch.Tensor, area: torch.Tensor, centre: torch.Tensor,
           background: torch.Tensor, gradient: torch.Tensor, jitter: torch.Tensor, size: int = 16):
    """Draw pictures [B, 3, size, size] from their parameters; returns them and the coverage [B, 1, size, size].

    colour, shape: [B] indices into COLOUR_NAMES / SHAPES; area: [B] fraction of the picture;
    centre: [B, 2] (x, y) in picture widths; background: [B, 3]; gradient: [B, 2] per-unit
    slopes of the background's brightness along x and y; jitter: [B, 3] added to the colour.
    """
    mask = coverage(_extent(shape, area), centre, size).gather(
        1, shape[:, None, None, None].expand(-1, 1, size, size))  # [B, 1, size, size]
    fine = size * SUPERSAMPLE
    axis = (torch.arange(fine, dtype=torch.float32) + 0.5) / fine
    ramp = (axis[::SUPERSAMPLE] + 0.5 / size - 0.5)  # the shading's coordinate (as the models were trained)
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


# -- clips --------------------------------------------------------------------------------------------

FRAMES = 4  # latent frames of a 13-frame Wan clip (EmptyHunyuanLatentVideo: (13 - 1) // 4 + 1)
DIRECTIONS = ("left", "right", "up", "down")
STEPS = torch.tensor([[-1.0, 0.0], [1.0, 0.0], [0.0, -1.0], [0.0, 1.0]])  # (x, y) per direction; y points down
TRAVEL_RANGE = (0.25, 0.50)  # of the picture's side, first frame to last


@dataclass
class Clips:
    """Clips [B, T, 3, H, W] (RGB in 0-1), their labels [B], prompts and the object's centre [B, T, 2] (x, y)."""

    frames: torch.Tensor
    colour: torch.Tensor
    shape: torch.Tensor
    direction: torch.Tensor
    area: torch.Tensor
    prompts: List[str]
    centre: torch.Tensor
    coverage: torch.Tensor  # [B, T] share of each frame the object covers (anti-aliased)


def clip_prompt(colour: int, shape: int, direction: int) -> str:
    return f"{COLOUR_NAMES[colour]} {SHAPES[shape]} moving {DIRECTIONS[direction]}"


def max_clip_area(shape: torch.Tensor, size: int = 16) -> torch.Tensor:
    """[B] the largest area (fraction of the picture) of each shape that still leaves room to travel
    ``TRAVEL_RANGE[0]`` with a pixel of background on both sides (a triangle's box is its widest)."""
    half = (1 - 2.0 / size - TRAVEL_RANGE[0]) / 2
    per_shape = torch.tensor([math.pi * half ** 2, 4 * half ** 2, 2 * half ** 2])  # circle, square, triangle
    return per_shape[shape].clamp(max=AREA_RANGE[1])


def draw_clips(batch: int, generator: torch.Generator, size: int = 16, frames: int = FRAMES,
               colour: Optional[torch.Tensor] = None, shape: Optional[torch.Tensor] = None,
               direction: Optional[torch.Tensor] = None) -> Clips:
    """A batch of random clips; ``colour``/``shape``/``direction`` [B] fix the labels (drawn at random otherwise).

    The area is drawn from the pictures' range, capped per shape by :func:`max_clip_area` (triangles cover
    12-19.5 %, circles 12-30.7 %, squares 12-35 %); the travel uniformly from ``TRAVEL_RANGE`` as far as the
    object fits, the start so that the whole path lies inside the picture.
    """
    def uniform(*dims, low=0.0, high=1.0):
        return low + (high - low) * torch.rand(*dims, generator=generator)

    colour = torch.randint(len(COLOURS), (batch,), generator=generator) if colour is None else colour
    shape = torch.randint(len(SHAPES), (batch,), generator=generator) if shape is None else shape
    direction = torch.randint(len(DIRECTIONS), (batch,), generator=generator) if direction is None else direction
    area = AREA_RANGE[0] + (max_clip_area(shape, size) - AREA_RANGE[0]) * uniform(batch)
    half = _extent(shape, area)
    margin = 1.0 / size
    low, high = half + margin, 1 - half - margin  # where the centre may be
    room = high - low
    longest = room.clamp(max=TRAVEL_RANGE[1])
    travel = TRAVEL_RANGE[0] + (longest - TRAVEL_RANGE[0]) * uniform(batch)
    along = low + (room - travel) * uniform(batch)  # the start of a rightward or downward path
    across = low + room * uniform(batch)
    step = STEPS[direction]  # [B, 2]
    backwards = step.sum(-1) < 0  # left and up start at the far end
    start_along = torch.where(backwards, along + travel, along)
    horizontal = step[:, 0] != 0
    start_x = torch.where(horizontal, start_along, across)
    start_y = torch.where(horizontal, across, start_along)
    start = torch.stack([start_x, start_y], -1)
    progress = torch.linspace(0, 1, frames)
    centre = start[:, None] + progress[None, :, None] * travel[:, None, None] * step[:, None]  # [B, T, 2]
    background = uniform(batch, 3, low=0.02, high=0.18)
    gradient = uniform(batch, 2, low=-0.03, high=0.03) * 2
    jitter = uniform(batch, 3, low=-0.03, high=0.03)

    def per_frame(t: torch.Tensor) -> torch.Tensor:
        return t.repeat_interleave(frames, 0)

    images, mask = render(per_frame(colour), per_frame(shape), per_frame(area), centre.flatten(0, 1),
                          per_frame(background), per_frame(gradient), per_frame(jitter), size)
    prompts = [clip_prompt(int(c), int(s), int(d)) for c, s, d in zip(colour, shape, direction)]
    return Clips(images.unflatten(0, (batch, frames)), colour, shape, direction, area, prompts, centre,
                 mask.flatten(1).mean(1).view(batch, frames))


def clip_stream(batch: int, seed: int, size: int = 16) -> Iterator[Clips]:
    """An endless, seeded sequence of clip batches."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        yield draw_clips(batch, generator, size)


def held_out_clips(count: int, seed: int = 10_000, size: int = 16) -> Clips:
    """``count`` clips from a seed no training run uses."""
    return draw_clips(count, torch.Generator().manual_seed(seed), size)
