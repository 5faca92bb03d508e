"""Attention guidance's post-CFG runner: once per step, the extra passes of every active spec and their terms.

PAG, SEG, SLG and TPG perturb the positive prediction on the same input, so their rows share one
batched model call (``x`` repeated once per spec, the specs carried in
``transformer_options["patchlab_guidance_pass"]``). SAG's pass uses the negative conditioning on a
blurred input and runs on its own, tagged as uncond. The terms are added in the order the nodes were
applied.
"""

from __future__ import annotations

import functools
import logging
import zlib
from typing import Dict, List, Optional, Tuple

import comfy.samplers
import torch

from ...kernels import attention as ka
from ...kernels import guidance
from .. import core_nodes, once, run
from .core import PASS_KEY, PERTURBED, RUN_KEY, SPECS_KEY, STEP_KEY, AttentionRun, GuidanceSpec

log = logging.getLogger(__name__)
_warn_once = functools.partial(once.warn_once, log)  # a warning per process, not per step

CORE_NAG_MODULE = "nodes_nag"


def extra_pass_options(model_options: Dict, groups: Tuple[GuidanceSpec, ...], step: int = 0) -> Dict:
    """Model options for an extra pass: the specs (one group of rows each) and the step's shuffle token."""
    options = dict(model_options)
    transformer_options = dict(options.get("transformer_options", {}))
    transformer_options[PASS_KEY] = tuple(groups)
    transformer_options[STEP_KEY] = step
    options["transformer_options"] = transformer_options
    return options


def step_token(sigma: torch.Tensor) -> int:
    """A per-step number for TPG's shuffle seeds: the step's sigma (one host read per step, with TPG only)."""
    return zlib.crc32(repr(round(float(sigma.detach().flatten()[0]), 6)).encode())


def core_nag(model_options: Dict) -> bool:
    """Whether ComfyUI's NAGuidance (comfy_extras/nodes_nag.py, ComfyUI 0.14+) patches this model's self-attention."""
    patches = model_options.get("transformer_options", {}).get("patches", {}).get("attn1_output_patch", [])
    return any(core_nodes.made_by(fn, CORE_NAG_MODULE, "NAGuidance") for fn in patches)


def perturbed_predictions(args, specs: List[GuidanceSpec]) -> List[torch.Tensor]:
    """The positive prediction under each spec's perturbation, all specs in one batched model call.

    Under ComfyUI's NAGuidance the negative rows go into the extra call too: that node guides
    self-attention only in calls holding both the positive and the negative, and the
    guidance direction ``positive - perturbed`` must compare two NAG-guided predictions
    (else it would carry NAG's own change and strengthen NAG by the guidance scale).
    """
    x, sigma, n = args["input"], args["sigma"], len(specs)
    repeated = x.repeat((n,) + (1,) * (x.ndim - 1))
    step = step_token(sigma) if any(spec.kind == "tpg" for spec in specs) else 0
    options = extra_pass_options(args["model_options"], tuple(specs), step)
    conds = [args["cond"]]
    if args.get("uncond") is not None and core_nag(args["model_options"]):
        conds.append(args["uncond"])
    out = comfy.samplers.calc_cond_batch(args["model"], conds, repeated, sigma.repeat(n), options)[0]
    return list(out.chunk(n))


def sag_term(spec: GuidanceSpec, record, args) -> Optional[torch.Tensor]:
    """``(degraded - prediction on degraded) * scale`` for SAG, or None when it has to skip this step."""
    x, uncond_pred = args["input"], args["uncond_denoised"]
    if uncond_pred is None or x.ndim != 4:
        return None
    if min(x.shape[-2:]) <= 4:
        _warn_once("Self-Attention Guidance skips latents of 4 or fewer rows/columns (nothing to blur)")
        return None
    if record is None:
        _warn_once("Self-Attention Guidance recorded no attention at its block this step; check the block setting")
        return None
    mass, grid = record
    if mass.shape[0] != x.shape[0]:
        return None
    mask = ka.attention_mask_on_latent(mass.to(x.device), grid, spec.threshold, tuple(x.shape[-2:]))
    degraded = ka.degrade(uncond_pred, mask, spec.blur_sigma)
    options = extra_pass_options(args["model_options"], ())
    _, prediction = comfy.samplers.calc_cond_batch(args["model"], [None, args["uncond"]],
                                                   degraded + x - uncond_pred, args["sigma"], options)
    return (degraded - prediction) * spec.scale


def _log_extra_pass(state: Optional[AttentionRun], perturbed: List[GuidanceSpec], x: torch.Tensor) -> None:
    if state is not None and state.first_log():
        names = ", ".join(spec.kind.upper() for spec in perturbed)
        log.info("PatchLab attention guidance: %s in one batched extra model call per step (%d rows for %d "
                 "image(s))", names, len(perturbed) * x.shape[0], x.shape[0])


def guidance_runner(args) -> torch.Tensor:
    """Post-CFG: add the guidance of every attention-guidance spec active at this step."""
    transformer_options = args["model_options"].get("transformer_options", {})
    specs = transformer_options.get(SPECS_KEY, ())
    state = run.of(transformer_options, RUN_KEY)
    records = {id(s): state.pop(s) if state is not None else None for s in specs if s.kind == "sag"}
    result = args["denoised"]
    active = [s for s in specs if s.scale != 0 and s.window.contains(args["sigma"])]
    perturbed = [s for s in active if s.kind in PERTURBED]
    predictions = dict(zip(map(id, perturbed), perturbed_predictions(args, perturbed))) if perturbed else {}
    if perturbed:
        _log_extra_pass(state, perturbed, args["input"])
    for spec in active:
        if spec.kind == "sag":
            term = sag_term(spec, records[id(spec)], args)
            result = result if term is None else result + term
        else:
            cond_pred = args["cond_denoised"]
            result = result + (cond_pred - predictions[id(spec)]) * spec.scale
            if spec.rescale != 0:
                result = guidance.rescale(result, cond_pred, spec.rescale)
    return result


guidance_runner.patchlab_attention_runner = True
