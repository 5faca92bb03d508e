"""Attention guidance on UNets: one attn1 replace per touched transformer, SLG's attention output patches,
TPG's shuffled transformer inputs.

The attn1 replace sits at the most specific key ``(stage, block id, transformer index)``. It computes
attention as usual (through any replace another pack put at that key, or at the less specific
``(stage, id)`` key it would shadow, which it chains to) and, reading the specs at call time, records
SAG's attention mass in normal passes or perturbs the rows of PatchLab's own extra passes.
"""

from __future__ import annotations

import functools
import logging
from typing import Optional, Tuple

import comfy.patcher_extension
import torch
from comfy.ldm.modules.attention import optimized_attention

from ...kernels import attention as ka
from .. import block_forward, once, run
from ..unet import attend, existing_replace, key_of, transformer_block
from .core import MARK, PASS_KEY, RUN_KEY, SPECS_KEY, STEP_KEY, WRAPPER_KEY, GuidanceSpec, shuffle_seed

log = logging.getLogger(__name__)
_warn_once = functools.partial(once.warn_once, log)  # a warning per process, not per step


def _grid(extra, tokens: int) -> Optional[Tuple[int, int]]:
    """The token grid of this attention call, or None when the tokens are not a grid (merged by ToMe, say)."""
    shape = extra["original_shape"]
    try:
        return ka.token_grid(shape[-2], shape[-1], tokens)
    except ValueError:
        _warn_once("attention guidance met self-attention tokens that are not an image grid (token merging?); "
                   "SAG records and SEG blurs only grid-shaped layers")
        return None


def _perturb(out, q, k, v, extra, key, groups) -> torch.Tensor:
    """Overwrite the rows of each group whose spec perturbs this transformer (one of PatchLab's extra passes)."""
    chunks = len(extra["cond_or_uncond"])
    per_chunk = q.shape[0] // chunks
    rows = per_chunk // len(groups)
    heads = extra["n_heads"]
    for chunk in range(chunks):
        for g, spec in enumerate(groups):
            if key not in spec.blocks:
                continue
            part = slice(chunk * per_chunk + g * rows, chunk * per_chunk + (g + 1) * rows)
            if spec.kind == "pag":  # identity attention: every token attends to itself only
                out[part] = v[part]
            elif spec.kind == "seg" and _grid(extra, q.shape[1]) is not None:
                blurred = ka.blur_queries(q[part], _grid(extra, q.shape[1]), spec.blur_sigma)
                out[part] = optimized_attention(blurred, k[part], v[part], heads,
                                                attn_precision=extra.get("attn_precision"))
    return out


def _record(q, k, extra, key, specs) -> None:
    """In a normal pass, add SAG's attention mass of the uncond chunks to each SAG spec reading this transformer."""
    readers = [s for s in specs if s.kind == "sag" and key in s.blocks]
    cond_or_uncond = extra.get("cond_or_uncond", [])
    if not readers or 1 not in cond_or_uncond:
        return
    per_chunk = q.shape[0] // len(cond_or_uncond)
    grid = _grid(extra, k.shape[1])
    if grid is None:
        return
    state = run.of(extra, RUN_KEY)
    if state is None:  # a call outside a sampling run (no OUTER_SAMPLE): nothing to record for
        return
    for chunk, tag in enumerate(cond_or_uncond):
        if tag != 1:
            continue
        part = slice(chunk * per_chunk, (chunk + 1) * per_chunk)
        mass = ka.attention_column_mass(q[part], k[part], extra["n_heads"])
        for spec in readers:
            state.add(spec, mass, grid)


def make_replace(previous=None):
    """The attn1 replace PatchLab puts at a transformer key, chaining ``previous`` (another pack's, or None)."""
    def attn1_replace(q, k, v, extra_options):
        key = key_of(extra_options)
        out = attend(q, k, v, extra_options, previous)
        groups = extra_options.get(PASS_KEY)
        if groups is not None:
            return _perturb(out.clone(), q, k, v, extra_options, key, groups) if groups else out
        _record(q, k, extra_options, key, extra_options.get(SPECS_KEY, ()))
        return out

    setattr(attn1_replace, MARK, True)
    return attn1_replace


