"""Whole sampling runs: uncached vs ComfyUI's EasyCache and LazyCache (defaults) vs PatchLab's StepCache.

For each model: wall time of a whole KSampler-style run (``comfy.sample.sample``),
speed-up over uncached, the model rows the network evaluated (counted at its output
layer) and the relative L2 distance of the final latent from the uncached one, for the
core caches at their defaults, StepCache at its defaults, the other indicator and
reuse mode, and a threshold trade-off curve. All variants in one process and one run.

    .venv/bin/python bench/step_cache.py                                  # sd15 + flux, 20 steps, 32x32 latent
    .venv/bin/python bench/step_cache.py --models sd15 --size 64 --steps 20 --thresholds 0.1 0.3 0.6
"""

from __future__ import annotations

import argparse

import _common

MODELS = {
    "sd15": {"layout": "sd15", "overrides": {"model_channels": 64}, "deep": "out",
             "about": "tiny SD1.5 layout, model_channels 64"},
    "sdxl": {"layout": "sdxl", "overrides": {}, "deep": "out", "about": "tiny SDXL layout"},
    "flux": {"layout": "flux", "overrides": {}, "deep": "final_layer", "about": "tiny Flux layout"},
}
CORE_DEFAULTS = _common.CORE_CACHE_DEFAULTS


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["sd15", "flux"], choices=list(MODELS))
    parser.add_argument("--size", type=int, default=32, help="latent side (pixels / 8)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cfg", type=float, default=5.0)
    parser.add_argument("--sampler", default="euler")
    parser.add_argument("--scheduler", default="normal")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.5, 0.8],
                        help="StepCache thresholds of the trade-off curve (indicator input, forecast)")
    parser.add_argument("--first-block-thresholds", type=float, nargs="+", default=[0.1, 0.2, 0.3],
                        help="StepCache thresholds with indicator first block (max_consecutive 3)")
    parser.add_argument("--repeats", type=int, default=1)
    return parser.parse_args()


def main():
    args = parse_args()
    _common.boot()
    import nodes as comfy_nodes
    from devtools import checks
    from devtools.sampling import sample
    from devtools.testkit import tiny_models
    from devtools.testkit.counting import count_rows
    from patchlab.nodes.step_cache import StepCache

    defaults = _common.node_defaults(StepCache)
    results = {}
    rows = {}
    for name in args.models:
        info = MODELS[name]
        layout = info["layout"]
        model = tiny_models.build_model(layout, **info["overrides"])

        def run(patched, model=model, layout=layout, deep=info["deep"]):
            with count_rows(model, deep) as counted:
                out = sample(patched, layout, steps=args.steps, cfg=args.cfg, sampler=args.sampler,
                             scheduler=args.scheduler, height=args.size, width=args.size)
            return out, counted.rows

        variants = [("uncached", model),
                    ("core EasyCache (defaults)", checks.run_node(comfy_nodes.NODE_CLASS_MAPPINGS["EasyCache"],
                                                                  model=model, **CORE_DEFAULTS)[0]),
                    ("core LazyCache (defaults)", checks.run_node(comfy_nodes.NODE_CLASS_MAPPINGS["LazyCache"],
                                                                  model=model, **CORE_DEFAULTS)[0]),
                    (f"StepCache defaults {defaults}", checks.run_node(StepCache, model=model, **defaults)[0]),
                    ("StepCache defaults, reuse plain",
                     checks.run_node(StepCache, model=model, **{**defaults, "reuse": "plain"})[0])]
        for threshold in args.first_block_thresholds:
            variants.append((f"StepCache first block, threshold {threshold}",
                             checks.run_node(StepCache, model=model, **{**defaults, "indicator": "first block",
                                                                        "threshold": threshold,
                                                                        "max_consecutive": 3})[0]))
        for threshold in args.thresholds:
            variants.append((f"StepCache input, threshold {threshold}, max_consecutive 4",
                             checks.run_node(StepCache, model=model, **{**defaults, "threshold": threshold,
                                                                        "max_consecutive": 4})[0]))
        run(model)  # warm-up
        reference = None
        for label, patched in variants:
            timing = _common.time_call(lambda key=(name, label), patched=patched: rows.update({key: run(patched)}),
                                       repeats=args.repeats, warmup=0)
            out, counted = rows[(name, label)]
            if reference is None:
                reference, base_seconds, base_rows = out, timing["min_s"], counted
            results.setdefault(name, []).append({
                "variant": label,
                "seconds": round(timing["min_s"], 3),
                "speedup": round(base_seconds / timing["min_s"], 3),
                "rows_evaluated": counted,
                "rows_share": round(counted / base_rows, 3),
                "relative_l2": round(float((out - reference).norm() / reference.norm()), 5),
            })
    _common.write_results("step_cache", {
        "what": f"whole sampling runs, {args.steps} steps {args.sampler}/{args.scheduler}, cfg {args.cfg}, "
                f"latent {args.size}x{args.size}, batch 1; rows counted at the network's output layer",
        "models": {name: MODELS[name]["about"] for name in args.models},
        "results": results,
    })


if __name__ == "__main__":
    main()
