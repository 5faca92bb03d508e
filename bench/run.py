"""Speed of every speed node on real-size models, through ComfyUI's sampler, side by side with core.

For each case (architecture and image size) every variant runs the way KSampler runs it
(``comfy.sample.sample``: ComfyUI decides how cond and uncond are batched), with
variants interleaved round by round after a warm-up, best of the rounds:

* ``one step``: one CFG sampling step (one model evaluation of cond and uncond);
* ``sample``: a whole run of ``--steps`` steps (20 in the full run), after the one-step
  rounds, with the relative L2 distance of its final latent from the unpatched one.
  Nodes that save work across steps (StepCache, DeepCache, core EasyCache/LazyCache,
  guidance skipping) are timed as whole samples only;

plus the peak memory of one step (CUDA allocator peak, or the process's resident-set
high-water mark on the CPU) and each variant's speed-up over unpatched. Results:
``bench/results/run.json``, ``run.md`` (a Markdown table) and ``run.png`` (speed-up per
node and case, core beside ours); ``--publish`` copies the JSON, table and chart to
``bench/figures/`` for the README.

    .venv/bin/python bench/run.py --quick          # SD1.5 at 512 and 768 px, one step each (CPU: ~15 min)
    .venv/bin/python bench/run.py                  # every case, 20-step samples (hours on a CPU)
    .venv/bin/python bench/run.py --device cuda    # fp16 on the GPU, ComfyUI's default attention
    .venv/bin/python bench/run.py --cases sdxl:1024 --variants unpatched patchlab_todo
    .venv/bin/python bench/run.py --cases sd15:512 --steps 20 --variants patchlab_deepcache core_lazycache
"""

from __future__ import annotations

import argparse
import shutil
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Tuple

import _common
import models

FULL_CASES = ["sd15:512", "sd15:768", "sdxl:1024", "flux:1024"]
QUICK_CASES = ["sd15:512", "sd15:768"]


@dataclass(frozen=True)
class Variant:
    """One way to run a model: a label, the families it applies to, and the patch (None = unpatched)."""

    name: str
    label: str
    families: Tuple[str, ...]
    core: bool
    patch: Callable  # (model, family) -> patched model
    sample_only: bool = False  # saves work across steps (caches, guidance skipping): timed as whole samples only


def _core(node_id: str, **inputs):
    def patch(model, family):
        import nodes as comfy_nodes
        from devtools import checks

        return checks.run_node(comfy_nodes.NODE_CLASS_MAPPINGS[node_id], model=model, **inputs)[0]
    return patch


def _ours(node_name: str, defaults: bool = False, **inputs):
    """A PatchLab node with ``inputs`` (callables get the family); ``defaults``: the node's defaults under them."""
    def patch(model, family):
        from devtools import checks
        from patchlab.nodes import NODE_CLASS_MAPPINGS

        node = NODE_CLASS_MAPPINGS[node_name]
        values = {**(_common.node_defaults(node) if defaults else {}),
                  **{k: (v(family) if callable(v) else v) for k, v in inputs.items()}}
        return checks.run_node(node, model=model, **values)[0]
    return patch


def _reach(family: str) -> int:
    """The token-merging depth that reaches a model's first attention: SD1.5 full resolution, SDXL 1/2."""
    return 1 if family == "sd15" else 2


