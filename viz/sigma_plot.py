"""A line chart of sigma schedules, drawn with Pillow, returned as a ComfyUI IMAGE.

No ComfyUI import: curves in, ``[1, H, W, 3]`` float32 in [0, 1] out.
"""

from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

Curve = Tuple[str, Sequence[float]]

PALETTE = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14)]
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 72, 24, 44, 52


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def _nice_ticks(low: float, high: float, count: int = 5) -> List[float]:
    """About ``count`` round tick values covering [low, high]."""
    if high <= low:
        return [low]
    raw = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.ceil(low / step - 1e-9) * step
    ticks = []
    value = first
    while value <= high + 1e-9 * step:
        ticks.append(round(value, 12))
        value += step
    return ticks


def render(curves: Sequence[Curve], title: str, log_scale: bool = False,
           width: int = 768, height: int = 512) -> torch.Tensor:
    """Plot each curve's values against their step index.

    curves: (label, sigmas) pairs; sigmas is the [steps + 1] schedule. With
    ``log_scale`` the y axis is log10(sigma) and zero sigmas sit on the bottom edge.
    Returns a [1, height, width, 3] float32 image in [0, 1].
    """
    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    font, small = _font(15), _font(12)
    left, right = MARGIN_LEFT, width - MARGIN_RIGHT
    top, bottom = MARGIN_TOP, height - MARGIN_BOTTOM

    values = [float(v) for _, sigmas in curves for v in sigmas]
    n_steps = max((len(s) for _, s in curves), default=1) - 1

    def transform(v: float) -> float:
        return math.log10(v) if log_scale else v

    if log_scale:
        positive = [v for v in values if v > 0] or [1.0]
        y_low = math.floor(math.log10(min(positive)))
        y_high = math.ceil(math.log10(max(positive)))
        y_high = y_high if y_high > y_low else y_low + 1
        y_ticks = list(range(y_low, y_high + 1))
    else:
        y_low, y_high = 0.0, max(values, default=1.0) or 1.0
        y_ticks = _nice_ticks(y_low, y_high)
        y_high = max(y_high, y_ticks[-1])
    x_high = max(n_steps, 1)

    def to_px(step: int, v: float) -> Tuple[float, float]:
        x = left + (right - left) * step / x_high
        if log_scale and v <= 0:
            return x, bottom
        y = bottom - (bottom - top) * (transform(v) - y_low) / (y_high - y_low)
        return x, y

    # grid and axes
    for tick in y_ticks:
        _, y = to_px(0, 10 ** tick if log_scale else tick)
        draw.line([(left, y), (right, y)], fill=(228, 228, 228))
        label = f"1e{tick:d}" if log_scale else f"{tick:.4g}"
        draw.text((left - 8, y), label, fill=(60, 60, 60), font=small, anchor="rm")
    for step in _nice_ticks(0, x_high, min(10, x_high)):
        if float(step).is_integer():
            x, _ = to_px(int(step), 0.0)
            draw.line([(x, bottom), (x, bottom + 4)], fill=(60, 60, 60))
            draw.text((x, bottom + 7), f"{int(step)}", fill=(60, 60, 60), font=small, anchor="mt")
    draw.line([(left, top), (left, bottom), (right, bottom)], fill=(40, 40, 40), width=2)
    draw.text((width / 2, height - 6), "step", fill=(40, 40, 40), font=font, anchor="mb")
    draw.text((8, top - 14), "sigma (log scale)" if log_scale else "sigma", fill=(40, 40, 40), font=font, anchor="lm")
    draw.text((width / 2, 12), title, fill=(20, 20, 20), font=font, anchor="mt")

    # curves and legend
    for index, (label, sigmas) in enumerate(curves):
        color = PALETTE[index % len(PALETTE)]
        points = [to_px(step, float(v)) for step, v in enumerate(sigmas)]
        if len(points) > 1:
            draw.line(points, fill=color, width=2)
        for x, y in points:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
        legend_y = top + 8 + 20 * index
        draw.line([(right - 230, legend_y), (right - 206, legend_y)], fill=color, width=3)
        draw.text((right - 200, legend_y), label, fill=(20, 20, 20), font=small, anchor="lm")

    pixels = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(pixels).unsqueeze(0)
