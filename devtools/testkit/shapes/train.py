"""Train a reference model on the procedural shapes: ``python -m devtools.testkit.shapes.train NAME``.

One loop (after lucidrains' denoising-diffusion-pytorch): draw a batch of pictures, map
them to the latent the network sees, noise them with the model's own
``model_sampling.noise_scaling`` at a random sigma, run ComfyUI's network the way
``BaseModel._apply_model`` does, regress its raw output on the target (the noise for
eps models, noise - x0 for flow models), AdamW with warm-up and cosine decay, an EMA of
the weights, which is what is saved. Prompts are dropped for classifier-free guidance:
10 % empty, 10 % colour only, 10 % shape only. The video model (``wan_shapes``) trains the
same way on clips (``data.draw_clips``: latents [B, 16, 4, 16, 16]); its prompts also lose
their motion words ("moving <direction>") 10 % of the time.

Writes ``devtools/testkit/shapes/weights/NAME.safetensors`` and its manifest ``NAME.json``
(command, seed, steps, wall time, final loss); the quality figures are added by
``python -m devtools.testkit.shapes.evaluate NAME``. Use as many OpenMP threads as free cores
(``--threads``): two torch jobs sharing cores slow each other by an order of magnitude.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Optional

import torch

log = logging.getLogger(__name__)

DROP_ALL, DROP_COLOUR, DROP_SHAPE, DROP_MOTION = 0.10, 0.10, 0.10, 0.10
CLEAR_FRAME_SIGMA = 0.3  # frame_noise: the clear frame's sigma is drawn uniformly below this


def prompt_words(colour: torch.Tensor, shape: torch.Tensor, generator: torch.Generator,
                 direction: Optional[torch.Tensor] = None):
    """Per picture (or clip, with its ``direction``), the words of its prompt after the guidance dropout."""
    from . import data

    draws = torch.rand(len(colour), generator=generator)
    directions = [None] * len(colour) if direction is None else direction.tolist()
    out = []
    for c, s, d, u in zip(colour.tolist(), shape.tolist(), directions, draws.tolist()):
        motion = [] if d is None else ["moving", data.DIRECTIONS[d]]
        if u < DROP_ALL:
            out.append([])
        elif u < DROP_ALL + DROP_COLOUR:
            out.append([data.SHAPES[s]] + motion)
        elif u < DROP_ALL + DROP_COLOUR + DROP_SHAPE:
            out.append([data.COLOUR_NAMES[c]] + motion)
        elif d is not None and u < DROP_ALL + DROP_COLOUR + DROP_SHAPE + DROP_MOTION:
            out.append([data.COLOUR_NAMES[c], data.SHAPES[s]])
        else:
            out.append([data.COLOUR_NAMES[c], data.SHAPES[s]] + motion)
    return out


def sample_sigmas(model_sampling, batch: int, flow: bool, generator: torch.Generator,
                  flow_t: str = "logit-normal") -> torch.Tensor:
    """Training sigmas [B]: a uniform discrete timestep (eps), or a t in 0-1 through the model's shift (flow):
    logit-normal, or ``flow_t="uniform"``, which visits the sigmas as a normal-scheduler run does.

    ``model_sampling.sigma`` takes t in the schedule's own timestep units: 0-1 for Flux's schedule, 0-multiplier
    (1000) for ``ModelSamplingDiscreteFlow`` (Wan, shift 8)."""
    if flow:
        if flow_t == "uniform":
            t = torch.rand(batch, generator=generator)
        else:
            t = torch.sigmoid(torch.randn(batch, generator=generator))
        return model_sampling.sigma(t * getattr(model_sampling, "multiplier", 1.0))
    index = torch.randint(len(model_sampling.sigmas), (batch,), generator=generator)
    return model_sampling.sigmas[index]


def _saved_copies(enabled: bool):
    """Autograd keeps its own copy of every tensor it saves: Flux's blocks add their residuals in
    place (``img += ...``) into tensors their norms saved for the backward pass."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t)