UNETS = ("sd15", "sdxl")
ALL = ("sd15", "sdxl", "flux")
CORE_CACHE = _common.CORE_CACHE_DEFAULTS
VARIANTS = [
    Variant("unpatched", "unpatched", ("sd15", "sdxl", "flux"), False, lambda model, family: model),
    Variant("core_tome", "ToMe 0.5 (core TomePatchModel)", UNETS, True, _core("TomePatchModel", ratio=0.5)),
    Variant("patchlab_tome", "ToMe 0.5 (PatchLab)", UNETS, False,
            _ours("PatchLab_TokenMerging", ratio=0.5, max_downsample=_reach, stride_x=2, stride_y=2,
                  destinations="random", seed=0, metric="input", merge="queries, keys and values",
                  start_percent=0.0, end_percent=1.0)),
    Variant("patchlab_todo", "ToDo 2x (PatchLab, defaults)", UNETS, False,
            _ours("PatchLab_TokenDownsampling", downsample_factor=2.0, max_downsample=_reach,
                  method="nearest-exact", start_percent=0.0, end_percent=1.0)),
    Variant("core_easycache", "EasyCache (core, defaults)", ALL, True, _core("EasyCache", **CORE_CACHE), True),
    Variant("core_lazycache", "LazyCache (core, defaults)", ALL, True, _core("LazyCache", **CORE_CACHE), True),
    Variant("patchlab_stepcache", "StepCache (PatchLab, defaults)", ALL, False,
            _ours("PatchLab_StepCache", defaults=True), True),
    Variant("patchlab_deepcache", "DeepCache interval 3 (PatchLab)", UNETS, False,
            _ours("PatchLab_DeepCache", interval=3, depth=0, start_percent=0.0, end_percent=1.0), True),
    Variant("patchlab_guidance_interval", "Guidance interval (PatchLab, defaults)", UNETS, False,
            _ours("PatchLab_GuidanceInterval", defaults=True), True),
]


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"cases {' '.join(QUICK_CASES)}, one step only")
    parser.add_argument("--cases", nargs="+", help=f"model:pixels pairs (default {' '.join(FULL_CASES)})")
    parser.add_argument("--variants", nargs="+", choices=[v.name for v in VARIANTS])
    parser.add_argument("--steps", type=int, help="steps of the whole-sample timing (default 20; --quick: 0 = "
                        "skip); 0 skips it")
    parser.add_argument("--rounds", type=int, help="timed rounds after the warm-up (default 3; --quick: 2)")
    parser.add_argument("--sample-rounds", type=int, default=1, help="timed rounds of the whole samples (default 1)")
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    parser.add_argument("--name", default="run", help="results file stem: bench/results/NAME.{json,md,png}")
    parser.add_argument("--publish", action="store_true", help="copy NAME.json, NAME.md and NAME.png to bench/figures/")
    parser.add_argument("--replot", action="store_true", help="only redraw NAME.md and NAME.png from NAME.json")
    args = parser.parse_args()
    args.cases = args.cases or (QUICK_CASES if args.quick else FULL_CASES)
    args.steps = args.steps if args.steps is not None else (0 if args.quick else 20)
    args.rounds = args.rounds or (2 if args.quick else 3)
    return args


def sampler_run(model, family: str, pixels: int, steps: int, keep: Dict = None):
    """A KSampler-equivalent run: seeded noise, euler, normal schedule, cfg 7 (Flux: 1, guidance 3.5).

    With ``keep``, the last run's final latent is left in ``keep["latent"]``.
    """
    import comfy.sample

    from devtools.sampling import server_sample

    latent = models.empty_latent(family, pixels)
    noise = comfy.sample.prepare_noise(latent, 0)
    cfg = 1.0 if family == "flux" else 7.0
    positive, negative = models.conditioning(family, 1), models.conditioning(family, 2)

    def run():
        out = server_sample(model, noise, steps, cfg, "euler", "normal", positive, negative, latent,
                            disable_pbar=True, seed=0)
        if keep is not None:
            keep["latent"] = out
        return out
    return run


