"""The quality oracle: a small classifier trained on the same generator, and the metrics built on it.

- ``Classifier``: a four-layer CNN on 16x16 RGB pictures with two heads (colour, shape);
  trained by ``python -m devtools.testkit.shapes.oracle`` (seeded), weights and held-out accuracy
  in ``weights/classifier.*``.
- ``prompt_accuracy``: the share of samples whose colour / shape / both the classifier
  reads as the prompt asked.
- ``fid``: the Frechet distance between Gaussians fitted to the classifier's 64-wide
  penultimate features of two picture sets (FID with the oracle in place of Inception,
  whose weights cannot be downloaded here).
- ``psnr``: 10 log10(1 / MSE) per picture on RGB in 0-1 (against the same seed's
  full-compute result).

Clips (the video model): ``read_clips`` reads each clip's colour and shape as the majority of the
classifier's answers over its frames, and its direction from the travel of the object's centroid
(the non-background pixels) from the first frame to the last; ``clip_accuracy`` is the share read
as the prompt asked; ``flicker`` the mean absolute frame-to-frame change of the background pixels.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
from pathlib import Path
from typing import Dict, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import data

log = logging.getLogger(__name__)

WEIGHTS = Path(__file__).resolve().parent / "weights" / "classifier.safetensors"
MANIFEST = WEIGHTS.with_suffix(".json")
FEATURES = 64


class Classifier(nn.Module):
    """[B, 3, 16, 16] RGB in 0-1 -> (colour logits [B, 6], shape logits [B, 3]); ``features`` -> [B, 64]."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.SiLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.SiLU(), nn.MaxPool2d(2),     # 8x8
            nn.Conv2d(32, 64, 3, padding=1), nn.SiLU(),
            nn.Conv2d(64, 64, 3, padding=1), nn.SiLU(), nn.MaxPool2d(2),     # 4x4
            nn.Flatten(), nn.Linear(64 * 16, FEATURES), nn.SiLU(),
        )
        self.colour = nn.Linear(FEATURES, len(data.COLOURS))
        self.shape = nn.Linear(FEATURES, len(data.SHAPES))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images * 2 - 1)

    def forward(self, images: torch.Tensor):
        f = self.features(images)
        return self.colour(f), self.shape(f)


def to_pictures(images: torch.Tensor, size: int = 16) -> torch.Tensor:
    """ComfyUI IMAGE [B, H, W, 3] (or [B, 3, H, W]) -> [B, 3, size, size] by area averaging."""
    if images.shape[-1] == 3 and images.shape[1] != 3:
        images = images.permute(0, 3, 1, 2)
    images = images.float()
    if images.shape[-1] != size or images.shape[-2] != size:
        images = F.adaptive_avg_pool2d(images, size)
    return images


def train_classifier(steps: int = 3000, batch: int = 64, seed: int = 123) -> Classifier:
    torch.manual_seed(seed)
    model = Classifier()
    optimiser = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=2e-3, total_steps=steps)
    for step, b in zip(range(steps), data.stream(batch, seed)):
        colour, shape = model(b.images)
        loss = F.cross_entropy(colour, b.colour) + F.cross_entropy(shape, b.shape)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        if step % 500 == 0:
            log.info("classifier step %d loss %.4f", step, loss.item())
    return model.eval()


@torch.no_grad()
def held_out_accuracy(model: Classifier, count: int = 4000) -> Dict[str, float]:
    b = data.held_out(count)
    colour, shape = model(b.images)
    return {"colour": (colour.argmax(1) == b.colour).float().mean().item(),
            "shape": (shape.argmax(1) == b.shape).float().mean().item(), "count": count}


def load() -> Classifier:
    from safetensors.torch import load_file

    if not WEIGHTS.is_file():
        raise RuntimeError(f"{WEIGHTS} is missing: train it with `python -m devtools.testkit.shapes.oracle`")
    model = Classifier()
    model.load_state_dict(load_file(str(WEIGHTS)))
    return model.eval()


@torch.no_grad()
def prompt_accuracy(model: Classifier, pictures: torch.Tensor, colour: torch.Tensor,
                    shape: torch.Tensor) -> Dict[str, float]:
    """Share of pictures [B, 3, 16, 16] read as the asked colour [B] / shape [B] / both."""
    c, s = model(pictures)
    right_c, right_s = c.argmax(1) == colour, s.argmax(1) == shape
    return {"colour": right_c.float().mean().item(), "shape": right_s.float().mean().item(),
            "both": (right_c & right_s).float().mean().item()}


