"""Judge samples of a trained reference model: ``python -m devtools.testkit.shapes.evaluate NAME``.

Samples every ``"<colour> <shape>"`` prompt with several seeds through ComfyUI's own
sampler (``comfy.sample.sample``, as KSampler runs it: euler, normal schedule, 20 steps,
the negative prompt empty), decodes them with the model's RGB map and reads them with
the oracle classifier. The command writes the quality figures into the model's manifest.

The video model (``wan_shapes``) samples every ``"<colour> <shape> moving <direction>"`` prompt
from the latent ``EmptyHunyuanLatentVideo`` gives for 128x128 px and length 13 ([B, 16, 4, 16, 16]);
its clips are judged for colour, shape and direction (``oracle.read_clips``) and flicker.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

if __name__ == "__main__":  # run as a command: ComfyUI first, models.py imports it
    from devtools import bootstrap

    bootstrap.import_comfyui()

from . import data, models, oracle  # noqa: E402

log = logging.getLogger(__name__)

ALL_PROMPTS = tuple(data.prompt(c, s) for c in range(len(data.COLOURS)) for s in range(len(data.SHAPES)))
ALL_CLIP_PROMPTS = tuple(data.clip_prompt(c, s, d) for c in range(len(data.COLOURS))
                         for s in range(len(data.SHAPES)) for d in range(len(data.DIRECTIONS)))
RECOMMENDED_CFG = {"sd15_shapes": 5.0, "flux_shapes": 5.0, "wan_shapes": 5.0}
# Seeds per prompt of the command: 288 samples for either kind (18 picture prompts, 72 clip prompts).
DEFAULT_SEEDS = {"image": 16, "video": 4}


@dataclass
class Samples:
    """Sampled pictures [N, 3, 16, 16] (clips: [N, T, 3, 16, 16]) with the prompts that asked for them."""

    pictures: torch.Tensor
    prompts: List[str]
    latents: torch.Tensor


def prompt_grid(seeds_per_prompt: int, prompts: Sequence[str] = ALL_PROMPTS) -> List[str]:
    """Every prompt, ``seeds_per_prompt`` times (prompt-major)."""
    return [p for p in prompts for _ in range(seeds_per_prompt)]


def noise_for(count: int, channels: int, seed: int = 0, size: int = 16, frames: int = 0) -> torch.Tensor:
    """Initial noise [count, C, size, size] ([count, C, frames, size, size] for clips) from a seeded generator
    (sample i always gets the same noise)."""
    dims = (count, channels) + ((frames,) if frames else ()) + (size, size)
    return torch.randn(dims, generator=torch.Generator().manual_seed(seed))


def sample(trained: models.Trained, prompts: Sequence[str], model=None, steps: int = 20,
           cfg: Optional[float] = None, sampler: str = "euler", scheduler: str = "normal", seed: int = 0,
           negative: str = "", chunk: int = 64, size: int = 16) -> Samples:
    """Sample one picture (the video model: one clip) per prompt with ``model`` (default: the trained model
    itself, unpatched). Clips start from EmptyHunyuanLatentVideo's latent, zeros [N, 16, 4, size, size]."""
    from ...sampling import server_sample

    model = trained.model if model is None else model
    cfg = RECOMMENDED_CFG[trained.name] if cfg is None else cfg
    channels, frames = models.spec(trained.name).latent_channels, models.spec(trained.name).frames
    noise = noise_for(len(prompts), channels, seed, size, frames)
    latents = []
    for start in range(0, len(prompts), chunk):
        part = list(prompts[start:start + chunk])
        positive = _batched(trained, part)
        uncond = _batched(trained, [negative] * len(part))
        empty = torch.zeros(noise[start:start + len(part)].shape)
        latents.append(server_sample(model, noise[start:start + len(part)], steps, cfg, sampler, scheduler,
                                     positive, uncond, empty, disable_pbar=True, seed=seed))
    latent = torch.cat(latents)
    pictures = oracle.to_pictures(trained.decode(latent), size)  # clips: B*T frames, clip-major
    if frames:
        pictures = pictures.unflatten(0, (len(prompts), frames))
    return Samples(pictures, list(prompts), latent)


def _batched(trained: models.Trained, prompts: Sequence[str]) -> List:
    """One CONDITIONING whose tensors carry one row per prompt."""
    conds = [trained.encode(p)[0] for p in prompts]
    context = torch.cat([c[0] for c in conds])
    extras = {}
    if "pooled_output" in conds[0][1]:
        extras["pooled_output"] = torch.cat([c[1]["pooled_output"] for c in conds])
    return [[context, extras]]