def initialise(network: torch.nn.Module, seed: int) -> None:
    """Fan-in scaled normal weights (the test kit's), then a zero output layer."""
    from .. import tiny_models

    tiny_models.randomize(network, seed)
    if hasattr(network, "out"):  # UNet
        last = network.out[-1]
    elif hasattr(network, "final_layer"):  # Flux
        last = network.final_layer.linear
    else:  # Wan
        last = network.head.head
    with torch.no_grad():
        for p in last.parameters():
            p.zero_()


@contextlib.contextmanager
def _fast_attention():
    """Train with PyTorch's scaled_dot_product_attention (ComfyUI's --cpu default, sub-quadratic
    attention, is several times slower backwards); ComfyUI's choice comes back afterwards."""
    import comfy.ldm.flux.math
    import comfy.ldm.modules.attention as attention
    import comfy.ldm.wan.model

    modules = (attention, comfy.ldm.flux.math, comfy.ldm.wan.model)  # Wan imports the function by name
    saved = [m.optimized_attention for m in modules]
    for m in modules:
        m.optimized_attention = attention.attention_pytorch
    try:
        yield
    finally:
        for m, function in zip(modules, saved):
            m.optimized_attention = function


@contextlib.contextmanager
def _in_training():
    """ComfyUI's own training flag (newer releases: its fused rotary-embedding kernels have no backward
    and are bypassed while ``comfy.model_management.in_training`` is set); restored afterwards."""
    import comfy.model_management as mm

    if not hasattr(mm, "in_training"):  # 0.3.75: plain torch everywhere
        yield
        return
    saved, mm.in_training = mm.in_training, True
    try:
        yield
    finally:
        mm.in_training = saved


