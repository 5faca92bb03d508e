"""DeepCache vs uncached vs core EasyCache/LazyCache on the real-size SD1.5 UNet (860 M, random weights).

Two measurements, in one process:

1. One model evaluation (the cond+uncond batch of a CFG step) at ``--size`` px, full and
   cached (DeepCache's shallow pass), and the speed-up of a ``--steps``-step run at
   ``--interval`` that follows from them (full steps x full time + cached steps x cached
   time; sampler overhead is negligible next to an 860 M UNet).
2. Whole KSampler runs (``comfy.sample.sample``, euler, CFG 7) at ``--sample-size`` px for
   ``--sample-steps`` steps: uncached, DeepCache, core EasyCache and LazyCache at their
   defaults: wall time, speed-up and the relative L2 distance of the final latent from
   the uncached one.

Target (issue 11): DeepCache interval 3 >= 2.0x over uncached at 20 steps, 512 px.

    .venv/bin/python bench/deep_cache.py                                   # defaults below
    .venv/bin/python bench/deep_cache.py --size 512 --sample-size 256 --sample-steps 6
"""

from __future__ import annotations

import argparse
import functools
import time

import _common
import models


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--interval", type=int, default=3)
    parser.add_argument("--depth", type=int, default=0)
    parser.add_argument("--steps", type=int, default=20, help="steps of the projected run")
    parser.add_argument("--size", type=int, default=512, help="image side (px) of the one-evaluation timing")
    parser.add_argument("--sample-size", type=int, default=256, help="image side (px) of the whole runs (0: skip)")
    parser.add_argument("--sample-steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2)
    return parser.parse_args()


def relative_l2(a, b) -> float:
    return round(float((a.float() - b.float()).norm() / b.float().norm()), 4)


def main():
    args = parse_args()
    _common.boot()
    import comfy.sample
    import torch

    import nodes as comfy_nodes
    from devtools import checks
    from patchlab.nodes import deep_cache as dc_nodes
    from patchlab.patches import deep_cache as dc

    model = models.build("sd15")
    full = {"start_percent": 0.0, "end_percent": 1.0}
    deep_cache = checks.run_node(dc_nodes.DeepCache, model=model, interval=args.interval, depth=args.depth,
                                 **full)[0]
    device = model.load_device
    positive, negative = models.conditioning("sd15", 1), models.conditioning("sd15", 2)

    # 1. one evaluation, full and cached
    unet = model.model.diffusion_model
    x = torch.randn(2, 4, args.size // 8, args.size // 8, generator=torch.Generator().manual_seed(0)).to(device)
    timesteps = torch.tensor([500.0, 500.0], device=device)
    context = torch.cat([positive[0][0], negative[0][0]]).to(device)
    entry = dc.entry_block(unet, args.depth)
    captured = {}

    def capture(h, hsp, to):
        if to["block"] == ("output", entry):
            captured["h"] = h.clone()
        return h, hsp

    def run_full():
        with torch.no_grad():
            return unet(x, timesteps, context, transformer_options={"patches": {"output_block_patch": [capture]}})

    def run_cached():
        with torch.no_grad():
            return dc.shallow_forward(unet, args.depth, captured["h"], x, timesteps, context, transformer_options={})

    t_full = _common.time_call(run_full, repeats=args.repeats, warmup=1)["min_s"]
    t_cached = _common.time_call(run_cached, repeats=args.repeats, warmup=1)["min_s"]
    n_full = len(range(0, args.steps, args.interval))
    projected = args.steps * t_full / (n_full * t_full + (args.steps - n_full) * t_cached)
    evaluation = {"size_px": args.size, "full_s": round(t_full, 3), "cached_s": round(t_cached, 3),
                  "cached_share_of_full": round(t_cached / t_full, 4), "steps": args.steps,
                  "full_steps": n_full, "projected_speedup": round(projected, 3)}
    print(f"one evaluation at {args.size}px: full {t_full:.2f}s, cached {t_cached:.2f}s -> "
          f"{args.steps} steps projected {projected:.2f}x", flush=True)

    # 2. whole runs
    runs = {}
    if args.sample_size:
        core = comfy_nodes.NODE_CLASS_MAPPINGS
        variants = {
            "uncached": model,
            "patchlab_deep_cache": deep_cache,
            "core_easycache": checks.run_node(core["EasyCache"], model=model, reuse_threshold=0.2,
                                              start_percent=0.15, end_percent=0.95, verbose=False)[0],
            "core_lazycache": checks.run_node(core["LazyCache"], model=model, reuse_threshold=0.2,
                                              start_percent=0.15, end_percent=0.95, verbose=False)[0],
        }
        latent = models.empty_latent("sd15", args.sample_size)
        noise = comfy.sample.prepare_noise(latent, 0)
        outputs = {}
        for name, patched in variants.items():
            run = functools.partial(comfy.sample.sample, patched, noise, args.sample_steps, 7.0, "euler", "normal",
                                    positive, negative, latent, disable_pbar=True, seed=0)
            start = time.perf_counter()
            outputs[name] = run()
            runs[name] = {"seconds": round(time.perf_counter() - start, 3)}
            print(f"{name}: {runs[name]['seconds']}s", flush=True)
        for name in variants:
            runs[name]["speedup"] = round(runs["uncached"]["seconds"] / runs[name]["seconds"], 3)
            runs[name]["relative_l2_from_uncached"] = relative_l2(outputs[name], outputs["uncached"])

    _common.write_results("deep_cache", {
        "model": f"SD1.5 UNet (ComfyUI SD15 config, {models.parameters(model) / 1e6:.0f} M parameters), random "
                 "weights, float32",
        "interval": args.interval, "depth": args.depth,
        "one_evaluation": evaluation,
        "whole_runs": {"size_px": args.sample_size, "steps": args.sample_steps, "sampler": "euler", "cfg": 7.0,
                       "core_defaults": "reuse_threshold 0.2, start 0.15, end 0.95", "results": runs},
        "targets_met": {f"projected {args.steps} steps at {args.size}px >= 2.0x": projected >= 2.0},
    })


if __name__ == "__main__":
    main()