@torch.no_grad()
def fid(model: Classifier, pictures: torch.Tensor, reference: torch.Tensor) -> float:
    """Frechet distance between the classifier features of two picture sets [N, 3, 16, 16]."""
    a = model.features(pictures).double()
    b = model.features(reference).double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    # Tr(sqrt(A B)) from the eigenvalues of sqrt(A) B sqrt(A) (symmetric, PSD).
    vals, vecs = torch.linalg.eigh(cov_a)
    root_a = vecs @ torch.diag(vals.clamp_min(0).sqrt()) @ vecs.T
    middle = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp_min(0).sqrt().sum()
    return float((mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * middle)


def psnr(pictures: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per-picture PSNR [B] in dB of RGB pictures in 0-1 (inf where they are equal)."""
    mse = (pictures.float() - reference.float()).square().flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse)


def summarise_psnr(values: torch.Tensor, cap: float = 100.0) -> float:
    """Mean PSNR with identical pictures counted at ``cap`` dB (so one exact match is not infinite)."""
    return float(values.clamp(max=cap).mean())


def reference_set(count: int = 2000) -> torch.Tensor:
    """Real pictures for FID, from the held-out seed."""
    return data.held_out(count).images


def labels(prompts: Sequence[str]):
    """(colour [B], shape [B]) indices of ``"<colour> <shape>"`` prompts."""
    colour = torch.tensor([data.COLOUR_NAMES.index(p.split()[0]) for p in prompts])
    shape = torch.tensor([data.SHAPES.index(p.split()[1]) for p in prompts])
    return colour, shape


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=123)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    from safetensors.torch import save_file

    start = time.monotonic()
    model = train_classifier(args.steps, seed=args.seed)
    wall = time.monotonic() - start
    WEIGHTS.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(WEIGHTS))
    command = "python -m devtools.testkit.shapes.oracle " + " ".join(argv if argv is not None else sys.argv[1:])
    facts = {"command": command.strip(),
             "seed": args.seed, "steps": args.steps, "batch": 64, "wall_s": round(wall, 1),
             "held_out_accuracy": held_out_accuracy(model),
             "sha256": hashlib.sha256(WEIGHTS.read_bytes()).hexdigest()}
    MANIFEST.write_text(json.dumps(facts, indent=2) + "\n")
    log.info("%s", json.dumps(facts))
    return 0




# -- clips --------------------------------------------------------------------------------------------

# A pixel belongs to the object in proportion to how far its brightest channel rises above the background's
# ceiling (every background channel is at most data.BACKGROUND_MAX, every object colour has a channel >= 0.72).
FOREGROUND_RAMP = (0.30, 0.60)
MIN_TRAVEL = 0.125  # of the picture's side: less travel than this reads as no direction (-1)


def foreground(frames: torch.Tensor) -> torch.Tensor:
    """Object weight [..., H, W] in 0-1 of RGB frames [..., 3, H, W] in 0-1."""
    low, high = FOREGROUND_RAMP
    return ((frames.amax(-3) - low) / (high - low)).clamp(0, 1)


def centroids(frames: torch.Tensor) -> torch.Tensor:
    """The object's centre [..., 2] (x, y in picture widths; NaN where a frame shows no object) of frames
    [..., 3, H, W]: the mean pixel position weighted by :func:`foreground`."""
    weight = foreground(frames)
    h, w = weight.shape[-2:]
    ys = (torch.arange(h, dtype=weight.dtype) + 0.5) / h
    xs = (torch.arange(w, dtype=weight.dtype) + 0.5) / w
    mass = weight.sum((-2, -1))
    x = (weight * xs).sum((-2, -1)) / mass
    y = (weight * ys[:, None]).sum((-2, -1)) / mass
    return torch.stack([x, y], -1)


def directions(frames: torch.Tensor) -> torch.Tensor:
    """Direction index [B] into ``data.DIRECTIONS`` of clips [B, T, 3, H, W]: the larger component of the
    centroid's travel from the first frame to the last, by its sign; -1 where it moved less than
    ``MIN_TRAVEL`` or a first or last frame shows no object."""
    centre = centroids(frames[:, [0, -1]])
    travel = centre[:, 1] - centre[:, 0]  # [B, 2]
    index = torch.where(travel[:, 0].abs() >= travel[:, 1].abs(),
                        torch.where(travel[:, 0] < 0, 0, 1), torch.where(travel[:, 1] < 0, 2, 3))
    moved = travel.norm(dim=-1) >= MIN_TRAVEL  # False where NaN
    return torch.where(moved, index, torch.full_like(index, -1))


def _majority(logits: torch.Tensor) -> torch.Tensor:
    """The most frequent answer [B] over the frames of logits [B, T, K]; a tie goes to the larger mean probability."""
    votes = F.one_hot(logits.argmax(-1), logits.shape[-1]).sum(1).float()
    return (votes + logits.softmax(-1).mean(1)).argmax(-1)  # the mean probability is below 1: only breaks ties


@torch.no_grad()
def read_clips(model: Classifier, frames: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Colour [B], shape [B] and direction [B] (-1: none) the oracle reads in clips [B, T, 3, 16, 16]."""
    colour, shape = model(frames.flatten(0, 1))
    b, t = frames.shape[:2]
    return {"colour": _majority(colour.view(b, t, -1)), "shape": _majority(shape.view(b, t, -1)),
            "direction": directions(frames)}


def clip_accuracy(model: Classifier, frames: torch.Tensor, colour: torch.Tensor, shape: torch.Tensor,
                  direction: torch.Tensor) -> Dict[str, float]:
    """Share of clips [B, T, 3, 16, 16] read as the asked colour / shape / direction [B] / all three."""
    read = read_clips(model, frames)
    right = {"colour": read["colour"] == colour, "shape": read["shape"] == shape,
             "direction": read["direction"] == direction}
    right["all"] = right["colour"] & right["shape"] & right["direction"]
    return {k: v.float().mean().item() for k, v in right.items()}


def flicker(frames: torch.Tensor) -> torch.Tensor:
    """Per clip [B]: the mean absolute change (RGB in 0-1) from each frame to the next of the pixels that are
    background in both, and not next to the object (its weight dilated by one pixel); 0 for a still background,
    NaN for a clip without such pixels (nothing reads as background: noise). Clips [B, T, 3, H, W]."""
    near = F.max_pool2d(foreground(frames).flatten(0, 1)[:, None], 3, stride=1, padding=1)
    background = (near.view(frames.shape[0], frames.shape[1], *frames.shape[-2:]) == 0).float()
    both = background[:, 1:] * background[:, :-1]  # [B, T-1, H, W]
    change = (frames[:, 1:] - frames[:, :-1]).abs().mean(2)  # [B, T-1, H, W]
    return (change * both).sum((1, 2, 3)) / both.sum((1, 2, 3))  # 0 / 0 = NaN without background


# -- shapes by their outline -----------------------------------------------------------------------------


@torch.no_grad()
def mask_shapes(pictures: torch.Tensor) -> torch.Tensor:
    """Shape index [B] into ``data.SHAPES`` of pictures [B, 3, H, W], read from the object's outline: the
    ideal circle, square and triangle with the object's area (its :func:`foreground` weight) and centroid are
    drawn (``data.coverage``), and the one that overlaps the object best (intersection over union of the soft
    masks) wins. Unlike the classifier, this oracle reads corners: a round blob asked to be a square overlaps
    the ideal circle better than the ideal square of its area."""
    weight = foreground(pictures)  # [B, H, W]
    size = weight.shape[-1]
    area = weight.sum((-2, -1)) / weight[0].numel()
    centre = centroids(pictures)
    scores = []
    for index in range(len(data.SHAPES)):
        half = data._extent(torch.full(area.shape, index), area)
        box = centre - torch.stack([torch.zeros_like(half), half / 3], -1) if data.SHAPES[index] == "triangle" \
            else centre  # a triangle's centroid lies a third of its half-height below its box's centre
        ideal = data.coverage(half, box, size)[:, index]
        scores.append(torch.minimum(weight, ideal).sum((-2, -1)) / torch.maximum(weight, ideal).sum((-2, -1)))
    return torch.stack(scores, -1).nan_to_num(0.0).argmax(-1)


def mask_shape_accuracy(pictures: torch.Tensor, shape: torch.Tensor) -> float:
    """Share of pictures [B, 3, H, W] (clips [B, T, 3, H, W]: every frame) whose outline reads as the asked
    shape [B] by :func:`mask_shapes`."""
    if pictures.ndim == 5:
        shape = shape[:, None].expand(-1, pictures.shape[1]).flatten()
        pictures = pictures.flatten(0, 1)
    return (mask_shapes(pictures) == shape).float().mean().item()


def clip_reference_set(count: int = 2000) -> torch.Tensor:
    """Real clip frames [count, 3, 16, 16] for FID on the video model's frames, from the held-out seed."""
    return data.held_out_clips(-(-count // data.FRAMES)).frames.flatten(0, 1)[:count]


def clip_labels(prompts: Sequence[str]):
    """(colour [B], shape [B], direction [B]) indices of ``"<colour> <shape> moving <direction>"`` prompts."""
    colour, shape = labels(prompts)
    direction = torch.tensor([data.DIRECTIONS.index(p.split()[3]) for p in prompts])
    return colour, shape, direction


if __name__ == "__main__":
    sys.exit(main())
