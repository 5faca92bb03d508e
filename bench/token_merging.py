"""Unpatched vs ComfyUI's TomePatchModel vs PatchLab's Token Merging (ToMe) and Token Downsampling (ToDo).

For each model and latent size: one model evaluation (the cond+uncond batch of a CFG
step) and a whole sample of ``--sample-steps`` steps, wall time (min of repeats) and
peak memory (CUDA allocator peak, or the process's resident high-water mark on the
CPU), and each variant's speed-up over unpatched, all in one run. Targets: PatchLab
ToMe >= core's speed-up at every size (same ratio); ToDo factor 2 >= 2.0x at 96x96 on
the SD1.5 layout; SDXL layout >= 1.3x at 128x128 (core does nothing there).

    .venv/bin/python bench/token_merging.py                       # everything (slow on a CPU)
    .venv/bin/python bench/token_merging.py --models sd15 --sizes 64 96 --sample-steps 0
"""

from __future__ import annotations

import argparse
import functools

import _common

CASES = {"sd15": [64, 96, 128], "sdxl": [128]}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--sizes", type=int, nargs="+", help="latent sides (default: 64 96 128 for sd15, 128 sdxl)")
    parser.add_argument("--ratio", type=float, default=0.5, help="ToMe ratio, core's and PatchLab's")
    parser.add_argument("--factor", type=float, default=2.0, help="ToDo downsample factor")
    parser.add_argument("--sample-steps", type=int, default=10, help="steps of the timed sample (0: skip)")
    parser.add_argument("--sample-sizes", type=int, nargs="+", help="latent sides to time whole samples at "
                        "(default: every size)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    return parser.parse_args()


def measure(fn, repeats: int, warmup: int) -> dict:
    timing = {}
    memory = _common.peak_memory(lambda: timing.update(_common.time_call(fn, repeats=repeats, warmup=warmup)))
    return {"seconds": round(timing["min_s"], 4), "peak_bytes": memory["peak_bytes"], "memory_kind": memory["kind"]}


def evaluate(patched, x, sigma, context, extra):
    """One model evaluation with the patcher's hooks, as a sampling step runs it."""
    import torch

    with torch.no_grad():
        return patched.model.apply_model(x, sigma, c_crossattn=context,
                                         transformer_options=dict(patched.model_options["transformer_options"]),
                                         **extra)


def main():
    args = parse_args()
    _common.boot()
    import torch

    import nodes as comfy_nodes
    from devtools import checks
    from devtools.sampling import sample
    from devtools.testkit import tiny_models
    from patchlab.nodes import token_merging as tm_nodes

    full = {"start_percent": 0.0, "end_percent": 1.0}
    results = {}
    for layout in args.models:
        model = tiny_models.build_model(layout, model_channels=64 if layout == "sd15" else 32)
        # SD1.5 has transformers at full resolution; SDXL's first are at 1/2 (and 1/4)
        reach = 1 if layout == "sd15" else 2
        variants = {
            "unpatched": model,
            "core_tome": checks.run_node(comfy_nodes.NODE_CLASS_MAPPINGS["TomePatchModel"], model=model,
                                         ratio=args.ratio)[0],
            "patchlab_tome": checks.run_node(tm_nodes.TokenMerging, model=model, ratio=args.ratio,
                                             max_downsample=reach, stride_x=2, stride_y=2, destinations="random",
                                             seed=0, metric="input", merge="queries, keys and values", **full)[0],
            "patchlab_todo": checks.run_node(tm_nodes.TokenDownsampling, model=model, downsample_factor=args.factor,
                                             max_downsample=reach, method="nearest-exact", **full)[0],
        }
        spec = tiny_models.layout(layout)
        context = torch.randn(2, spec.tokens, spec.context_dim).to(model.load_device)
        extra = {}
        if spec.pooled_dim is not None:
            extra["y"] = torch.randn(2, spec.unet_config["adm_in_channels"]).to(model.load_device)
        for size in args.sizes or CASES[layout]:
            x = torch.randn(2, 4, size, size).to(model.load_device)
            sigma = torch.tensor([5.0, 5.0], device=model.load_device)
            row = {}
            for name, patched in variants.items():
                once = functools.partial(evaluate, patched, x, sigma, context, extra)
                row[name] = {"one_evaluation": measure(once, args.repeats, args.warmup)}
                if args.sample_steps and (args.sample_sizes is None or size in args.sample_sizes):
                    run = functools.partial(sample, patched, layout, steps=args.sample_steps, height=size, width=size)
                    row[name]["sample"] = measure(run, 1, 0)
            for name in variants:
                for kind in row[name]:
                    row[name][kind]["speedup"] = round(row["unpatched"][kind]["seconds"] / row[name][kind]["seconds"],
                                                       3)
            results[f"{layout} {size}x{size}"] = row
            print(f"{layout} {size}: " + ", ".join(f"{n} {r['one_evaluation']['speedup']}x" for n, r in row.items()),
                  flush=True)

    targets = {}
    for key, row in results.items():
        tome, core = row["patchlab_tome"]["one_evaluation"]["speedup"], row["core_tome"]["one_evaluation"]["speedup"]
        targets[f"{key}: patchlab ToMe >= core ToMe"] = tome >= core
        if key == "sd15 96x96":
            targets["sd15 96x96: ToDo >= 2.0x"] = row["patchlab_todo"]["one_evaluation"]["speedup"] >= 2.0
        if key == "sdxl 128x128":
            best = max(tome, row["patchlab_todo"]["one_evaluation"]["speedup"])
            targets["sdxl 128x128: PatchLab >= 1.3x"] = best >= 1.3
    _common.write_results("token_merging", {
        "models": {"sd15": "tiny SD1.5 layout, model_channels 64", "sdxl": "tiny SDXL layout, model_channels 32"},
        "ratio": args.ratio, "todo_factor": args.factor, "sample_steps": args.sample_steps,
        "results": results, "targets_met": targets,
    })


if __name__ == "__main__":
    main()
