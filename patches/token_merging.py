"""Token merging (ToMe) and token downsampling (ToDo) on a UNet's self-attention.

Hooks (lists, so they stack with other patches):

* ``attn1_patch(n, context, value, extra_options) -> (n, context, value)`` runs before
  the q/k/v projections of every self-attention; ``n`` is ``norm1(x)`` [B, N, C].
* ``attn1_output_patch(out, extra_options) -> out`` runs after ``to_out``.

ToMe merges the tokens in ``attn1_patch`` and unmerges after ``to_out``; the plan is
handed from one hook to the other through that transformer call's own
``extra_options`` dict (both hooks of one call receive the same dict), so nothing is
kept between calls, on the node, or across threads. ToDo only shortens ``context`` and
``value``. A layer is touched when its grid is at most ``max_downsample`` times smaller
than the latent; grids come from ``extra_options["original_shape"]``.
"""

from __future__ import annotations

import functools
import logging
import threading
import weakref
import zlib
from typing import Dict, Optional, Tuple

import torch

from ..kernels import attention as ka
from ..kernels import token_merging as tm
from . import once
from .unet import Key, key_of, transformer_levels, transformers
from .window import SigmaWindow

log = logging.getLogger(__name__)
_warn_once = functools.partial(once.warn_once, log)  # a warning per process, not per step

UNMERGE_KEY = "patchlab_tome_unmerge"
CANDIDATE_LAYOUTS = 16  # random destination layouts per layer; each step picks one from its sigma


# --- the model's structure ------------------------------------------------------------------

def check_reach(model, max_downsample: int, node_id: str) -> None:
    """Warn once when ``max_downsample`` reaches no transformer of this model."""
    levels = transformer_levels(model)
    if not levels:
        raise RuntimeError(
            f"{node_id} works on UNet models (SD1.x, SD2.x, SDXL and their fine-tunes); this model is "
            f"{type(model.model).__name__} with a {type(model.model.diffusion_model).__name__} network, which has "
            "no UNet self-attention to merge tokens in. Remove the node for this model."
        )
    reachable = [level for level in levels if 2 ** level <= max_downsample]
    if not reachable:
        smallest = 2 ** min(levels)
        _warn_once(f"{node_id}: max_downsample={max_downsample} touches no layer of this model (its first "
                   f"transformers work at 1/{smallest} resolution); set max_downsample to {smallest} or more")


# --- when and where ----------------------------------------------------------------------------

class Gate:
    """Whether a sigma window is open, decided once per model call (one host sync per call, not per layer)."""

    def __init__(self, window: SigmaWindow):
        self.window = window
        self._lock = threading.Lock()
        self._decisions: Dict[int, Tuple[weakref.ref, bool]] = {}

    def open(self, sigmas: Optional[torch.Tensor]) -> bool:
        if self.window.is_always or sigmas is None:
            return True
        with self._lock:
            cached = self._decisions.get(id(sigmas))
            if cached is not None and cached[0]() is sigmas:
                return cached[1]
        decision = self.window.contains(sigmas)
        with self._lock:
            if len(self._decisions) > 64:
                self._decisions = {k: v for k, v in self._decisions.items() if v[0]() is not None}
            self._decisions[id(sigmas)] = (weakref.ref(sigmas), decision)
        return decision


def layer_grid(extra_options, tokens: int, max_downsample: int) -> Optional[Tuple[int, int]]:
    """The token grid of this self-attention if its level is within ``max_downsample``, else None."""
    shape = extra_options.get("original_shape")
    if shape is None:
        return None
    try:
        h, w, level = ka.grid_level(shape[-2], shape[-1], tokens)
    except ValueError:
        return None
    return (h, w) if 2 ** level <= max_downsample else None


def step_pick(sigmas: Optional[torch.Tensor], device) -> torch.Tensor:
    """A per-step index in [0, CANDIDATE_LAYOUTS) hashed on device from the sigma's bits (no host sync)."""
    if sigmas is None:
        return torch.zeros(1, dtype=torch.long, device=device)
    bits = sigmas.reshape(-1)[:1].float().view(torch.int32).long()
    return ((bits * 2654435761) % 4294967291 % CANDIDATE_LAYOUTS).to(device)


# --- ToMe -------------------------------------------------------------------------------------------

