"""Cost of SAG, PAG, SEG and SLG per sampling step, and the size of SAG's attention record, against core.

Per step: whole samples of a few steps are timed (variants interleaved round by round after
a warm-up, best of ``--repeats`` rounds) and divided by the step count, for
plain CFG, ComfyUI's SelfAttentionGuidance and PerturbedAttentionGuidance, and
PatchLab's SAG, PAG, SEG and PAG+SEG (whose extra passes share one batched call;
compared with the cost PAG and SEG add separately). Memory: the bytes SAG keeps
between the model call and the guidance step (core: the uncond softmax matrix;
PatchLab: one value per token) and the process's peak while one model call records.

DiT part: a Flux-layout model with Flux's head size (128) and two double + two single
blocks at ``--dit-hidden`` width, CFG 1 (guidance-distilled: no negative pass): the cost of
a PAG step, and PAG+SEG+SLG in one batched extra call against the three run as separate
calls (as core SLG next to another pack's PAG/SEG would), as ratios; core SLG for reference.

UNet part: the real-size SD1.5 of ``models.py`` (random weights, the real text-encoder
shapes); ``--channels N`` swaps in a tiny SD1.5-layout model of base width N (quick, but a
tiny model makes every extra pass look different from what it costs on a checkpoint).

    .venv/bin/python bench/attention_guidance.py --only unet [--sizes 64] [--steps 1] [--repeats 2]
    .venv/bin/python bench/attention_guidance.py --only dit --dit-hidden 3072 --dit-size 128   # on a GPU
"""

from __future__ import annotations

import argparse
import functools

import _common
import models


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64], help="latent sides (64 = 512 px)")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2, help="interleaved timed rounds (UNet part)")
    parser.add_argument("--channels", type=int, default=None,
                        help="UNet part on a tiny SD1.5-layout model of this base width instead of the real size")
    parser.add_argument("--record-block", default="input.1",
                        help="block whose attention the memory comparison records (full resolution by default)")
    parser.add_argument("--only", choices=["unet", "dit"], help="run one part only")
    parser.add_argument("--dit-hidden", type=int, default=768,
                        help="DiT width, a multiple of 128 (Flux.1: 3072 with 24 heads)")
    parser.add_argument("--dit-size", type=int, default=32, help="DiT latent side (Flux 1024 px: 128)")
    parser.add_argument("--dit-steps", type=int, default=2)
    parser.add_argument("--dit-repeats", type=int, default=1)
    return parser.parse_args()


