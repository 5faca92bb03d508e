"""Wan 2.1 at real width: step caches against ComfyUI's, and the cost of the attention-guidance pass.

The model is ComfyUI's WanModel at the 1.3B model's width (bench/models.py ``wan``: dim 1536, 12
heads, FFN 8960, 4096-d T5 context) with its depth reduced to ``WAN_DEPTH`` blocks, random
weights; the cost per block is the real one. One process, one run, every variant on the same
noise and prompts:

* whole sampling runs (``comfy.sample.sample``, euler/simple, CFG 5, 20 steps by default) at 480p
  and 17 frames: uncached, PatchLab StepCache at its defaults and with the first-block indicator,
  ComfyUI's EasyCache and LazyCache at their defaults. Per variant: wall time, speed-up, rows
  evaluated at the network's output layer (share of uncached), and the distance of the final latent
  from the uncached one (relative L2, PSNR over the latent's range);
* one guided step each: CFG alone, then PAG, SEG and SLG at ``auto`` (one extra pass of one row),
  and the three together (one batched extra pass of three rows): the step's cost against CFG alone.

    .venv/bin/python bench/wan.py                                   # 832x480, 17 frames, 20 steps
    .venv/bin/python bench/wan.py --width 416 --height 240 --frames 9 --steps 10   # a quicker look

Random weights say what a cache costs and saves, not what it does to a picture (issue 21's trained
models do that); the distances compare variants with each other.
"""

from __future__ import annotations

import argparse
import math

import _common


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cfg", type=float, default=5.0)
    parser.add_argument("--depth", type=int, default=None,
                        help="blocks in the network (default bench/models.py's WAN_DEPTH; the 1.3B model has 30)")
    parser.add_argument("--caches", default="uncached,stepcache,firstblock,easycache,lazycache",
                        help="comma-separated cache variants to run; uncached is always run (the reference)")
    parser.add_argument("--guidance-repeats", type=int, default=2, help="timed repeats of each guided step")
    parser.add_argument("--skip-caches", action="store_true", help="only the attention-guidance step costs")
    parser.add_argument("--skip-guidance", action="store_true", help="only the whole cached runs")
    return parser.parse_args()


def distance(out, reference):
    """(relative L2, PSNR in dB over the reference's value range) of a final latent."""
    error = (out.float() - reference.float())
    relative = float(error.norm() / reference.float().norm())
    span = float(reference.max() - reference.min())
    mse = float(error.square().mean())
    return round(relative, 5), (round(10 * math.log10(span * span / mse), 2) if mse > 0 else None)


def main():
    args = parse_args()
    _common.boot()
    import models
    import torch

    import nodes as comfy_nodes
    from devtools import checks
    from devtools.sampling import server_sample
    from devtools.testkit.counting import count_rows
    from patchlab.nodes import attention_guidance as ag_nodes
    from patchlab.nodes.step_cache import StepCache

    if args.depth is not None:
        models.CONFIGS["wan"]["num_layers"] = args.depth
    depth = models.CONFIGS["wan"]["num_layers"]
    model = models.build("wan")
    positive, negative = models.conditioning("wan", seed=1), models.conditioning("wan", seed=2)
    latent = models.empty_video_latent("wan", args.width, args.height, args.frames)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(0))

    def run(patched, steps):
        with count_rows(model, "head") as counted:  # the output layer: a first-block reuse stops before it
            out = server_sample(patched, noise, steps, args.cfg, "euler", "simple", positive, negative, latent,
                                disable_pbar=True, seed=0)
        return out, counted.rows

    results = {"caches": [], "guidance": []}
    run(model, 1)  # warm-up (allocations, attention backend)
    if not args.skip_caches:
        defaults = _common.node_defaults(StepCache)
        core = _common.CORE_CACHE_DEFAULTS
        chosen = set(args.caches.split(",")) | {"uncached"}
        variants = [(label, patched) for key, label, patched in [
            ("uncached", "uncached", model),
            ("stepcache", f"StepCache defaults {defaults}", checks.run_node(StepCache, model=model, **defaults)[0]),
            ("firstblock", "StepCache first block, threshold 0.1",
             checks.run_node(StepCache, model=model, **{**defaults, "indicator": "first block",
                                                        "threshold": 0.1})[0]),
            ("easycache", "core EasyCache (defaults)",
             checks.run_node(comfy_nodes.NODE_CLASS_MAPPINGS["EasyCache"], model=model, **core)[0]),
            ("lazycache", "core LazyCache (defaults)",
             checks.run_node(comfy_nodes.NODE_CLASS_MAPPINGS["LazyCache"], model=model, **core)[0]),
        ] if key in chosen]
        reference = None
        for label, patched in variants:
            holder = {}
            timing = _common.time_call(lambda p=patched, h=holder: h.update(result=run(p, args.steps)), repeats=1,
                                       warmup=0)
            out, rows = holder["result"]
            if reference is None:
                reference, base_seconds, base_rows = out, timing["min_s"], rows
            relative, psnr = distance(out, reference)
            entry = {"variant": label, "seconds": round(timing["min_s"], 2),
                     "speedup": round(base_seconds / timing["min_s"], 3), "rows_evaluated": rows,
                     "rows_share": round(rows / base_rows, 3), "relative_l2": relative, "psnr_db": psnr}
            results["caches"].append(entry)
            print(entry, flush=True)
    if not args.skip_guidance:
        window = {"start_percent": 0.0, "end_percent": 1.0}
        pag = (ag_nodes.PerturbedAttentionGuidance, {"scale": 2.0, "blocks": "auto", "rescale": 0.0})
        seg = (ag_nodes.SmoothedEnergyGuidance, {"scale": 2.0, "blur_sigma": 10.0, "blocks": "auto"})
        slg = (ag_nodes.SkipLayerGuidance, {"scale": 2.0, "blocks": "auto", "rescaling_scale": 0.0})

        def stacked(*specs):
            patched = model
            for node, inputs in specs:
                patched = checks.run_node(node, model=patched, **inputs, **window)[0]
            return patched

        variants = [("CFG only", model), ("+ PAG", stacked(pag)), ("+ SEG", stacked(seg)), ("+ SLG", stacked(slg)),
                    ("+ PAG + SEG + SLG (one batched extra pass)", stacked(pag, seg, slg))]
        base = None
        for label, patched in variants:
            holder = {}
            timing = _common.time_call(lambda p=patched, h=holder: h.update(result=run(p, 1)),
                                       repeats=args.guidance_repeats, warmup=0)
            rows = holder["result"][1]
            base = base or timing["min_s"]
            entry = {"variant": label, "seconds": round(timing["min_s"], 2), "cost": round(timing["min_s"] / base, 3),
                     "rows_evaluated": rows}
            results["guidance"].append(entry)
            print(entry, flush=True)
    _common.write_results("wan", {
        "what": f"Wan 2.1 1.3B width, {depth} blocks (of 30), random weights; {args.width}x{args.height}, "
                f"{args.frames} frames (latent {list(latent.shape)}), euler/simple, cfg {args.cfg}; caches: whole "
                f"{args.steps}-step runs; guidance: one step; rows counted at the output layer (head)",
        "device": _common.device_name(),
        "results": results,
    })


if __name__ == "__main__":
    main()