def skip_attention_output(out: torch.Tensor, extra_options) -> torch.Tensor:
    """attn1/attn2 output patch (UNets): zero the attention output in the rows of SLG specs skipping this transformer.

    The transformer's residual stream passes its attention layers unchanged there (the
    feed-forward still runs: ComfyUI has no hook around it).
    """
    groups = extra_options.get(PASS_KEY)
    if not groups or not any(spec.kind == "slg" for spec in groups):
        return out
    if extra_options.get("block") is None:
        return out
    key = key_of(extra_options)
    skipping = [g for g, spec in enumerate(groups) if spec.kind == "slg" and key in spec.blocks]
    if not skipping:
        return out
    chunks = len(extra_options["cond_or_uncond"])
    per_chunk = out.shape[0] // chunks
    rows = per_chunk // len(groups)
    out = out.clone()
    for chunk in range(chunks):
        for g in skipping:
            out[chunk * per_chunk + g * rows:chunk * per_chunk + (g + 1) * rows] = 0
    return out


setattr(skip_attention_output, MARK, True)


def _shuffling(inner, parts):
    """A transformer's ``forward`` (``inner``) with the input tokens of ``parts`` [(batch-row slice, seed)] shuffled
    first (TPG on UNets: the shuffled order stays, as in pamparamm's implementation; the SpatialTransformer's own
    residual is not shuffled)."""
    def forward(x, *args, **kwargs):
        x = x.clone()
        for part, seed in parts:
            x[part] = ka.shuffle_tokens(x[part], 0, x.shape[1], ka.token_permutation(x.shape[1], seed))
        return inner(x, *args, **kwargs)

    return forward


def unet_tpg_wrapper(executor, *args, **kwargs):
    """DIFFUSION_MODEL wrapper (UNets): in PatchLab's extra passes with TPG rows, the chosen transformer blocks'
    ``forward`` shuffles those rows' input tokens (:func:`block_forward.wrap`, undone when the call returns)."""
    options = kwargs.get("transformer_options") if "transformer_options" in kwargs else (
        args[5] if len(args) > 5 else None)
    groups = (options or {}).get(PASS_KEY) or ()
    tpg = [(g, spec) for g, spec in enumerate(groups) if spec.kind == "tpg"]
    if not tpg:
        return executor(*args, **kwargs)
    net = executor.class_obj
    chunks = max(1, len(options.get("cond_or_uncond", [0])))
    per_chunk = args[0].shape[0] // chunks
    rows = per_chunk // len(groups)
    step = options.get(STEP_KEY, 0)
    undo = []
    try:
        for key in sorted({key for _, spec in tpg for key in spec.blocks}):
            block = transformer_block(net, key)
            if block is None:
                continue
            parts = [(slice(c * per_chunk + g * rows, c * per_chunk + (g + 1) * rows),
                      shuffle_seed(spec, step, key, c, g))
                     for c in range(chunks) for g, spec in tpg if key in spec.blocks]
            undo.append(block_forward.wrap(block, lambda inner, parts=parts: _shuffling(inner, parts)))
        return executor(*args, **kwargs)
    finally:
        for step_back in reversed(undo):
            step_back()


setattr(unet_tpg_wrapper, MARK, True)


def install(patched, spec: GuidanceSpec) -> None:
    """The hooks ``spec`` needs on a UNet, once (another pack's attn1 replace at a key is chained)."""
    options = patched.model_options
    if spec.kind == "tpg":
        wrappers = comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL
        if not patched.get_wrappers(wrappers, WRAPPER_KEY):
            patched.add_wrapper_with_key(wrappers, WRAPPER_KEY, unet_tpg_wrapper)
        return
    if spec.kind == "slg":
        patches = options.get("transformer_options", {}).get("patches", {})
        if not any(getattr(p, MARK, False) for p in patches.get("attn1_output_patch", [])):
            patched.set_model_attn1_output_patch(skip_attention_output)
            patched.set_model_attn2_output_patch(skip_attention_output)
        return
    for key in sorted(spec.blocks):
        existing = existing_replace(options, "attn1", key)
        if existing is None or not getattr(existing, MARK, False):
            patched.set_model_attn1_replace(make_replace(existing), key[0], key[1], key[2])