def measure_case(family: str, pixels: int, variants: List[Variant], args) -> Dict:
    import comfy.model_management
    import torch

    dtype = torch.float16 if comfy.model_management.get_torch_device().type == "cuda" else torch.float32
    base = models.build(family, dtype=dtype)
    sample_only = {v.name for v in variants if v.sample_only}
    patched = {v.name: v.patch(base, family) for v in variants if args.steps or not v.sample_only}
    row = {name: {} for name in patched}
    kinds = [("one_step", 1)] + ([("sample", args.steps)] if args.steps else [])
    for kind, steps in kinds:
        kept = {name: {} for name in patched}
        runs = {name: sampler_run(model, family, pixels, steps, kept[name]) for name, model in patched.items()
                if kind == "sample" or name not in sample_only}
        rounds = args.rounds if kind == "one_step" else args.sample_rounds
        # whole samples run after the one-step rounds warmed every model up: no extra warm-up sample
        for name, seconds in _common.interleaved(runs, rounds, warmup=kind == "one_step").items():
            row[name][kind] = {"seconds": round(min(seconds), 3), "all_seconds": [round(s, 3) for s in seconds],
                               "steps": steps}
            if kind == "sample":
                reference, latent = kept["unpatched"]["latent"].float(), kept[name]["latent"].float()
                row[name][kind]["relative_l2"] = round(float((latent - reference).norm() / reference.norm()), 5)
    for name, model in patched.items():
        if name not in sample_only:
            row[name]["peak_bytes_one_step"] = _common.peak_memory(
                sampler_run(model, family, pixels, 1))["peak_bytes"]
    for name in row:
        for kind in (kind for kind, _ in kinds if kind in row[name]):
            row[name][kind]["speedup"] = round(row["unpatched"][kind]["seconds"] / row[name][kind]["seconds"], 3)
    del patched, base
    comfy.model_management.soft_empty_cache()
    return row


def markdown(results: Dict, variants: List[Variant], meta: Dict) -> str:
    steps = meta["steps"]
    lines = [f"Machine: {meta['device']}; dtype {meta['dtype']}; through ComfyUI's sampler (euler, normal, cfg 7; "
             f"Flux cfg 1); one step: best of {meta['rounds']} interleaved rounds after a warm-up"
             + (f"; {steps}-step samples: best of {meta['sample_rounds']}" if steps else "") + ".", "",
             "| case | node | one step (s) | speed-up | "
             + (f"{steps}-step sample (s) | speed-up | distance | " if steps else "")
             + "peak memory of one step above the weights (MB) |",
             "|---|---|---|---|" + ("---|---|---|" if steps else "") + "---|"]
    labels = {v.name: v.label for v in variants}
    for case, row in results.items():
        for name, values in row.items():
            step = values.get("one_step")
            cells = [case, labels[name]] + ([f"{step['seconds']:.2f}", f"{step['speedup']:.2f}x"] if step
                                            else ["-", "-"])
            if steps:
                sample = values.get("sample")
                cells += ([f"{sample['seconds']:.1f}", f"{sample['speedup']:.2f}x",
                           f"{100 * sample['relative_l2']:.1f} %"] if sample else ["-", "-", "-"])
            peak = values.get("peak_bytes_one_step")
            cells.append(f"{peak / 2**20:.0f}" if peak else "-")
            lines.append("| " + " | ".join(cells) + " |")
    if steps:
        lines += ["", "distance: relative L2 distance of the final latent from the unpatched run's (random weights, "
                  "so larger than on a trained checkpoint)."]
    return "\n".join(lines) + "\n"


def speedup_of(values: Dict) -> float:
    """One-step speed-up, or the whole sample's for nodes that save work across steps."""
    return (values.get("one_step") or values["sample"])["speedup"]


