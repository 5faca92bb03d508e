"""Per-step overhead of PatchLab's CFG-space and UNet-block nodes against plain CFG.

One sampling step of CFG evaluates the model once on the cond+uncond batch, then runs
the pre-/post-CFG hooks. For each node this measures the hooks' time (CFG nodes) or
the output-block patch's time over the (h, hsp) pairs one model evaluation hands it
(FreeU) or the denoise-mask function's time on a latent-sized mask (DifferentialDiffusion),
and reports it as a share of that step's model evaluation. Target: < 2 % for every node
but TCFG's singular-direction projection (reported). With --sampling, whole 10-step
samples are timed too (patched / plain ratio), as a cross-check.

The model is the real-size SD1.5 of ``models.py`` (random weights; FreeU's patch then sees
the real 1280/640-channel block outputs); ``--channels N`` swaps in a tiny SD1.5-layout
model of base width N for a quick look (its shares are far larger than a real model's).

    .venv/bin/python bench/cfg_overhead.py [--size 64] [--repeats 8] [--sampling] [--channels 64]
"""

from __future__ import annotations

import argparse
import types

import _common
import models


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=64, help="latent side (64 = a 512x512 image)")
    parser.add_argument("--channels", type=int, default=None,
                        help="base width of a tiny SD1.5-layout model instead of the real-size SD1.5 (e.g. 64)")
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--sampling", action="store_true", help="also time whole 10-step samples")
    return parser.parse_args()


