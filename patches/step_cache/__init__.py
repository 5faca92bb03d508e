"""StepCache: skip whole network evaluations whose output residual can be reused, on any model family.

Hooks, all from ComfyUI's wrapper/patch API (``comfy.patcher_extension``) under one key,
so a second StepCache on the same model replaces the first:

* ``OUTER_SAMPLE`` brackets a run (:mod:`.run`, the run-state protocol): a fresh
  :class:`StepRun` in the run's own options, and after the run, interrupted or not, the
  run's one INFO line, its summary on the node, and every cached tensor dropped, so
  every run (any size, steps, sampler) starts empty.
* ``PREDICT_NOISE`` marks one sampler evaluation (a "step"; a second-order sampler has
  two per step) with its ``x`` (:func:`.run.mark_main_pass`).
* ``CALC_COND_BATCH`` tags the step's *main* pass: the first ``calc_cond_batch`` of the
  evaluation whose ``x_in`` is that very ``x`` and that is not a PatchLab guidance pass
  (``transformer_options["patchlab_guidance_pass"]``). Extra passes made later in the
  same evaluation (core SAG's blurred input, core PAG's perturbed call with the same
  ``x`` and uuid, PatchLab's PAG/SEG/SAG passes) carry no tag: they are always
  evaluated in full and never read or feed the cache.
* ``APPLY_MODEL`` wraps the model call (``x``, sigma -> denoised), on every family.
  On a tagged call it either runs the model (a full evaluation, whose direction
  ``d = (x - denoised) / sigma`` is stored: the network's noise prediction for eps
  models, its velocity for flow models) or returns ``x - sigma * d`` from the stored
  direction (plain reuse) or from its forecast (first order in sigma from the last two
  full evaluations at half the Taylor step, :func:`..kernels.step_cache.forecast`).
  Caching the direction rather than the residual ``denoised - x`` (LazyCache) or the
  network's ``output - input`` rescales the reused residual to the current sigma; on the
  tiny test models it lands 3-10x closer to the uncached result at the same reused steps.

State is per chunk of the call — keyed by the cond uuid, cond/uncond flag and the
chunk's full shape (so a new latent size or batch can never meet a stale tensor) —
with one row per batch item, and every indicator is per batch item. With the ``input``
indicator each item decides on its own, its cond and uncond chunks together: it reuses
when its change is below the threshold in every chunk, its sigma is in the window and it
has not reached ``max_consecutive``; the items that reuse get their cached prediction and
the others are evaluated in one smaller model call (their rows of x, t, the conditioning,
ControlNet outputs and ``transformer_options["sigmas"]``), so each item of a batch gets
what it gets alone. With ``first block`` the block has already run on every row when the
hook decides, so a call reuses only when every item agrees. Chunked cond/uncond calls
decide separately.

Budget (``target_speedup`` T > 0, no calibration): each batch item of each chunk has a
credit that starts at 1, gains ``1/T`` per tagged call and pays 1 per full evaluation, so
an item is evaluated at most ``1 + calls / T`` times, beyond the evaluations forced on it
(its first call, sigmas outside the window, which later reuses pay back). An item with a
cache entry and its sigma in the window reuses while its free credit is below 1 (the
budget wins over ``max_consecutive``), and is otherwise evaluated when its change since
its last evaluation reaches ``threshold / credit`` (large changes are served first, small
ones spend what is left), after ``max_consecutive`` reuses, or when its credit pays for
every remaining call of the run (estimated from the run's schedule and the calls per step
so far). ``first block`` applies the rule to the call as a whole. Each sampling run (each
KSamplerAdvanced of Wan 2.2's two experts) has its own budget.

One step cache per model: StepCache refuses a model that carries ComfyUI's EasyCache or
LazyCache, when the node runs (the core cache came first) and when sampling starts (it
came after), with a RuntimeError that says to keep one of them.

Indicators:

* ``input``: relative L1 change of the network input since the chunk's last full
  evaluation (``x`` as ComfyUI's ``calculate_input`` scales it for this sigma); free.
* ``first block``: the network runs its first block, and the relative change of that
  block's residual since the last full evaluation decides. The hook is a per-clone
  patch: UNets' ``input_block_patch`` (the residual of input block 1 over the stem
  conv's output), DiTs' ``patches_replace["dit"][("double_block", 0)]`` (chaining a
  replace already there). To stop the rest of the forward on a reuse, the hook raises
  the private :class:`_Reuse`, which only the ``APPLY_MODEL`` wrapper of the same
  call catches; everything that ran before (other patches of the first block) ran on
  a call whose result is then discarded, and on full evaluations every chained patch
  runs as usual. Families without that hook get a RuntimeError when the node runs.
"""

from __future__ import annotations