def chart(results: Dict, variants: List[Variant], path) -> None:
    """Grouped bars: speed-up per case, one bar per variant (core grey); caches are timed as whole samples."""
    from PIL import Image, ImageDraw

    shown = [v for v in variants if v.name != "unpatched"]
    cases = list(results)
    group = 20 + 30 * max([1] + [sum(v.name in results[c] for v in shown) for c in cases])
    width, height, margin, bar = 160 + group * len(cases), 460, 60, 26
    legend = 16 * len(shown) + 20
    image = Image.new("RGB", (max(width, 520), height + legend), "white")
    pen = ImageDraw.Draw(image)
    top = max([1.0] + [speedup_of(row[v.name]) for row in results.values() for v in shown if v.name in row])
    scale = (height - 2 * margin) / (top * 1.15)
    base_y = height + legend - margin
    colours = [(66, 133, 244), (52, 168, 83), (251, 188, 5), (234, 67, 53), (171, 71, 188), (0, 172, 193)]
    greys = [(150, 150, 150), (95, 95, 95), (200, 200, 200)]
    pen.line([(margin, base_y), (image.width - 20, base_y)], fill="black")
    one_y = base_y - scale
    pen.line([(margin, one_y), (image.width - 20, one_y)], fill=(180, 180, 180))
    pen.text((8, one_y - 6), "1.0x", fill="black")
    colour_of, cores = {}, 0
    for i, variant in enumerate(shown):
        colour_of[variant.name] = greys[cores % len(greys)] if variant.core else colours[i % len(colours)]
        cores += variant.core
        pen.rectangle([margin + 10, 10 + i * 16, margin + 22, 22 + i * 16], fill=colour_of[variant.name])
        kind = " (whole sample)" if variant.sample_only else " (one step)"
        pen.text((margin + 28, 10 + i * 16), variant.label + kind, fill="black")
    for c, case in enumerate(cases):
        x0 = margin + 20 + c * group
        pen.text((x0, base_y + 8), case, fill="black")
        for i, variant in enumerate(v for v in shown if v.name in results[case]):
            value = speedup_of(results[case][variant.name])
            x = x0 + i * (bar + 4)
            pen.rectangle([x, base_y - value * scale, x + bar, base_y], fill=colour_of[variant.name])
            pen.text((x, base_y - value * scale - 14), f"{value:.2f}", fill="black")
            distance = (results[case][variant.name].get("sample") or {}).get("relative_l2")
            if variant.sample_only and distance is not None:
                pen.text((x, base_y + 22 + 12 * (i % 2)), f"{100 * distance:.0f}%", fill=(90, 90, 90))
    if any(v.sample_only for v in shown):
        pen.text((margin, image.height - 14), "under the bars: relative L2 distance of the final latent from the "
                 "unpatched run", fill=(90, 90, 90))
    image.save(path)


def replot(args) -> None:
    """Redraw the table and chart of an earlier run from its JSON (no model is built)."""
    import json

    redraw(json.loads((_common.RESULTS_DIR / f"{args.name}.json").read_text()), args.name)


def redraw(data: Dict, name: str, out=None) -> None:
    """NAME.md and NAME.png in ``out`` (default bench/results/) from a run's JSON."""
    names = {variant for row in data["results"].values() for variant in row}
    chosen = [v for v in VARIANTS if v.name in names]
    write_table_and_chart(data["results"], chosen, {"sample_rounds": 1, **data}, name, out)


def write_table_and_chart(results: Dict, variants: List[Variant], meta: Dict, name: str, out=None) -> None:
    out = out or _common.RESULTS_DIR
    (out / f"{name}.md").write_text(markdown(results, variants, meta))
    chart(results, variants, out / f"{name}.png")


def main():
    args = parse_args()
    if args.replot:
        return replot(args)
    _common.boot(cpu=None if args.device is None else args.device == "cpu")
    import comfy.model_management
    import torch

    chosen = [v for v in VARIANTS if args.variants is None or v.name in args.variants or v.name == "unpatched"]
    results = {}
    for case in args.cases:
        family, pixels = case.split(":")
        variants = [v for v in chosen if family in v.families]
        start = time.perf_counter()
        results[f"{family} {pixels}px"] = measure_case(family, int(pixels), variants, args)
        print(f"{case}: " + ", ".join(f"{n} {speedup_of(r)}x" for n, r in results[f"{family} {pixels}px"].items())
              + f" ({time.perf_counter() - start:.0f} s)", flush=True)
    device = comfy.model_management.get_torch_device()
    meta = {"device": _common.device_name(), "dtype": "float16" if device.type == "cuda" else "float32",
            "rounds": args.rounds, "sample_rounds": args.sample_rounds, "steps": args.steps,
            "torch": torch.__version__}
    models_info = {name: f"{name} real-size config, random weights" for name in models.CONFIGS}
    models_info["flux"] += f" (Flux.1 width; {models.FLUX_DEPTH} double + {models.FLUX_SINGLE} single blocks)"
    path = _common.write_results(args.name, {**meta, "models": models_info, "cases": args.cases,
                                             "results": results})
    write_table_and_chart(results, chosen, meta, args.name)
    if args.publish:
        figures = path.parent.parent / "figures"
        figures.mkdir(exist_ok=True)
        for name in (f"{args.name}.json", f"{args.name}.md", f"{args.name}.png"):
            shutil.copy(path.parent / name, figures / name)


if __name__ == "__main__":
    main()