def judge(samples: Samples, classifier: oracle.Classifier, reference: Optional[torch.Tensor] = None,
          full: Optional[Samples] = None) -> Dict[str, float]:
    """Prompt accuracy, FID against ``reference`` pictures, PSNR against ``full`` (same seeds, full compute).

    ``accuracy_shape_outline``: the share whose outline has the asked shape (``oracle.mask_shapes``, which reads
    corners; clips: over all frames) beside the classifier's ``accuracy_shape``.

    Clips: accuracy of colour, shape, direction and all three, the mean ``oracle.flicker`` over the clips that
    show background (``flicker_clips`` of them; None where none does), FID of their frames, PSNR over each clip's
    frames."""
    if samples.pictures.ndim == 5:
        asked = oracle.clip_labels(samples.prompts)
        result = {f"accuracy_{k}": round(v, 4)
                  for k, v in oracle.clip_accuracy(classifier, samples.pictures, *asked).items()}
        result["accuracy_shape_outline"] = round(oracle.mask_shape_accuracy(samples.pictures, asked[1]), 4)
        flicker = oracle.flicker(samples.pictures)
        measured = ~flicker.isnan()  # clips with background pixels to measure
        result["flicker"] = round(float(flicker[measured].mean()), 5) if measured.any() else None
        result["flicker_clips"] = int(measured.sum())
        pictures = samples.pictures.flatten(0, 1)
    else:
        colour, shape = oracle.labels(samples.prompts)
        result = {f"accuracy_{k}": round(v, 4)
                  for k, v in oracle.prompt_accuracy(classifier, samples.pictures, colour, shape).items()}
        result["accuracy_shape_outline"] = round(oracle.mask_shape_accuracy(samples.pictures, shape), 4)
        pictures = samples.pictures
    if reference is not None:
        result["fid"] = round(oracle.fid(classifier, pictures, reference), 3)
    if full is not None:
        result["psnr_db"] = round(oracle.summarise_psnr(oracle.psnr(samples.pictures, full.pictures)), 2)
    result["samples"] = len(samples.prompts)
    return result


def outline_by_shape(samples: Samples) -> Dict[str, float]:
    """Per asked shape, the share of samples (clips: frames) whose outline reads as it (``oracle.mask_shapes``)."""
    shape = oracle.labels(samples.prompts)[1]
    return {name: round(oracle.mask_shape_accuracy(samples.pictures[shape == index], shape[shape == index]), 4)
            for index, name in enumerate(data.SHAPES) if (shape == index).any()}


def with_defaults(node_class: type, model, **overrides):
    """``node_class`` applied to ``model`` at its default inputs (``overrides`` replace some); returns the MODEL."""
    values = {}
    info = node_class.INPUT_TYPES()
    for group in ("required", "optional"):
        for name, spec in info.get(group, {}).items():
            options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            if "default" in options:
                values[name] = options["default"]
            elif isinstance(spec[0], list) and spec[0]:
                values[name] = spec[0][0]
    values.update(overrides, model=model)
    return getattr(node_class(), node_class.FUNCTION)(**values)[0]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", help="sd15_shapes, flux_shapes or wan_shapes")
    parser.add_argument("--seeds", type=int, default=None,
                        help="seeds per prompt (default 16 of the 18 picture prompts, 4 of the 72 clip prompts)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-write", action="store_true", help="print only; leave the manifest alone")
    parser.add_argument("--weights", type=Path, default=None,
                        help="evaluate this weights file (a training run's --out) instead of the committed one; "
                             "implies --no-write")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    trained = models.load(args.name) if args.weights is None else models.load(args.name, path=args.weights,
                                                                              check=False)
    classifier = oracle.load()
    video = bool(models.spec(args.name).frames)
    seeds = args.seeds or DEFAULT_SEEDS["video" if video else "image"]
    reference = oracle.clip_reference_set() if video else oracle.reference_set()
    prompts = prompt_grid(seeds, ALL_CLIP_PROMPTS if video else ALL_PROMPTS)
    figures = {"sampler": "euler", "scheduler": "normal", "steps": 20, "seeds_per_prompt": seeds,
               "noise_seed": 0, "reference_pictures": len(reference)}
    for label, cfg in (("recommended_cfg", RECOMMENDED_CFG[args.name]), ("cfg_1", 1.0)):
        start = time.monotonic()
        samples = sample(trained, prompts, cfg=cfg)
        result = judge(samples, classifier, reference)
        result.update(cfg=cfg, wall_s=round(time.monotonic() - start, 1),
                      shape_outline_by_shape=outline_by_shape(samples))
        figures[label] = result
        log.info("%s %s: %s", args.name, label, result)
    if video:
        real = data.held_out_clips(len(prompts), seed=20_000).frames
        figures["real_clips_fid"] = round(oracle.fid(classifier, real.flatten(0, 1), reference), 3)
        figures["real_clips_flicker"] = round(float(oracle.flicker(real).mean()), 5)
    else:
        real = data.held_out(len(prompts), seed=20_000)
        figures["real_pictures_fid"] = round(oracle.fid(classifier, real.images, reference), 3)
    print(json.dumps(figures, indent=2))
    if not args.no_write and args.weights is None:
        path = models.manifest_path(args.name)
        manifest = json.loads(path.read_text())
        manifest["quality"] = figures
        path.write_text(json.dumps(manifest, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