def main():
    args = parse_args()
    if args.sampling and args.channels is None:
        raise SystemExit("--sampling times 10-step samples of the tiny model: give --channels too (e.g. 64)")
    _common.boot()
    import torch

    from devtools import checks
    from devtools.sampling import sample
    from devtools.testkit import tiny_models
    from patchlab.nodes import blocks, cfg, inpaint

    full = {"start_percent": 0.0, "end_percent": 1.0}
    import nodes as comfy_nodes

    core_ids = {"RescaleCFG": "RescaleCFG", "RenormCFG": "RenormCFG", "CFGNorm": "CFGNorm",
                "AdaptiveProjectedGuidance": "APG", "TangentialDampingCFG": "TCFG", "Mahiro": "Mahiro",
                "CFGZeroStar": "CFGZeroStar", "FreSca": "FreSca", "FreeU": "FreeU", "FreeU_V2": "FreeU_V2",
                "DifferentialDiffusion": "DifferentialDiffusion"}
    core_inputs = {"AdaptiveProjectedGuidance": {"eta": 0.0, "norm_threshold": 15.0, "momentum": -0.5},
                   "CFGZeroStar": {}, "DifferentialDiffusion": {}}
    # name: (node, inputs, the hook it installs: "cfg" pre/post-CFG, "block" output-block patch, "mask" denoise mask)
    nodes = {
        "RescaleCFG": (cfg.RescaleCFG, {"multiplier": 0.7}, "cfg"),
        "RenormCFG": (cfg.RenormCFG, {"cfg_trunc": 100.0, "renorm_cfg": 1.0}, "cfg"),
        "CFGNorm": (cfg.CFGNorm, {"strength": 1.0}, "cfg"),
        "AdaptiveProjectedGuidance": (cfg.AdaptiveProjectedGuidance,
                                      {"eta": 0.0, "norm_threshold": 15.0, "momentum": -0.5, "mode": "paper"}, "cfg"),
        "TangentialDampingCFG": (cfg.TangentialDampingCFG, {}, "cfg"),
        "Mahiro": (cfg.Mahiro, {}, "cfg"),
        "CFGZeroStar": (cfg.CFGZeroStar, {"mode": "paper", "zero_init_steps": 1}, "cfg"),
        "FreSca": (cfg.FreSca, {"scale_low": 1.0, "scale_high": 1.25, "freq_cutoff": 20}, "cfg"),
        "FreeU": (blocks.FreeU, {"b1": 1.5, "b2": 1.6, "s1": 0.9, "s2": 0.2}, "block"),
        "FreeU_V2": (blocks.FreeU_V2, {"b1": 1.3, "b2": 1.4, "s1": 0.9, "s2": 0.2}, "block"),
        "DifferentialDiffusion": (inpaint.DifferentialDiffusion, {"strength": 1.0}, "mask"),
    }

    if args.channels is None:
        model, described, context_shape = models.build("sd15"), "SD1.5 real-size config, random weights", (77, 768)
    else:
        model = tiny_models.build_model("sd15", model_channels=args.channels)
        described, context_shape = f"tiny SD1.5 layout, model_channels {args.channels}", (16, 64)
    device = model.load_device
    model.model.to(device)
    generator = torch.Generator().manual_seed(0)
    shape = (1, 4, args.size, args.size)
    x = (torch.randn(shape, generator=generator) * 3).to(device)
    cond = torch.randn(shape, generator=generator).to(device)
    uncond = torch.randn(shape, generator=generator).to(device)
    sigma = torch.tensor([3.0], device=device)
    context = torch.randn(2, *context_shape, generator=generator).to(device)
    schedule = torch.linspace(14.6, 0, 11, device=device)

    def evaluate(patched, images: int = 2):
        """One model evaluation of the cond+uncond batch (``images`` 1: the cond image alone)."""
        options = patched.model_options.get("transformer_options", {})
        with torch.no_grad():
            return patched.model.apply_model(torch.cat([x] * images), sigma.repeat(images),
                                             c_crossattn=context[:images], transformer_options=dict(options))

    def run_hooks(patched):
        options = {"transformer_options": {"sample_sigmas": schedule}}
        out = [cond, uncond]
        slot = patched.model_options.get("sampler_cfg_function")
        if slot is not None:  # core RescaleCFG / RenormCFG take the single CFG-function slot
            slot({"cond": x - cond, "uncond": x - uncond, "cond_scale": 7.0, "timestep": sigma, "input": x,
                  "sigma": sigma, "cond_denoised": cond, "uncond_denoised": uncond, "model": patched.model,
                  "model_options": options})
        for fn in patched.model_options.get("sampler_pre_cfg_function", []):
            out = fn({"conds": [[], []], "conds_out": out, "cond_scale": 7.0, "timestep": sigma, "input": x,
                      "sigma": sigma, "model": patched.model, "model_options": options})
        denoised = out[1] + (out[0] - out[1]) * 7.0
        for fn in patched.model_options.get("sampler_post_cfg_function", []):
            denoised = fn({"denoised": denoised, "cond": [], "uncond": [], "cond_scale": 7.0, "model": patched.model,
                           "uncond_denoised": out[1], "cond_denoised": out[0], "sigma": sigma,
                           "model_options": options, "input": x})
        return denoised

    def record_block_inputs():
        pairs = []

        def record(h, hsp, transformer_options):
            pairs.append((h.clone(), hsp.clone(), dict(transformer_options)))
            return h, hsp

        recorder = model.clone()
        recorder.set_model_output_block_patch(record)
        evaluate(recorder)
        return pairs

    block_inputs = record_block_inputs()

    def run_block_patch(patched):
        # Fresh copies each time: core's FreeU scales h in place, and repeats must not compound.
        patches = patched.model_options.get("transformer_options", {}).get("patches", {})
        fn = patches["output_block_patch"][0] if patches.get("output_block_patch") else (lambda h, hsp, o: (h, hsp))
        for h, hsp, options in block_inputs:
            fn(h.clone(), hsp.clone(), options)

    mask = torch.rand((1, 1, args.size, args.size), generator=generator).to(device)

    def run_mask_function(patched):
        # The sampler hands the hook its model wrapper; the hook reads only .inner_model.
        wrapper = types.SimpleNamespace(inner_model=patched.model)
        patched.model_options["denoise_mask_function"](sigma, mask, {"model": wrapper, "sigmas": schedule})

    # One image beside two: what batching cond and uncond (or several guidance passes) saves on this machine.
    evals = _common.interleaved({"two": lambda: evaluate(model), "one": lambda: evaluate(model, 1)},
                                max(2, args.repeats // 4))
    eval_s = min(evals["two"])
    runners = {"mask": run_mask_function, "block": run_block_patch, "cfg": run_hooks}

    def overheads(ours, core, hook):
        """(ours, core) seconds of the hook, timed interleaved, net of what the unpatched model spends there."""
        run = runners[hook]
        runs = {"ours": lambda: run(ours), "core": lambda: run(core)}
        if hook != "mask":  # the unpatched model: plain CFG's bookkeeping, or the copies of the block inputs
            runs["plain"] = lambda: run(model)
        best = {name: min(seconds) for name, seconds in _common.interleaved(runs, args.repeats * 10).items()}
        base = best.get("plain", 0.0)
        return best["ours"] - base, best["core"] - base

    results = {}
    for name, (node, inputs, hook) in nodes.items():
        window = full if "start_percent" in node.INPUT_TYPES()["required"] else {}
        (patched,) = checks.run_node(node, model=model, **inputs, **window)
        core_class = comfy_nodes.NODE_CLASS_MAPPINGS[core_ids[name]]
        (core,) = checks.run_node(core_class, model=model, **core_inputs.get(name, inputs))
        overhead, core_overhead = overheads(patched, core, hook)
        share = 100.0 * overhead / eval_s
        results[name] = {"overhead_ms": round(overhead * 1e3, 4), "share_of_model_eval_pct": round(share, 3),
                         "under_2pct": share < 2.0, "core_overhead_ms": round(core_overhead * 1e3, 4)}
        if args.sampling:
            plain_sample = _common.time_call(lambda: sample(model, "sd15", steps=10, height=args.size,
                                                            width=args.size), repeats=3)
            patched_sample = _common.time_call(lambda p=patched: sample(p, "sd15", steps=10, height=args.size,
                                                                        width=args.size), repeats=3)
            results[name]["sampling_ratio"] = round(patched_sample["min_s"] / plain_sample["min_s"], 4)

    _common.write_results("cfg_overhead", {
        "model": described, "device": _common.device_name(),
        "latent": list(shape),
        "model_eval_cond_uncond_ms": round(eval_s * 1e3, 3),
        "model_eval_one_image_ms": round(min(evals["one"]) * 1e3, 3),
        "nodes": results,
    })


if __name__ == "__main__":
    main()
