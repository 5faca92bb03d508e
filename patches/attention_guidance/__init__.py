"""Attention guidance: Self-Attention, Perturbed-Attention, Smoothed Energy, Skip-Layer and Token Perturbation
Guidance.

Each node adds a :class:`GuidanceSpec` to a tuple kept in the model's
``transformer_options`` (a new tuple on the clone; nothing registered is mutated) and
makes sure its hooks are installed:

* UNets: one **attn1 replace** per touched transformer, registered under the most
  specific key ``(stage, block id, transformer index)``. It computes attention as usual
  (through any replace another pack put at that key, or at the less specific ``(stage,
  id)`` key it would shadow, which it chains to) and, reading the specs at call time,
  records SAG's attention mass in normal passes or perturbs the rows of PatchLab's own
  extra passes. SLG adds attn1/attn2 **output patches** that remove the chosen
  transformers' attention in its rows.
* DiTs (Flux, SD3, Qwen-Image, Wan, HunyuanVideo; Lumina 2 / Z-Image through a wrapper): one **block
  replace** per chosen block, see :mod:`.dit`.
* one **post-CFG runner** that, once per step, runs the extra passes of every active
  spec and adds the guidance terms in the order the nodes were applied.

Extra passes: PAG, SEG and SLG perturb the positive prediction on the same input, so their
rows share one batched model call (``x`` repeated once per spec, the specs carried in
``transformer_options["patchlab_guidance_pass"]``). SAG's pass uses the negative
conditioning on a blurred input and runs on its own, tagged as uncond. Next to ComfyUI's
``NAGuidance`` (0.14+), which guides self-attention only in calls that hold both prompts,
the extra pass carries the negative rows too, so both sides of ``positive - perturbed``
are NAG-guided (one more row per spec and image).

SAG's record lives in the run's :class:`AttentionRun` (the run-state protocol, :mod:`patches.run`)
and holds only the attention mass per token of the uncond rows ([B, tokens]); the runner
pops it each step, and the state is dropped when the run ends, however it ends. ComfyUI
hands that one object to every device of a multi-GPU split (0.23+), which gives each device
its own copy of the rest of the options.

The package: :mod:`.core` (the keys, :class:`GuidanceSpec`, the run's :class:`AttentionRun`),
:mod:`.blocks` (the block text resolved against the model), :mod:`.unet` and :mod:`.dit` (the hooks),
:mod:`.runner` (the post-CFG runner); this module installs them.
"""

from __future__ import annotations

from .. import run
from ..unet import transformer_keys
from . import dit, unet
from .blocks import auto_blocks, parse_blocks, resolve_blocks, tpg_auto_blocks, tpg_auto_keys
from .core import PASS_KEY, RUN_KEY, SPECS_KEY, STEP_KEY, AttentionRun, GuidanceSpec
from .runner import guidance_runner
from .unet import skip_attention_output

__all__ = ["PASS_KEY", "RUN_KEY", "SPECS_KEY", "STEP_KEY", "AttentionRun", "GuidanceSpec", "auto_blocks",
           "parse_blocks", "resolve_blocks", "skip_attention_output", "tpg_auto_blocks", "tpg_auto_keys",
           "with_guidance"]


def with_guidance(model, spec: GuidanceSpec):
    """A clone with ``spec`` added: hooks at its blocks (chained where needed), the runner once.

    UNets: attn1 replaces (SAG, PAG, SEG) or attention output patches (SLG). DiTs: block
    replaces plus an APPLY_MODEL wrapper (:mod:`.dit`).
    """
    patched = model.clone()
    options = patched.model_options
    if transformer_keys(model):
        unet.install(patched, spec)
    else:
        dit.install_replaces(patched, spec.blocks)
    transformer_options = options.setdefault("transformer_options", {})
    transformer_options[SPECS_KEY] = tuple(transformer_options.get(SPECS_KEY, ())) + (spec,)
    run.install(patched, RUN_KEY, lambda guider, sigmas: AttentionRun())
    runners = [f for f in options.get("sampler_post_cfg_function", []) if getattr(f, "patchlab_attention_runner", 0)]
    if not runners:
        patched.set_model_sampler_post_cfg_function(guidance_runner, disable_cfg1_optimization=spec.kind == "sag")
    elif spec.kind == "sag":
        options["disable_cfg1_optimization"] = True
    return patched