def train(name: str, steps: int, batch: int = 32, seed: int = 0, lr: Optional[float] = None,
          ema_decay: float = 0.998, warmup: int = 200, save_to: Optional[Path] = None,
          save_every: int = 500, progress: Optional[Callable[[int, float], None]] = None,
          resume: Optional[Path] = None, weighting: str = "uniform", flow_t: Optional[str] = None,
          frame_noise: float = 0.0, frame_anchor: str = "first") -> Dict:
    """Train ``name`` for ``steps`` steps; returns the run's facts (and saves the EMA weights if ``save_to``).

    ``resume``: start from a saved file (its EMA weights and word table) instead of fresh weights;
    the learning-rate schedule (warm-up, cosine decay) starts again over ``steps``.
    ``flow_t``: how a flow model draws its training t (:func:`sample_sigmas`; default the model's spec).
    ``frame_noise`` (video): the share of clips one of whose frames (the first, see ``frame_anchor``) is noised
    less (sigma uniform in 0-``CLEAR_FRAME_SIGMA``) than the others (the clip's sigma), each frame's timestep given
    to ComfyUI's ``WanModel`` per token (the per-frame timestep path Wan 2.2's TI2V model uses for its first frame).
    With one sigma per clip the
    direction word barely lowers the loss, and 8,500 steps did not learn it (``probe``); with the first frame clear,
    where the object is in the others depends on the word, and the word was learned within 250 steps. Frames noised
    to independent sigmas (diffusion forcing, Chen et al. 2024) did not teach it in 3,000 steps. ``frame_anchor``
    ``random`` puts the clear frame anywhere in the clip instead of first (the word then has to say where the object
    goes before and after it, as when sampling, where no frame comes first in clarity).
    ``weighting``: ``uniform`` (plain MSE on the network's output) or ``high-noise``: eps models
    weight each picture by min(1 + sigma^2, 25), the weighting a v-prediction loss gives the same
    error, capped. An eps network's error at sigma 14 is 14 times larger in the picture it implies
    (x0 = x - sigma * eps), and uniform weighting leaves the colour of the whole picture poorly
    predicted at the start of sampling.
    """
    import comfy.model_sampling

    from . import data, models

    torch.manual_seed(seed)
    s = models.spec(name)
    if resume is not None:
        loaded = models.load(name, path=resume, check=False)
        patcher, table = loaded.model, loaded.table
    else:
        patcher = models.build(name)
    base = patcher.model
    network = base.diffusion_model
    if resume is None:
        initialise(network, seed)
        table = models.word_table(name, seed)
    network.train()
    ema = copy.deepcopy(network).eval().requires_grad_(False)
    ms = base.model_sampling
    flow = isinstance(ms, comfy.model_sampling.CONST)  # Flux and Wan predict the velocity; the UNet eps
    flux = s.pooled_dim is not None  # the Flux layout: a pooled vector y, residuals added in place
    optimiser = torch.optim.AdamW(network.parameters(), lr=lr or s.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda i: min(1.0, (i + 1) / warmup) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps))))
    pictures = data.clip_stream(batch, seed) if s.frames else data.stream(batch, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    start = time.monotonic()
    running = None
    for step in range(steps):
        b = next(pictures)
        if s.frames:
            x0 = models.clips_to_internal(b.frames, s.latent_channels)
            asked = prompt_words(b.colour, b.shape, generator, b.direction)
        else:
            x0 = models.rgb_to_internal(b.images, s.latent_channels)
            asked = prompt_words(b.colour, b.shape, generator)
        context = models.encode_words(table, asked, s.vocabulary)
        sigma = sample_sigmas(ms, batch, flow, generator, flow_t or s.flow_t)
        noise = torch.randn(x0.shape, generator=generator)
        per_sample = sigma.view(-1, *[1] * (x0.ndim - 1))
        timestep = ms.timestep(sigma).float()
        if s.frames and frame_noise > 0:
            clear = CLEAR_FRAME_SIGMA * torch.rand(batch, generator=generator)  # the clear frame's, unshifted
            mixed = torch.rand(batch, generator=generator) < frame_noise
            anchor = (torch.randint(s.frames, (batch,), generator=generator) if frame_anchor == "random"
                      else torch.zeros(batch, dtype=torch.long))
            sigma_frames = sigma[:, None].repeat(1, s.frames)  # [B, T]
            rows = torch.arange(batch)
            sigma_frames[rows, anchor] = torch.where(mixed, clear, sigma)
            per_sample = sigma_frames.view(batch, 1, s.frames, 1, 1)
            timestep = ms.timestep(sigma_frames.flatten()).float().view(batch, s.frames)
        if per_sample.numel() == batch:
            x = ms.calculate_input(per_sample, ms.noise_scaling(per_sample, noise, x0))
        else:  # per-frame sigmas [B, 1, T, 1, 1], which ComfyUI's helpers reshape to [B]: the flow model's own formula
            x = per_sample * noise + (1 - per_sample) * x0  # CONST.noise_scaling; its calculate_input is the identity
        extra = {"y": models.pooled(context)} if flux else {}
        with _fast_attention(), _in_training(), _saved_copies(flux):
            out = network(x, timestep, context=context, **extra)
        target = noise - x0 if flow else noise
        per_picture = (out.float() - target).square().flatten(1).mean(1)
        if weighting == "high-noise" and not flow:
            per_picture = per_picture * (1 + sigma.square()).clamp(max=25.0)
        loss = per_picture.mean()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(network.parameters(), 1.0)
        optimiser.step()
        schedule.step()
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema.parameters(), network.parameters()):
                e.lerp_(p, 1 - decay)
        running = loss.item() if running is None else 0.99 * running + 0.01 * loss.item()
        if progress is not None:
            progress(step, running)
        if save_to is not None and (step + 1) % save_every == 0:
            models.save(name, ema, table, save_to)
    facts = {"model": name, "seed": seed, "steps": steps, "batch": batch, "lr": lr or s.lr, "weighting": weighting,
             "ema_decay": ema_decay, "wall_s": round(time.monotonic() - start, 1),
             "final_loss_ema100": round(running, 5) if running is not None else None,
             "threads": torch.get_num_threads(),
             "parameters": sum(p.numel() for p in network.parameters())}
    if flow:
        facts["flow_t"] = flow_t or s.flow_t
    if s.frames and frame_noise > 0:
        facts["frame_noise"] = frame_noise
        facts["frame_anchor"] = frame_anchor
    if save_to is not None:
        models.save(name, ema, table, save_to)
    return facts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", help="sd15_shapes, flux_shapes or wan_shapes")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the manifest's recipe)")
    parser.add_argument("--batch", type=int, default=None, help="pictures per step (default: the recipe's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="OpenMP threads (as many as free cores)")
    parser.add_argument("--weighting", choices=["uniform", "high-noise"], default="uniform",
                        help="loss weighting over sigma (see train())")
    parser.add_argument("--flow-t", choices=["logit-normal", "uniform"], default=None,
                        help="flow models: how the training t is drawn (default: the model's; see sample_sigmas)")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the model's)")
    parser.add_argument("--frame-noise", type=float, default=0.0,
                        help="video: share of clips with one frame noised less than the rest (see train())")
    parser.add_argument("--frame-anchor", choices=["first", "random"], default="first",
                        help="video, with --frame-noise: which frame is the clear one")
    parser.add_argument("--resume", type=Path, default=None,
                        help="continue from this weights file (e.g. the committed one) with a fresh schedule")
    parser.add_argument("--out", type=Path, default=None,
                        help="weights file (default: the committed one; its manifest is rewritten)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)

    from . import models

    steps = args.steps or RECIPES[args.name]["steps"]
    batch = args.batch or RECIPES[args.name]["batch"]
    out = args.out or models.weights_path(args.name)

    def progress(step: int, loss: float) -> None:
        if step % 200 == 0 or step == steps - 1:
            log.info("%s step %d/%d loss %.5f", args.name, step, steps, loss)

    facts = train(args.name, steps, batch=batch, seed=args.seed, lr=args.lr, save_to=out, progress=progress,
                  resume=args.resume, weighting=args.weighting, flow_t=args.flow_t, frame_noise=args.frame_noise,
                  frame_anchor=args.frame_anchor)
    facts["command"] = "python -m devtools.testkit.shapes.train " + " ".join(argv if argv is not None else sys.argv[1:])
    facts["sha256"] = models.sha256(out)
    if args.out is None:
        path = models.manifest_path(args.name)
        old = json.loads(path.read_text()) if path.is_file() else {}
        if args.resume is None:  # fresh weights: the old manifest's stages and quality describe other ones
            old = {}
        if args.resume is not None and old:  # a continued run: keep the earlier stages
            stages = old.pop("stages", [{k: v for k, v in old.items() if k not in ("sha256", "quality")}])
            facts["stages"] = stages + [dict(facts)]
            facts["steps"] = sum(stage["steps"] for stage in facts["stages"])
            facts["wall_s"] = round(sum(stage["wall_s"] for stage in facts["stages"]), 1)
            facts["command"] = " && ".join(stage["command"] for stage in facts["stages"])
            old = {}
        path.write_text(json.dumps({**old, **facts}, indent=2) + "\n")
    log.info("%s", json.dumps(facts))
    return 0


# Sized to train each model in about two hours on one thread of the 2-core machine (a first stage; later stages
# resume with --steps and --resume). wan_shapes: 0.86 s per step of 16 clips on an idle core, about an hour.
RECIPES = {"sd15_shapes": {"steps": 2600, "batch": 16}, "flux_shapes": {"steps": 2200, "batch": 16},
           "wan_shapes": {"steps": 4000, "batch": 16}}

if __name__ == "__main__":
    from devtools import bootstrap

    bootstrap.import_comfyui()
    sys.exit(main())