def tome(ratio: float, max_downsample: int, sx: int, sy: int, random_destinations: bool, seed: int,
         metric: str, merge_keys: bool, window: SigmaWindow, modules: Dict[Key, torch.nn.Module]):
    """(attn1_patch, attn1_output_patch) merging ``ratio`` of the tokens of each eligible self-attention.

    ``metric``: "input" compares ``norm1(x)`` (ComfyUI's TomePatchModel), "query" the
    projected queries. ``merge_keys``: merge keys and values too (tomesd; attention on
    (N-r)^2 pairs) or only queries (ComfyUI; (N-r) x N pairs). Random destinations come
    from a ``torch.Generator`` seeded with (seed, layer): cond and uncond chunks of a step
    share a layout, the global RNG is never touched.
    """
    gate = Gate(window)

    def choice(key: Key, cells_y: int, cells_x: int, extra_options, device) -> Optional[torch.Tensor]:
        if not random_destinations or cells_y * cells_x == 0:
            return None
        name = f"{seed}:{key[0]}:{key[1]}:{key[2]}:{cells_y}x{cells_x}"
        generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        layouts = tm.random_choices(generator, CANDIDATE_LAYOUTS, cells_y, cells_x, sx, sy).to(device)
        return layouts.index_select(0, step_pick(extra_options.get("sigmas"), device))[0]

    def attn1_patch(n, context, value, extra_options):
        tokens = n.shape[1]
        grid = layer_grid(extra_options, tokens, max_downsample)
        if grid is None or not gate.open(extra_options.get("sigmas")):
            return n, context, value
        h, w = grid
        r = int(tokens * ratio)
        if r <= 0 or h == 1 or w == 1 or h < sy or w < sx:
            _warn_once(f"token merging skips a {h}x{w} token grid (too small to merge)")
            return n, context, value
        key = key_of(extra_options)
        if metric == "query" and key in modules:
            with torch.no_grad():
                similarity = modules[key].attn1.to_q(n)
        else:
            similarity = n
        merge, unmerge = tm.bipartite_soft_matching(similarity, h, w, sx, sy, r,
                                                    choice(key, h // sy, w // sx, extra_options, n.device))
        extra_options[UNMERGE_KEY] = unmerge
        merged = merge(n)
        if not merge_keys:
            return merged, context, value
        context = merged if context is n else (merge(context) if context.shape[1] == tokens else context)
        if value is n:
            value = merged
        elif value.shape[1] == tokens:
            value = merge(value)
        return merged, context, value

    def attn1_output_patch(out, extra_options):
        unmerge = extra_options.pop(UNMERGE_KEY, None)
        return out if unmerge is None else unmerge(out)

    return attn1_patch, attn1_output_patch


def with_tome(model, node_id: str, ratio: float, max_downsample: int, sx: int, sy: int, random_destinations: bool,
              seed: int, metric: str, merge_keys: bool, window: SigmaWindow):
    check_reach(model, max_downsample, node_id)
    patched = model.clone()
    if ratio <= 0:
        return patched
    before, after = tome(ratio, max_downsample, sx, sy, random_destinations, seed, metric, merge_keys, window,
                         transformers(model) if metric == "query" else {})
    patched.set_model_attn1_patch(before)
    patched.set_model_attn1_output_patch(after)
    return patched


# --- ToDo ----------------------------------------------------------------------------------------------

def todo(factor: float, max_downsample: int, method: str, window: SigmaWindow):
    """attn1_patch computing keys and values of each eligible self-attention on a grid ``factor`` times coarser."""
    gate = Gate(window)

    def attn1_patch(n, context, value, extra_options):
        grid = layer_grid(extra_options, context.shape[1], max_downsample)
        if grid is None or not gate.open(extra_options.get("sigmas")):
            return n, context, value
        small = tm.downsample_tokens(context, grid, factor, method)
        value = small if value is context else tm.downsample_tokens(value, grid, factor, method)
        return n, small, value

    return attn1_patch


def with_todo(model, node_id: str, factor: float, max_downsample: int, method: str, window: SigmaWindow):
    check_reach(model, max_downsample, node_id)
    patched = model.clone()
    if factor > 1:
        patched.set_model_attn1_patch(todo(factor, max_downsample, method, window))
    return patched