from typing import List, Optional

import comfy.patcher_extension

from .. import block_forward, families, keys, run
from ..unet import is_unet
from .hooks import (
    apply_model_wrapper,
    calc_cond_batch_wrapper,
    dit_first_block,
    predict_noise_wrapper,
    unet_input_block_patch,
)
from .state import INDICATORS, REUSE_MODES, STATE_KEY, WRAPPER_KEY, CacheSpec, StepRun

__all__ = ["INDICATORS", "REUSE_MODES", "CacheSpec", "StepRun", "core_caches", "refuse_double_cache",
           "with_step_cache"]

WRAPPER_TYPES = (comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, comfy.patcher_extension.WrappersMP.PREDICT_NOISE,
                 comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, comfy.patcher_extension.WrappersMP.APPLY_MODEL)

# Wrapper keys of ComfyUI's own step caches (comfy_extras/nodes_easycache.py): one step cache per model.
CORE_CACHES = {"easycache": "EasyCache", "lazycache": "LazyCache"}
# Where the 'first block' indicator reaches (patches/families.py: the DiTs with the double_block replace at 0)
FIRST_BLOCK_FAMILIES = (f"SD1.x/SD2.x/SDXL UNets, {families.labels(lambda f: f.first_block)} (tested); "
                        f"{families.labels(lambda f: f.first_block, tested=False)} (same hook, untested)")


def core_caches(model) -> List[str]:
    """The names of ComfyUI's step caches (EasyCache, LazyCache) whose wrappers ``model`` carries."""
    found = set()
    for by_key in getattr(model, "wrappers", {}).values():
        for key, functions in by_key.items():
            if key in CORE_CACHES and functions:
                found.add(CORE_CACHES[key])
    return sorted(found)


def refuse_double_cache(node_id: str, caches: List[str]) -> None:
    """A RuntimeError when a core step cache sits on the same model: two caches would reuse steps twice."""
    if caches:
        names = " and ".join(caches)
        raise RuntimeError(
            f"{node_id}: this model also has ComfyUI's {names}. Two step caches on one model would each reuse "
            f"predictions the other already reused, compounding their errors. Keep one: take {names} or "
            f"{node_id} out of the model's chain.")


def start_run(spec: CacheSpec):
    """The run's state; refuses a core step cache applied after this node (the node refused one before)."""
    def start(guider, sigmas) -> StepRun:
        refuse_double_cache(spec.node_id, core_caches(guider.model_patcher))
        return StepRun(spec, sigmas)

    return start


def first_block_family(model) -> Optional[str]:
    """"unet", "dit" or None: how StepCache reaches this network's first block."""
    network = model.model.diffusion_model
    if is_unet(network) and len(network.input_blocks) >= 2:
        return "unet"
    row = families.of_network(network)
    if row is not None and row.first_block:
        return "dit"
    return None


def with_step_cache(model, spec: CacheSpec):
    """A clone of ``model`` with StepCache's wrappers (replacing an earlier StepCache's) and first-block hook."""
    family = None
    if spec.indicator == "first block":
        family = first_block_family(model)
        if family is None:
            network = type(model.model.diffusion_model).__name__
            raise RuntimeError(
                f"{spec.node_id}: indicator 'first block' needs a hook at the network's first block, which this "
                f"model ({type(model.model).__name__}, network {network}) does not offer. Supported: "
                f"{FIRST_BLOCK_FAMILIES}. Use indicator 'input' for this model (it works on every model).")
    refuse_double_cache(spec.node_id, core_caches(model))
    patched = model.clone()
    for wrapper_type in WRAPPER_TYPES:
        patched.remove_wrappers_with_key(wrapper_type, WRAPPER_KEY)
    WrappersMP = comfy.patcher_extension.WrappersMP
    run.install(patched, STATE_KEY, start_run(spec), replace=True)
    patched.add_wrapper_with_key(WrappersMP.PREDICT_NOISE, WRAPPER_KEY, predict_noise_wrapper)
    patched.add_wrapper_with_key(WrappersMP.CALC_COND_BATCH, WRAPPER_KEY, calc_cond_batch_wrapper)
    patched.add_wrapper_with_key(WrappersMP.APPLY_MODEL, WRAPPER_KEY, apply_model_wrapper)
    options = patched.model_options.get("transformer_options", {})
    if family == "unet":
        existing = options.get("patches", {}).get("input_block_patch", [])
        if not any(getattr(p, keys.STEP_CACHE_MARK, False) for p in existing):
            patched.set_model_input_block_patch(unet_input_block_patch)
    elif family == "dit":
        block_forward.install_block_replace(patched, "double_block", 0, dit_first_block, keys.STEP_CACHE_MARK)
    return patched
