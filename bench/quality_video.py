"""Speed against quality on the trained video model (``wan_shapes``), the sibling of quality.py.

Every video-capable speed and guidance node on ComfyUI's WanModel trained on clips of one coloured
shape moving left, right, up or down (``devtools/testkit/shapes/``): every ``"<colour> <shape> moving
<direction>"`` prompt with ``--seeds`` seeds (72 x 4 = 288 clips per variant by default), 128x128 px,
length 13 (4 latent frames of 16x16), euler, 20 steps, CFG 5 (variants marked "CFG 1" at CFG 1), the
same initial noise for every variant, through ComfyUI's own sampler. Per variant: model evaluations
(batch rows at the network's first layer, as a share of the full-compute run), wall time, the share of
clips the oracle reads with the asked colour, shape and direction, flicker (the mean frame-to-frame
change of the background; real clips: 0) and PSNR against the full-compute clip of the same seed.

The variants, their keys and labels are quality.py's where the node is the same; added here: StepCache
with plain reuse at 0.3 and NAG with the negative "static" (a word wan_shapes does not know: it encodes
as the empty prompt, so that variant checks that an unknown negative changes nothing).

    .venv/bin/python bench/quality_video.py --threads 1                 # every variant, 288 clips each
    .venv/bin/python bench/quality_video.py --seeds 1 --variants full stepcache core_easycache
    .venv/bin/python bench/quality_video.py --replot                    # table and chart from the JSON
    .venv/bin/python bench/quality_video.py --untrained --seeds 1 --steps 2 --name smoke   # does the code run?

Writes ``results/quality_video.json``, ``.md`` and ``.png`` (``--publish``: also to ``figures/``).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Callable, Dict, List, Optional

import _common
import quality
from quality import Variant, ours

MODEL = "wan_shapes"
PROMPTS = 72  # 6 colours x 3 shapes x 4 directions
NAG = "PatchLab_NormalizedAttentionGuidance"
# quality.py's variants that run on a video model, in its order.
SHARED = ("full", "cfg1", "stepcache", *(f"stepcache_forecast_{t}" for t in (0.1, 0.2, 0.5, 0.8)),
          "core_easycache", "core_lazycache", "guidance_interval", "nag_cfg1",
          *(f"{g}{s}" for g in ("pag", "seg", "slg", "tpg") for s in ("", "_cfg1")),
          "rescale_cfg", "cfg_norm", "apg", "tcfg", "mahiro", "cfg_zero_star")
# Variants of this bench alone, each after the shared one it belongs beside.
AFTER = {
    "stepcache_forecast_0.8": Variant("stepcache_plain_0.3", "StepCache plain 0.3", (MODEL,), "ours", "speed",
                                      ours("PatchLab_StepCache", threshold=0.3, reuse="plain")),
    "nag_cfg1": Variant("nag_static_cfg1", 'NAG at CFG 1 (PatchLab; negative: "static")', (MODEL,), "ours",
                        "guidance", ours(NAG), 1.0, negative="static"),
}


def catalogue() -> List[Variant]:
    """quality.py's shared variants on ``wan_shapes``, with this bench's own after the ones they belong beside."""
    shared = {v.key: v for v in quality.VARIANTS}
    out = []
    for key in SHARED:
        out.append(dataclasses.replace(shared[key], models=(MODEL,)))
        if key in AFTER:
            out.append(AFTER[key])
    return out


VARIANTS = catalogue()


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    quality.add_options(parser, "quality_video", seeds=4, prompts=PROMPTS)
    parser.add_argument("--steps", type=int, default=20, help="sampling steps (20: what the model is judged at)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--weights", type=Path, help="judge this weights file (a training run's --out) instead "
                                                      "of the committed one")
    weights.add_argument("--untrained", action="store_true",
                         help="seeded random weights: checks that the code runs, the numbers mean nothing")
    args = parser.parse_args(argv)
    if args.publish and (args.weights or args.untrained):
        parser.error("--publish publishes figures of the committed weights only")
    return args


def weights_label(args) -> str:
    if args.untrained:
        return "untrained: seeded random weights (seed 0), a check that the code runs"
    if args.weights:
        return f"weights file {args.weights} (not the committed one)"
    return "the committed weights"


def load(args):
    """The model the run judges: the committed weights, ``--weights`` or ``--untrained``."""
    from devtools.testkit.shapes import models

    if args.untrained:
        return models.untrained(MODEL, seed=0)
    return models.load(MODEL) if args.weights is None else models.load(MODEL, path=args.weights, check=False)


def run(args, save: Callable[[Dict], None], previous: Optional[Dict] = None) -> Dict:
    """Sample every wanted variant (quality.run_model); ``save`` gets the results so far after each.
    ``previous``: earlier results, kept where this run does not redo a variant."""
    import torch

    from devtools.testkit.shapes import evaluate, oracle

    if args.threads:
        torch.set_num_threads(args.threads)
    prompts = evaluate.prompt_grid(args.seeds, evaluate.ALL_CLIP_PROMPTS)
    wanted = set(args.variants or [v.key for v in VARIANTS]) | {"full"}
    unknown = wanted - {v.key for v in VARIANTS}
    if unknown:
        raise SystemExit(f"unknown variant(s) {sorted(unknown)}; expected keys of: {[v.key for v in VARIANTS]}")
    results = {MODEL: dict((previous or {}).get(MODEL, {}))}
    quality.run_model(load(args), VARIANTS, wanted, prompts, oracle.load(), None, results[MODEL],
                      lambda: save(results), steps=args.steps)
    return results


def _cell(value, form: str) -> str:
    return "n/a" if value is None else format(value, form)


def _negative(r: Dict) -> str:
    """The negative prompt as the table shows it: empty, or quoted (marked where the model knows none of it)."""
    if not r.get("negative"):
        return ""
    return f'"{r["negative"]}"' + ("" if r.get("negative_words") else ' (unknown: as "")')


def table(payload: Dict, name: str) -> str:
    """NAME.md: what was measured, then one row per variant in the catalogue's order."""
    lines = [f"# {name}: speed against quality on the trained video model", "",
             f"{payload['samples_per_variant']} clips per variant ({PROMPTS} prompts x {payload['seeds']} seeds) of "
             f"{MODEL} ({payload['weights']}), 128x128 px, length 13 (4 latent frames), euler, {payload['steps']} "
             f"steps, {payload['device']}. Evaluations: rows at the network's first layer against the full run. "
             "Colour, shape, direction: the share of clips the oracle reads as the prompt asked (all: the three "
             "at once). Flicker: the mean frame-to-frame change of the background (real clips: 0), over the "
             "clips that show background (n/a: none did). PSNR against the full run's clip of the same seed "
             "(100 dB = identical).",
             ""]
    for model, variants in payload["results"].items():
        lines += [f"## {model}", "",
                  "| variant | CFG | negative | evaluations | wall s | colour | shape | direction | all | flicker "
                  "| PSNR dB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for _key, r in quality.ordered(variants, VARIANTS):
            if "error" in r:
                lines.append(f"| {r['label']} | | | refused: {r['error'][:80]} | | | | | | | |")
                continue
            lines.append(f"| {r['label']} | {r['cfg']:g} | {_negative(r)} | {r['evaluations']:.0%} | "
                         f"{r['wall_s']:.1f} | {r['accuracy_colour']:.1%} | {r['accuracy_shape']:.1%} | "
                         f"{r['accuracy_direction']:.1%} | {r['accuracy_all']:.1%} | {_cell(r['flicker'], '.4f')} "
                         f"| {_cell(r.get('psnr_db'), '.1f')} |")
        lines.append("")
    return "\n".join(lines)


def redraw(payload: Dict, name: str, out=None) -> None:
    """NAME.md and NAME.png (PSNR against evaluations saved, drawn by quality.py; none for a guidance-only run)
    in ``out`` (default bench/results/)."""
    out = Path(out or _common.RESULTS_DIR)
    (out / f"{name}.md").write_text(table(payload, name))
    chart = out / f"{name}.png"
    chart.unlink(missing_ok=True)
    if any(quality.speed_points(variants) for variants in payload["results"].values()):
        quality.draw_chart(payload["results"], chart)


def main(argv=None):
    args = parse_args(argv)
    meta = {"model": MODEL, "weights": weights_label(args), "seeds": args.seeds,
            "samples_per_variant": PROMPTS * args.seeds, "steps": args.steps}
    quality.cli(args, run, redraw, meta)


if __name__ == "__main__":
    main()
