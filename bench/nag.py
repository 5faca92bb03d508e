"""Cost of a Normalized Attention Guidance step: a CFG-1 step with NAG against a plain CFG-1 step and a CFG step.

Real-size architectures of ``models.py`` (random weights, the real text-encoder shapes): the
Flux.1-dev-width DiT (its blocks at the real width, depth reduced: see models.py) and the SD1.5
UNet. Per variant whole samples of ``--steps`` steps are timed, interleaved round by round after
a warm-up; the best round divided by the steps is the step's cost. Variants:

* ``cfg1``: CFG 1, no negative pass (what guidance-distilled and few-step models run);
* ``nag_cfg1``: CFG 1 with PatchLab's NAG at its defaults (the negative is the sampler's);
* ``cfg``: CFG 3.5 (Flux) / 7.5 (SD1.5): the positive and negative passes;
* ``core_nag_cfg1``: ComfyUI's own ``NAGuidance`` at CFG 1, where the ComfyUI in use has it (0.14+;
  it turns the CFG-1 shortcut off and runs the negative pass).

    .venv/bin/python bench/nag.py --flux-pixels 512 --sd15-pixels 512      # CPU
    .venv/bin/python bench/nag.py --flux-pixels 1024 --sd15-pixels 512     # the issue's sizes (GPU)
"""

from __future__ import annotations

import argparse
import functools

import _common
import models


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flux-pixels", type=int, default=1024, help="Flux picture side (1024: 4096 image tokens)")
    parser.add_argument("--sd15-pixels", type=int, default=512)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2, help="interleaved timed rounds")
    parser.add_argument("--only", choices=["flux", "sd15"], help="run one model only")
    parser.add_argument("--name", default="nag", help="results file name (bench/results/NAME.json)")
    return parser.parse_args()


def step_costs(name: str, pixels: int, cfg: float, args) -> dict:
    import nodes as comfy_nodes
    from devtools import checks
    from devtools.sampling import sample
    from patchlab.nodes import nag as nag_nodes

    model = models.build(name)
    prompts = {"positive": models.conditioning(name, 1), "negative": models.conditioning(name, 2)}
    latent = models.empty_latent(name, pixels)
    defaults = _common.node_defaults(nag_nodes.NormalizedAttentionGuidance)
    variants = {"cfg1": (model, 1.0),
                "nag_cfg1": (checks.run_node(nag_nodes.NormalizedAttentionGuidance, model=model, **defaults)[0], 1.0),
                "cfg": (model, cfg)}
    core = comfy_nodes.NODE_CLASS_MAPPINGS.get("NAGuidance")
    if core is not None:
        variants["core_nag_cfg1"] = (checks.run_node(core, model=model, nag_scale=5.0, nag_alpha=0.25, nag_tau=2.5)[0],
                                     1.0)
    layout = "flux" if name == "flux" else "sd15"
    runs = {label: functools.partial(sample, patched, layout, steps=args.steps, cfg=scale, latent=latent, **prompts)
            for label, (patched, scale) in variants.items()}
    per_step = {label: min(seconds) / args.steps for label, seconds in _common.interleaved(runs, args.repeats).items()}
    plain = per_step["cfg1"]
    return {
        "model": f"{name} ({models.parameters(model) / 1e6:.0f} M parameters, random weights)",
        "pixels": pixels,
        "cfg": cfg,
        "seconds_per_step": {k: round(v, 4) for k, v in per_step.items()},
        "ratio_to_cfg1_step": {k: round(v / plain, 3) for k, v in per_step.items()},
    }


def main():
    args = parse_args()
    _common.boot()
    results = {"nag_defaults": "scale 5, tau 2.5, alpha 0.25", "steps_per_sample": args.steps}
    if args.only != "sd15":
        results["flux"] = step_costs("flux", args.flux_pixels, 3.5, args)
    if args.only != "flux":
        results["sd15"] = step_costs("sd15", args.sd15_pixels, 7.5, args)
    _common.write_results(args.name, results)


if __name__ == "__main__":
    main()
