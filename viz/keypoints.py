"""Face keypoint images for InstantID's ControlNet (Pillow and numpy only).

The InstantID ControlNet was trained on five keypoints (eyes, nose, mouth corners)
drawn on black: a coloured stroke from each point to the nose and a coloured dot per
point, in the colours used here.
"""

from __future__ import annotations

from typing import Iterable, Tuple

import numpy as np
import torch
from PIL import Image, ImageDraw

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255)]
STROKES = [(0, 2), (1, 2), (3, 2), (4, 2)]  # every point to the nose


def draw(keypoints: Iterable[Tuple[float, float]], width: int, height: int, stroke: int = 4,
         dot: int = 10) -> torch.Tensor:
    """Keypoints [5, (x, y)] in pixels on a black ``width x height`` canvas -> [H, W, 3] float in [0, 1]."""
    points = [tuple(map(float, p)) for p in keypoints]
    strokes = Image.new("RGB", (width, height))
    pen = ImageDraw.Draw(strokes)
    for a, b in STROKES:
        pen.line([points[a], points[b]], fill=COLOURS[a], width=2 * stroke)
    canvas = (np.asarray(strokes, dtype=np.float32) * 0.6).astype(np.uint8)
    image = Image.fromarray(canvas)
    pen = ImageDraw.Draw(image)
    for (x, y), colour in zip(points, COLOURS):
        pen.ellipse([x - dot, y - dot, x + dot, y + dot], fill=colour)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)
