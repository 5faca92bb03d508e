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


if __name__ == "__main__":
    sys.exit(main())