def dit_timing(args) -> dict:
    """Seconds per step on a Flux-layout model at CFG 1, and the ratios of the issue."""
    import nodes as comfy_nodes
    from devtools import checks
    from devtools.sampling import sample
    from devtools.testkit import tiny_models
    from patchlab.nodes import attention_guidance as ag_nodes

    heads = args.dit_hidden // 128
    model = tiny_models.build_model("flux", hidden_size=args.dit_hidden, num_heads=heads, depth=2,
                                    depth_single_blocks=2, axes_dim=[16, 56, 56], mlp_ratio=4.0)
    full = {"start_percent": 0.0, "end_percent": 1.0}

    def ours(node, model_in, **inputs):
        return checks.run_node(node, model=model_in, **inputs, **full)[0]

    pag = {"scale": 2.0, "blocks": "double.1", "rescale": 0.0}
    seg = {"scale": 2.0, "blur_sigma": 10.0, "blocks": "double.1"}
    slg = {"scale": 3.0, "blocks": "double.1", "rescaling_scale": 0.0}
    variants = {
        "plain": model,
        "patchlab_pag": ours(ag_nodes.PerturbedAttentionGuidance, model, **pag),
        "patchlab_seg": ours(ag_nodes.SmoothedEnergyGuidance, model, **seg),
        "patchlab_slg": ours(ag_nodes.SkipLayerGuidance, model, **slg),
        "core_slg": checks.run_node(comfy_nodes.NODE_CLASS_MAPPINGS["SkipLayerGuidanceDiT"], model=model,
                                    double_layers="1", single_layers="", scale=3.0, rescaling_scale=0.0, **full)[0],
        "patchlab_pag_seg_slg_shared": ours(ag_nodes.SkipLayerGuidance, ours(
            ag_nodes.SmoothedEnergyGuidance, ours(ag_nodes.PerturbedAttentionGuidance, model, **pag), **seg), **slg),
    }
    per_step = {}
    for name, patched in variants.items():
        run = functools.partial(sample, patched, "flux", steps=args.dit_steps, cfg=1.0,
                                height=args.dit_size, width=args.dit_size)
        per_step[name] = _common.time_call(run, repeats=args.dit_repeats)["min_s"] / args.dit_steps
    plain = per_step["plain"]
    separate = per_step["patchlab_pag"] + per_step["patchlab_seg"] + per_step["patchlab_slg"] - 2 * plain
    return {
        "model": f"Flux layout, hidden {args.dit_hidden}, {heads} heads of 128, 2 double + 2 single blocks, "
                 f"random weights, CFG 1",
        "latent": f"{args.dit_size}x{args.dit_size} ({(args.dit_size // 2) ** 2} image tokens + 16 text tokens)",
        "steps_per_sample": args.dit_steps,
        "seconds_per_step": {k: round(v, 4) for k, v in per_step.items()},
        "pag_step_vs_plain_step": round(per_step["patchlab_pag"] / plain, 3),
        "patchlab_slg_vs_core_slg": round(per_step["patchlab_slg"] / per_step["core_slg"], 3),
        "pag_seg_slg_shared_vs_three_separate_calls": round(per_step["patchlab_pag_seg_slg_shared"] / separate, 3),
    }


def tensors_in_closure(fn):
    return [c.cell_contents for c in (fn.__closure__ or ()) if hasattr(c.cell_contents, "element_size")]


def nbytes(tensor) -> int:
    return tensor.element_size() * tensor.nelement()


def sag_memory(model, core_node, ours_node, size: int, block: str, sag: dict, prompts: dict) -> dict:
    """Bytes SAG keeps per step at ``block`` (core vs PatchLab) and the process peak of a one-step sample."""
    from devtools import checks
    from devtools.sampling import sample
    from devtools.testkit import tiny_models
    from patchlab.patches import attention_guidance as ag

    stage, block_id, index = (block.split(".") + ["0", "0"])[:3]
    (core,) = checks.run_node(core_node, model=model, scale=0.5, blur_sigma=2.0)
    replaces = core.model_options["transformer_options"]["patches_replace"]["attn1"]
    recorder = replaces.pop(("middle", 0, 0))
    core.set_model_attn1_replace(recorder, stage, int(block_id), int(index))
    (ours,) = checks.run_node(ours_node, model=model, **{**sag, "block": block}, start_percent=0.0, end_percent=1.0)
    recorded, runs = [], []
    original_init, original_add = ag.AttentionRun.__init__, ag.AttentionRun.add

    def init(self):
        original_init(self)
        runs.append(self)

    def add(self, spec, mass, grid):
        recorded.append(nbytes(mass))
        original_add(self, spec, mass, grid)

    ag.AttentionRun.__init__, ag.AttentionRun.add = init, add
    try:
        latent = tiny_models.empty_latent("sd15", size, size)
        peaks = {name: _common.peak_memory(functools.partial(sample, patched, "sd15", steps=1, latent=latent,
                                                             **prompts))
                 for name, patched in (("core", core), ("patchlab", ours))}
    finally:
        ag.AttentionRun.__init__, ag.AttentionRun.add = original_init, original_add
    held = sum(len(r.records) for r in runs)
    (core_post_cfg,) = core.model_options["sampler_post_cfg_function"]
    core_kept = sum(nbytes(t) for t in tensors_in_closure(core_post_cfg))
    return {
        "record_block": block,
        "bytes_kept_per_step": {"core": core_kept, "patchlab": max(recorded, default=0)},
        "bytes_still_held_after_sampling": {"core": core_kept, "patchlab": held * max(recorded, default=0)},
        "process_peak_bytes_one_step": peaks,
    }


