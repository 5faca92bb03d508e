"""Time saved by leaving the negative pass out: GuidanceInterval, AdaptiveGuidance, RenormCFG truncation.

KSampler-equivalent runs (``comfy.sample.sample``, euler, scheduler normal) of ``--steps`` steps
at CFG 7 on the SD1.5-layout bench model, timed against plain CFG in the same process. For
each variant: the batch rows the network evaluated (``count_rows``), the ideal time ratio
``rows / (2 * steps * batch)`` and the measured ratio. Variants: GuidanceInterval at its
defaults, AdaptiveGuidance at its default, PatchLab_RenormCFG truncating 30 % of the steps
(ComfyUI's rule, cfg_trunc = the sigma of the 7th step; and the paper's rule, cfg_trunc 70 %),
and ComfyUI's RenormCFG at the same cfg_trunc (it truncates but evaluates every negative).

    .venv/bin/python bench/guidance_skip.py [--size 64] [--channels 64] [--steps 20] [--repeats 2]
"""

from __future__ import annotations

import argparse

import _common


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=64, help="latent side (64 = 512 px)")
    parser.add_argument("--channels", type=int, default=64, help="model_channels of the SD1.5-layout model")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--cfg", type=float, default=7.0)
    return parser.parse_args()


def main():
    args = parse_args()
    _common.boot()
    import comfy.samplers

    import nodes as comfy_nodes
    from devtools import checks
    from devtools.sampling import sample
    from devtools.testkit import tiny_models
    from devtools.testkit.counting import count_rows
    from patchlab.nodes import cfg, guidance_skip

    model = tiny_models.build_model("sd15", model_channels=args.channels)
    full = {"start_percent": 0.0, "end_percent": 1.0}
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", args.steps)
    truncated = round(args.steps * 0.3)
    cfg_trunc = float(sigmas[truncated - 1]) - 1e-3  # sigma >= cfg_trunc at the first `truncated` steps

    def ours(node, **inputs):
        return checks.run_node(node, model=model, **inputs)[0]

    variants = {
        "plain CFG": model,
        "GuidanceInterval (defaults 0.186-0.928)": ours(guidance_skip.GuidanceInterval,
                                                        start_percent=guidance_skip.INTERVAL_START,
                                                        end_percent=guidance_skip.INTERVAL_END),
        f"AdaptiveGuidance (threshold {guidance_skip.ADAPTIVE_THRESHOLD})":
            ours(guidance_skip.AdaptiveGuidance, threshold=guidance_skip.ADAPTIVE_THRESHOLD, start_percent=0.0),
        f"PatchLab RenormCFG comfyui, cfg_trunc {cfg_trunc:.3f} (30 % of steps)":
            ours(cfg.RenormCFG, cfg_trunc=cfg_trunc, renorm_cfg=1.0, truncate="comfyui", **full),
        "PatchLab RenormCFG paper, cfg_trunc 70 (last 30 %)":
            ours(cfg.RenormCFG, cfg_trunc=70.0, renorm_cfg=1.0, truncate="paper", **full),
        f"core RenormCFG, cfg_trunc {cfg_trunc:.3f}":
            checks.run_node(comfy_nodes.NODE_CLASS_MAPPINGS["RenormCFG"], model=model, cfg_trunc=cfg_trunc,
                            renorm_cfg=1.0)[0],
    }

    def run(patched):
        return sample(patched, "sd15", steps=args.steps, cfg=args.cfg, height=args.size, width=args.size)

    results = {}
    for name, patched in variants.items():
        with count_rows(model) as count:  # also the warm-up run
            run(patched)
        timing = _common.time_call(lambda p=patched: run(p), repeats=args.repeats, warmup=0)
        results[name] = {"rows": count.rows, "ideal_ratio": count.rows / (2 * args.steps), **timing}
    base = results["plain CFG"]["median_s"]
    for entry in results.values():
        entry["time_ratio"] = entry["median_s"] / base
        entry["ratio_vs_ideal"] = entry["time_ratio"] / entry["ideal_ratio"]
    _common.write_results("guidance_skip", {
        "model": f"tiny SD1.5 layout, model_channels {args.channels} (random weights)",
        "latent": f"{args.size}x{args.size} ({args.size * 8} px), batch 1",
        "run": f"{args.steps} steps euler / normal, cfg {args.cfg}, median of {args.repeats} "
               "after 1 warm-up (the row-counting run)",
        "variants": results,
    })


if __name__ == "__main__":
    main()
