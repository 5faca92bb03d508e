"""Speed against quality on the trained reference models (``sd15_shapes``, ``flux_shapes``).

Every speed node and its core counterpart, and what the guidance nodes do to the
picture: for each variant, every ``"<colour> <shape>"`` prompt with ``--seeds`` seeds
(18 x 16 = 288 samples by default), euler, 20 steps, the recommended CFG (variants
marked "CFG 1" at CFG 1), the same initial noise for every variant, through ComfyUI's
own sampler. Per variant: model evaluations (batch rows at the network's first layer,
as a share of the full-compute run), wall time, prompt accuracy (the oracle classifier
reads colour and shape), FID on the classifier's features against 2,000 held-out real
pictures, and PSNR against the full-compute picture of the same seed.

    .venv/bin/python bench/quality.py                       # both models, every variant
    .venv/bin/python bench/quality.py --models sd15_shapes --seeds 4 --variants full stepcache
    .venv/bin/python bench/quality.py --replot              # table and chart again from results/quality.json
    .venv/bin/python bench/quality.py --name N --merge --variants tpg   # redo some variants of results/N.json

Writes ``results/quality.json``, ``quality.md`` and ``quality.png`` (``--publish``: also to ``figures/``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import _common

UNET, DIT = "sd15_shapes", "flux_shapes"
BOTH = (UNET, DIT)


@dataclass(frozen=True)
class Variant:
    key: str
    label: str
    models: Tuple[str, ...]
    kind: str                     # "reference", "ours", "core": how the chart marks it
    group: str                    # "speed" or "guidance"
    make: Callable                # (model, name) -> patched model
    cfg: Optional[float] = None   # None: the model's recommended CFG
    negative: str = ""            # the sampler's negative prompt (NAG reads it at CFG 1)


def ours(node_id: str, **inputs):
    def make(model, _name):
        from devtools.testkit.shapes import evaluate
        from patchlab.nodes import NODE_CLASS_MAPPINGS

        return evaluate.with_defaults(NODE_CLASS_MAPPINGS[node_id], model, **inputs)
    return make


def core(node_id: str, **inputs):
    def make(model, _name):
        import nodes as comfy_nodes
        from devtools import checks

        return checks.run_node(comfy_nodes.NODE_CLASS_MAPPINGS[node_id], model=model, **inputs)[0]
    return make


def unpatched(model, _name):
    return model


def stepcache_gain(gain: float):
    """StepCache at its defaults with another forecast gain (a field of its spec, not an input of the node)."""
    def make(model, _name):
        import dataclasses

        from patchlab.nodes import step_cache as nodes
        from patchlab.patches import step_cache as sc

        spec = nodes.StepCache.spec(model, **_common.node_defaults(nodes.StepCache))
        return sc.with_step_cache(model, dataclasses.replace(spec, forecast_gain=gain))
    return make


CORE_CACHE = _common.CORE_CACHE_DEFAULTS
FULL = {"start_percent": 0.0, "end_percent": 1.0}
VARIANTS: List[Variant] = [
    Variant("full", "full compute", BOTH, "reference", "speed", unpatched),
    Variant("cfg1", "CFG 1 (no negative pass)", BOTH, "reference", "speed", unpatched, cfg=1.0),
    Variant("tome", "ToMe 0.5 (PatchLab)", (UNET,), "ours", "speed",
            ours("PatchLab_TokenMerging", ratio=0.5, max_downsample=1)),
    Variant("todo", "ToDo 2x (PatchLab)", (UNET,), "ours", "speed",
            ours("PatchLab_TokenDownsampling", max_downsample=1)),
    Variant("core_tome", "ToMe 0.5 (core TomePatchModel)", (UNET,), "core", "speed", core("TomePatchModel", ratio=0.5)),
    Variant("stepcache", "StepCache defaults (PatchLab)", BOTH, "ours", "speed", ours("PatchLab_StepCache")),
    *[Variant(f"stepcache_{mode}_{t}", f"StepCache {mode} {t}", BOTH, "ours", "speed",
              ours("PatchLab_StepCache", threshold=t, reuse=mode))
      for mode in ("forecast", "plain") for t in (0.1, 0.2, 0.5, 0.8)],
    *[Variant(f"stepcache_max_{m}", f"StepCache max_consecutive {m}", BOTH, "ours", "speed",
              ours("PatchLab_StepCache", max_consecutive=m)) for m in (2, 5)],
    *[Variant(f"stepcache_gain_{g}", f"StepCache forecast gain {g}", BOTH, "ours", "speed", stepcache_gain(g))
      for g in (0.25, 0.75, 1.0)],
    *[Variant(f"deepcache_{i}", f"DeepCache interval {i} (PatchLab)", (UNET,), "ours", "speed",
              ours("PatchLab_DeepCache", interval=i)) for i in (2, 3, 5)],
    *[Variant(f"deepcache_3_depth_{d}", f"DeepCache interval 3, depth {d} (PatchLab)", (UNET,), "ours", "speed",
              ours("PatchLab_DeepCache", interval=3, depth=d)) for d in (1, 3)],
    Variant("core_easycache", "EasyCache (core, defaults)", BOTH, "core", "speed", core("EasyCache", **CORE_CACHE)),
    Variant("core_lazycache", "LazyCache (core, defaults)", BOTH, "core", "speed", core("LazyCache", **CORE_CACHE)),
    Variant("guidance_interval", "GuidanceInterval defaults (PatchLab)", BOTH, "ours", "speed",
            ours("PatchLab_GuidanceInterval")),
    Variant("adaptive_guidance", "AdaptiveGuidance defaults (PatchLab)", BOTH, "ours", "speed",
            ours("PatchLab_AdaptiveGuidance")),
    *[Variant(f"adaptive_guidance_{t}", f"AdaptiveGuidance {t}", BOTH, "ours", "speed",
              ours("PatchLab_AdaptiveGuidance", threshold=t)) for t in (0.995, 0.998, 0.999)],
    Variant("renorm_paper", "RenormCFG truncating the last 30 % (PatchLab)", BOTH, "ours", "speed",
            ours("PatchLab_RenormCFG", cfg_trunc=70.0, renorm_cfg=0.0, truncate="paper", **FULL)),
    # guidance nodes: what they do to accuracy and FID
    *[Variant(f"{key}{suffix}", f"{label}{' at CFG 1' if cfg else ''}", models, "ours", "guidance", ours(node), cfg)
      for key, label, node, models in (
          ("sag", "SAG (PatchLab)", "PatchLab_SelfAttentionGuidance", (UNET,)),
          ("pag", "PAG (PatchLab)", "PatchLab_PerturbedAttentionGuidance", BOTH),
          ("seg", "SEG (PatchLab)", "PatchLab_SmoothedEnergyGuidance", BOTH),
          ("slg", "SLG (PatchLab)", "PatchLab_SkipLayerGuidance", BOTH),
          ("tpg", "TPG (PatchLab)", "PatchLab_TokenPerturbationGuidance", BOTH))
      for suffix, cfg in (("", None), ("_cfg1", 1.0))],
    Variant("nag_cfg1", "NAG at CFG 1 (PatchLab; negative: the empty prompt)", BOTH, "ours", "guidance",
            ours("PatchLab_NormalizedAttentionGuidance"), 1.0),
    *[Variant(key, label, models, "ours", "guidance", ours(node))
      for key, label, node, models in (
          ("rescale_cfg", "RescaleCFG", "PatchLab_RescaleCFG", BOTH),
          ("cfg_norm", "CFGNorm", "PatchLab_CFGNorm", BOTH),
          ("apg", "APG", "PatchLab_AdaptiveProjectedGuidance", BOTH),
          ("tcfg", "TCFG", "PatchLab_TangentialDampingCFG", BOTH),
          ("mahiro", "Mahiro", "PatchLab_Mahiro", BOTH),
          ("cfg_zero_star", "CFGZeroStar", "PatchLab_CFGZeroStar", BOTH),
          ("fresca", "FreSca", "PatchLab_FreSca", BOTH),
          ("freeu", "FreeU", "PatchLab_FreeU", (UNET,)),
          ("freeu_v2", "FreeU_V2", "PatchLab_FreeU_V2", (UNET,)))],
]


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(BOTH), choices=list(BOTH))
    add_options(parser, "quality", seeds=16, prompts=18)
    return parser.parse_args()


def add_options(parser: argparse.ArgumentParser, name: str, seeds: int, prompts: int) -> None:
    """The options quality.py and quality_video.py share (``cli`` reads them)."""
    parser.add_argument("--variants", nargs="+", help="variant keys (default: all; 'full' always runs)")
    parser.add_argument("--seeds", type=int, default=seeds, help=f"seeds per prompt ({prompts} prompts)")
    parser.add_argument("--name", default=name)
    parser.add_argument("--publish", action="store_true", help="copy NAME.json/.md/.png to bench/figures/")
    parser.add_argument("--replot", action="store_true", help="only redraw NAME.md and NAME.png")
    parser.add_argument("--merge", action="store_true",
                        help="keep the variants of results/NAME.json that this run does not redo")


def measure(variant: Variant, trained, prompts, count_at: Optional[str] = None,
            **sampling) -> Tuple[Optional[object], Dict]:
    """Sample ``prompts`` with the variant's patched model, counting the rows at the network's first layer (or at
    the module named ``count_at``): (samples, {"rows", "wall_s"}), or (None, {"label", "error"}) where the node
    refuses the model. ``sampling``: further arguments of ``evaluate.sample`` (steps)."""
    from devtools.testkit.counting import count_rows
    from devtools.testkit.shapes import evaluate

    try:
        patched = variant.make(trained.model, trained.name)
    except Exception as error:  # noqa: BLE001 - a node refusing a model is a result too
        return None, {"label": variant.label, "error": f"{type(error).__name__}: {error}"}
    start = time.perf_counter()
    with count_rows(trained.model, count_at) as count:
        samples = evaluate.sample(trained, prompts, model=patched, cfg=variant.cfg, negative=variant.negative,
                                  **sampling)
    return samples, {"rows": count.rows, "wall_s": round(time.perf_counter() - start, 2)}


def judged(variant: Variant, name: str, samples, facts: Dict, rows_full: int, classifier, reference=None,
           full=None) -> Dict:
    """The result of one variant on model ``name``: ``evaluate.judge``'s figures (accuracy, FID against
    ``reference``, PSNR against ``full``; clips: direction and flicker too) with what ``measure`` found, the
    evaluations as a share of ``rows_full`` (the full run's rows) and the CFG and negative prompt it ran at."""
    from devtools.testkit.shapes import evaluate, models

    result = evaluate.judge(samples, classifier, reference, full)
    result.update(label=variant.label, kind=variant.kind, group=variant.group, rows=facts["rows"],
                  evaluations=round(facts["rows"] / rows_full, 4), wall_s=facts["wall_s"],
                  cfg=variant.cfg or evaluate.RECOMMENDED_CFG[name])
    if variant.negative:  # with the words the model knows of it (unknown words encode as nothing)
        result.update(negative=variant.negative,
                      negative_words=models.words(variant.negative, models.spec(name).vocabulary))
    return result


def run_model(trained, catalogue: List[Variant], wanted, prompts, classifier, reference, results: Dict,
              saved: Callable[[], None], count_at: Optional[str] = None, **sampling) -> None:
    """Every wanted variant of ``catalogue`` (``full`` first: the others are measured against it) on one model,
    into ``results`` (variant key -> result); ``saved()`` after each. ``count_at``: see ``measure``."""
    rows_full, full = None, None
    for variant in catalogue:
        if variant.key not in wanted or trained.name not in variant.models:
            continue
        samples, facts = measure(variant, trained, prompts, count_at, **sampling)
        if samples is None:
            results[variant.key] = facts
            print(f"{trained.name} {variant.key}: {facts['error']}")
            continue
        if variant.key == "full":
            rows_full, full = facts["rows"], samples
        results[variant.key] = judged(variant, trained.name, samples, facts, rows_full, classifier, reference, full)
        print(f"{trained.name} {variant.key}: {json.dumps(results[variant.key])}", flush=True)
        saved()


def run(args, save: Callable[[Dict], None], previous: Optional[Dict] = None) -> Dict:
    """Sample every wanted variant; ``save`` gets the results so far after each (a long run keeps what it did).
    ``previous``: earlier results per model, kept where this run does not redo a variant."""
    from devtools.testkit.shapes import evaluate, models, oracle

    classifier = oracle.load()
    reference = oracle.reference_set()
    prompts = evaluate.prompt_grid(args.seeds)
    wanted = set(args.variants or [v.key for v in VARIANTS]) | {"full"}
    results: Dict[str, Dict] = {}
    for name in args.models:
        results[name] = dict((previous or {}).get(name, {}))
        run_model(models.load(name), VARIANTS, wanted, prompts, classifier, reference, results[name],
                  lambda: save(results))
    return results


def ordered(variants: Dict, catalogue: List[Variant]) -> List[Tuple[str, Dict]]:
    """(key, result) in the catalogue's order, however the runs were merged (unknown keys last)."""
    order = {v.key: i for i, v in enumerate(catalogue)}
    return sorted(variants.items(), key=lambda item: order.get(item[0], len(order)))


def redraw(payload: Dict, name: str, out=None) -> None:
    """NAME.md and NAME.png (none for a guidance-only run) in ``out`` (default bench/results/)."""
    out = out or _common.RESULTS_DIR
    results = payload["results"]
    lines = [f"# {name}: speed against quality on the trained reference models", "",
             f"{payload['samples_per_variant']} samples per variant (18 prompts x {payload['seeds']} seeds), euler, "
             f"20 steps, {payload['device']}. Evaluations: rows at the network's first layer against the full run; "
             "PSNR against the full run's picture of the same seed (100 dB = identical); FID on the oracle "
             "classifier's features against 2,000 held-out pictures. DeepCache, ToMe and ToDo save work inside "
             "each evaluation, so their rows are a full run's and the chart leaves them out: compare their wall "
             "time (some of these runs shared the machine's other core, so wall times are rough).", ""]
    for model, variants in results.items():
        lines += [f"## {model}", "", "| variant | CFG | evaluations | wall s | colour | shape | both | FID | PSNR dB |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for _key, r in ordered(variants, VARIANTS):
            if "error" in r:
                lines.append(f"| {r['label']} | | refused: {r['error'][:80]} | | | | | | |")
                continue
            lines.append(f"| {r['label']} | {r['cfg']:g} | {r['evaluations']:.0%} | {r['wall_s']:.1f} | "
                         f"{r['accuracy_colour']:.1%} | {r['accuracy_shape']:.1%} | {r['accuracy_both']:.1%} | "
                         f"{r['fid']:.2f} | {r.get('psnr_db', float('nan')):.1f} |")
        lines.append("")
    (out / f"{name}.md").write_text("\n".join(lines))
    chart = out / f"{name}.png"
    chart.unlink(missing_ok=True)
    if any(speed_points(variants) for variants in results.values()):
        draw_chart(results, chart)  # a guidance-only run has nothing to plot on the speed axis


def speed_points(variants: Dict) -> List[Tuple[float, float, Dict]]:
    """(share of evaluations saved, PSNR capped at 60 dB, result) of the speed variants that save evaluations.
    DeepCache, ToMe and ToDo save work inside each evaluation (every row still reaches the first layer): they have
    no place on this axis; the table gives their wall time."""
    return [(1 - r["evaluations"], min(r["psnr_db"], 60.0), r) for key, r in variants.items()
            if "error" not in r and r["group"] == "speed" and key != "full" and r["evaluations"] < 0.999]


def draw_chart(results: Dict, path) -> None:
    """PSNR against the share of evaluations saved, one panel per model (PIL, as bench/run.py draws its charts)."""
    from PIL import Image, ImageDraw

    panel_w, panel_h, margin = 560, 420, 60
    image = Image.new("RGB", (panel_w * len(results), panel_h + 30), "white")
    pen = ImageDraw.Draw(image)
    colours = {"ours": (31, 119, 180), "core": (214, 39, 40), "reference": (0, 0, 0)}
    for panel, (model, variants) in enumerate(results.items()):
        left, top = panel * panel_w + margin, 30
        width, height = panel_w - margin - 20, panel_h - margin - 10
        points = speed_points(variants)
        top_db = max([p[1] for p in points] + [40.0])

        def at(saved, db, left=left, top=top, width=width, height=height, top_db=top_db):
            return left + saved / 0.8 * width, top + height - db / top_db * height

        pen.text((left, 8), f"{model}: PSNR vs evaluations saved (blue ours, red core)", fill="black")
        pen.line([(left, top), (left, top + height), (left + width, top + height)], fill="black")
        for tick in range(0, 9, 2):
            x, y = at(tick / 10, 0)
            pen.text((x - 8, y + 4), f"{tick * 10}%", fill="black")
        for db in range(0, int(top_db) + 1, 10):
            x, y = at(0, db)
            pen.text((x - 28, y - 6), f"{db} dB", fill="black")
            pen.line([(x, y), (left + width, y)], fill=(225, 225, 225))
        taken = []  # label boxes drawn so far: a label that would overlap one moves down a line
        for saved, db, r in sorted(points, key=lambda p: -p[1]):
            x, y = at(saved, db)
            colour = colours[r["kind"]]
            pen.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
            label = r["label"].replace(" (PatchLab)", "").replace(" (core, defaults)", " core")[:34]
            box = [x + 5, y - 5, x + 5 + pen.textlength(label), y + 6]
            while any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in taken):
                box[1] += 11
                box[3] += 11
            if box[1] > y + 6:
                pen.line([(x + 3, y), (box[0], box[1] + 5)], fill=colour)
            taken.append(box)
            pen.text((box[0], box[1]), label, fill=colour)
        pen.text((left + width / 2 - 80, top + height + 22), "share of model evaluations saved", fill="black")
    image.save(path)


def main():
    args = parse_args()
    cli(args, run, redraw, {"seeds": args.seeds, "samples_per_variant": 18 * args.seeds})


def cli(args, run: Callable, redraw: Callable, meta: Dict) -> None:
    """The command's course, shared with quality_video.py: sample (``run(args, save, previous)``; with ``--merge``
    the variants of results/NAME.json it does not redo are kept) or, with ``--replot``, only read
    results/NAME.json; then ``redraw`` NAME.md and NAME.png, and with ``--publish`` copy them to figures/.
    ``meta``: what the JSON records beside the results."""
    path = _common.RESULTS_DIR / f"{args.name}.json"
    if args.replot:
        payload = json.loads(path.read_text())
    else:
        _common.boot(cpu=True)
        def save(results):
            _common.write_results(args.name, {**meta, "results": results}, echo=False)

        previous = json.loads(path.read_text())["results"] if args.merge and path.exists() else None
        save(run(args, save, previous))
        payload = json.loads(path.read_text())
    redraw(payload, args.name)
    if args.publish:
        figures = _common.REPO_ROOT / "bench" / "figures"
        for suffix in (".json", ".md", ".png"):
            if (_common.RESULTS_DIR / f"{args.name}{suffix}").exists():
                shutil.copy(_common.RESULTS_DIR / f"{args.name}{suffix}", figures / f"{args.name}{suffix}")


if __name__ == "__main__":
    main()