def main():
    args = parse_args()
    _common.boot()
    results = {}
    if args.only != "unet":
        results["dit"] = dit_timing(args)
    if args.only != "dit":
        results.update(unet_results(args))
    _common.write_results("attention_guidance", results)


def unet_results(args) -> dict:
    import nodes as comfy_nodes
    from devtools import checks
    from devtools.sampling import sample
    from devtools.testkit import tiny_models
    from patchlab.nodes import attention_guidance as ag_nodes

    full = {"start_percent": 0.0, "end_percent": 1.0}
    if args.channels is None:
        model, described = models.build("sd15"), "SD1.5 real-size config, random weights"
        prompts = {"positive": models.conditioning("sd15", 1), "negative": models.conditioning("sd15", 2)}
    else:
        model = tiny_models.build_model("sd15", model_channels=args.channels)
        described, prompts = f"tiny SD1.5 layout (model_channels {args.channels})", {}
    core = comfy_nodes.NODE_CLASS_MAPPINGS

    def ours(node, model_in, **inputs):
        return checks.run_node(node, model=model_in, **inputs, **full)[0]

    sag = {"scale": 0.5, "blur_sigma": 2.0, "threshold": 1.0, "block": "middle.0.0"}
    pag = {"scale": 3.0, "blocks": "middle", "rescale": 0.0}
    seg = {"scale": 3.0, "blur_sigma": 10.0, "blocks": "middle"}
    variants = {
        "plain_cfg": model,
        "core_sag": checks.run_node(core["SelfAttentionGuidance"], model=model, scale=0.5, blur_sigma=2.0)[0],
        "patchlab_sag": ours(ag_nodes.SelfAttentionGuidance, model, **sag),
        "core_pag": checks.run_node(core["PerturbedAttentionGuidance"], model=model, scale=3.0)[0],
        "patchlab_pag": ours(ag_nodes.PerturbedAttentionGuidance, model, **pag),
        "patchlab_seg": ours(ag_nodes.SmoothedEnergyGuidance, model, **seg),
        "patchlab_pag_seg_shared": ours(ag_nodes.SmoothedEnergyGuidance,
                                        ours(ag_nodes.PerturbedAttentionGuidance, model, **pag), **seg),
    }

    sizes = {}
    for size in args.sizes:
        runs = {name: functools.partial(sample, patched, "sd15", steps=args.steps, height=size, width=size, **prompts)
                for name, patched in variants.items()}
        per_step = {name: min(seconds) / args.steps
                    for name, seconds in _common.interleaved(runs, args.repeats).items()}
        plain = per_step["plain_cfg"]
        separate = per_step["patchlab_pag"] + per_step["patchlab_seg"] - plain
        sizes[f"{size}x{size}"] = {
            "seconds_per_step": {k: round(v, 4) for k, v in per_step.items()},
            "ratio_to_plain_cfg": {k: round(v / plain, 3) for k, v in per_step.items()},
            "patchlab_vs_core": {
                "sag": round(per_step["patchlab_sag"] / per_step["core_sag"], 3),
                "pag": round(per_step["patchlab_pag"] / per_step["core_pag"], 3),
            },
            "pag_seg_shared_vs_separate": round(per_step["patchlab_pag_seg_shared"] / separate, 3),
        }

    memory = {f"{size}x{size}": sag_memory(model, core["SelfAttentionGuidance"], ag_nodes.SelfAttentionGuidance,
                                           size, args.record_block, sag, prompts) for size in args.sizes}

    return {
        "model": described, "device": _common.device_name(),
        "steps_per_sample": args.steps,
        "timing": sizes,
        "sag_memory": memory,
    }


if __name__ == "__main__":
    main()
