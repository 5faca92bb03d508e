"""DeepCache (Ma et al. 2024, arXiv 2312.00858) on ComfyUI's UNet (SD1.x, SD2.x, SDXL).

Every ``interval``-th step evaluates the whole UNet and keeps the deep feature that
enters the output block of the chosen skip branch; the steps in between run only the
shallow input blocks ``0..depth`` and the output blocks ``N-1-depth..N-1`` (``N``
input/output blocks), feeding that output block the cached deep feature and the fresh
skip features. ``depth`` is the reference code's ``cache_branch_id`` (0 = only the
first convolution and the last output block run on a cached step).

Hooks (all stack with other patches; nothing is shared between clones):

* ``WrappersMP.OUTER_SAMPLE`` brackets a run (:mod:`.run`, the run-state protocol): a
  fresh :class:`DeepRun` in the run's own options, dropped (with every cached tensor)
  when the run ends, however it ends, after one INFO line and the node's summary.
* ``WrappersMP.PREDICT_NOISE`` + ``WrappersMP.CALC_COND_BATCH`` mark the first
  ``calc_cond_batch`` of each sampler call, on the call's own input, as the step's normal
  pass (:func:`.run.mark_main_pass`). Extra passes
  (post-CFG guidance: PatchLab's PAG/SEG/SAG, core PAG/SAG, anything else calling
  ``calc_cond_batch`` again) are never marked, so they run the whole network and
  neither read nor write the cache.
* ``WrappersMP.DIFFUSION_MODEL`` wraps the network's forward
  ``(x, timesteps, context, y, control, transformer_options, **kwargs)``: on a full step
  it calls the executor (the network's own forward with every other patch) and records
  the deep feature through an ``output_block_patch`` placed first in the list; on a
  cached step it runs :func:`shallow_forward`.

Steps are counted by sigma (the position of the call's sigma in
``transformer_options["sample_sigmas"]``), so chunked cond/uncond, second evaluations of
Heun/SDE samplers and multistep samplers all agree on which steps are full. The cache
is kept per chunk (cond uuid, cond/uncond, latent shape), so batch sizes, latent sizes
and chunking can change freely.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from typing import Dict, List, Optional, Set, Tuple

import comfy.patcher_extension
import torch
from comfy.ldm.modules.attention import SpatialTransformer
from comfy.ldm.modules.diffusionmodules.openaimodel import (
    UNetModel,
    apply_control,
    forward_timestep_embed,
    timestep_embedding,
)

from . import canvas, keys, run
from .unet import is_unet
from .window import SigmaWindow

log = logging.getLogger(__name__)

WRAPPER_KEY = "patchlab_deep_cache"
SUPPORTED = "SD1.x, SD2.x and SDXL UNets and their fine-tunes"
_instances = itertools.count()
ChunkKey = Tuple


# --- the model's structure ------------------------------------------------------------------

def check_unet(model, node_id: str) -> UNetModel:
    """The model's UNet; a clear error for any other network."""
    unet = model.model.diffusion_model
    if not is_unet(unet) or unet.middle_block is None:
        raise RuntimeError(
            f"{node_id} works on UNet models ({SUPPORTED}); this model is {type(model.model).__name__} with a "
            f"{type(unet).__name__} network, which has no UNet skip connections to cache at. For DiT models "
            "(Flux, SD3, Wan, ...) use PatchLab_StepCache instead."
        )
    if len(unet.input_blocks) != len(unet.output_blocks):
        raise RuntimeError(f"{node_id}: this UNet has {len(unet.input_blocks)} input and {len(unet.output_blocks)} "
                           "output blocks; DeepCache needs a symmetric UNet (" + SUPPORTED + ")")
    return unet


def max_depth(unet: UNetModel) -> int:
    return len(unet.input_blocks) - 1


def check_depth(unet: UNetModel, depth: int, node_id: str) -> None:
    if not 0 <= depth <= max_depth(unet):
        raise ValueError(f"{node_id}: depth is {depth}, but this UNet has {len(unet.input_blocks)} skip branches; "
                         f"use 0 to {max_depth(unet)} (0 = the shallowest branch, the paper's fastest)")


def entry_block(unet: UNetModel, depth: int) -> int:
    """The output block that receives the cached deep feature on a cached step."""
    return len(unet.output_blocks) - 1 - depth


def _transformers(modules) -> int:
    return sum(isinstance(layer, SpatialTransformer) for module in modules for layer in module)


def skipped_transformers(unet: UNetModel, depth: int) -> int:
    """How many transformers the full forward runs between the shallow parts (keeps ``transformer_index`` right)."""
    first = entry_block(unet, depth)
    return (_transformers(unet.input_blocks[depth + 1:]) + _transformers([unet.middle_block])
            + _transformers(unet.output_blocks[:first]))


# --- the cached step's forward ------------------------------------------------------------------

def shallow_forward(unet: UNetModel, depth: int, deep: torch.Tensor, x, timesteps=None, context=None, y=None,
                    control=None, transformer_options=None, **kwargs) -> torch.Tensor:
    """``UNetModel._forward`` with the deep part replaced by ``deep``.

    Runs input blocks ``0..depth`` and output blocks from :func:`entry_block` on, with the
    same patches as the full forward (emb, input/output block patches, attention patches
    and replaces through ``transformer_options``, ControlNet residuals); ``deep`` is the
    feature entering the entry output block [B, C, h, w]. With the ``deep`` of the same
    call it returns exactly what the full forward returns.
    """
    transformer_options = {} if transformer_options is None else transformer_options
    transformer_options["original_shape"] = list(x.shape)
    transformer_options["transformer_index"] = 0
    patches = transformer_options.get("patches", {})
    extra = {"time_context": kwargs.get("time_context", None),
             "num_video_frames": kwargs.get("num_video_frames", unet.default_num_video_frames),
             "image_only_indicator": kwargs.get("image_only_indicator", None)}

    emb = unet.time_embed(timestep_embedding(timesteps, unet.model_channels, repeat_only=False).to(x.dtype))
    for p in patches.get("emb_patch", []):
        emb = p(emb, unet.model_channels, transformer_options)
    if unet.num_classes is not None:
        emb = emb + unet.label_emb(y)

    hs: List[torch.Tensor] = []
    h = x
    for index in range(depth + 1):
        transformer_options["block"] = ("input", index)
        h = forward_timestep_embed(unet.input_blocks[index], h, emb, context, transformer_options, **extra)
        h = apply_control(h, control, "input")
        for p in patches.get("input_block_patch", []):
            h = p(h, transformer_options)
        hs.append(h)
        for p in patches.get("input_block_patch_after_skip", []):
            h = p(h, transformer_options)

    first = entry_block(unet, depth)
    transformer_options["transformer_index"] += skipped_transformers(unet, depth)
    if control is not None and control.get("output"):
        del control["output"][max(0, len(control["output"]) - first):]  # the residuals of the skipped blocks
    h = deep.to(device=x.device)
    for index in range(first, len(unet.output_blocks)):
        transformer_options["block"] = ("output", index)
        hsp = apply_control(hs.pop(), control, "output")
        for p in patches.get("output_block_patch", []):
            h, hsp = p(h, hsp, transformer_options)
        h = torch.cat([h, hsp], dim=1)
        del hsp
        output_shape = hs[-1].shape if hs else None
        h = forward_timestep_embed(unet.output_blocks[index], h, emb, context, transformer_options, output_shape,
                                   **extra)
    return unet.out(h.type(x.dtype))


# --- per-run state ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Settings:
    node_id: str
    interval: int
    depth: int
    window: SigmaWindow
    entry: int  # the output block whose incoming h is cached (see entry_block)
    run_key: str  # where this patch's DeepRun lives in transformer_options
    normal_key: str  # set on the transformer_options of a step's normal pass
    marker_key: str  # the per-sampler-call marker set by the PREDICT_NOISE wrapper
    capture_key: str  # the capture slot of one full call
    canvas: Optional[str] = None  # the node's id in the graph (UNIQUE_ID): where its summary is shown


@dataclass
class _Entry:
    step: int
    deep: torch.Tensor


class DeepRun(run.RunState):
    """The state of one sampling run of one patched model (the run-state protocol, :mod:`.run`): the cached deep
    features per chunk, which steps ran in full; summarised and dropped when the run ends."""

    def __init__(self, settings: Settings, total_steps: int):
        super().__init__()
        self.settings = settings
        self.total_steps = total_steps
        self.cache: Dict[ChunkKey, _Entry] = {}
        self.full_steps: Set[int] = set()
        self.cached_steps: Set[int] = set()
        self.extra_passes = 0
        self._schedule: Optional[Tuple[object, List[float], Optional[int]]] = None

    def _sigmas(self, sample_sigmas: torch.Tensor) -> Tuple[List[float], Optional[int]]:
        """The run's sigmas as floats and the first step inside the window (one host sync per run)."""
        with self.lock:
            if self._schedule is not None and self._schedule[0] is sample_sigmas:
                return self._schedule[1], self._schedule[2]
        values = [float(s) for s in sample_sigmas.detach().float().cpu().flatten()]
        window = self.settings.window
        start = next((i for i, s in enumerate(values[:-1]) if window.sigma_end <= s <= window.sigma_start), None)
        with self.lock:
            self._schedule = (sample_sigmas, values, start)
        return values, start

    def step_of(self, sigma: float, sample_sigmas: torch.Tensor) -> Tuple[int, Optional[int]]:
        """(the step of ``sigma``, the window's first step): sigma_i and sigmas in (sigma_i+1, sigma_i) give i."""
        values, start = self._sigmas(sample_sigmas)
        steps = max(1, len(values) - 1)
        at_or_above = sum(1 for s in values[:steps] if s >= sigma * (1.0 - 1e-5))
        return min(max(at_or_above - 1, 0), steps - 1), start

    def lookup(self, keys: List[ChunkKey], step: int) -> Optional[torch.Tensor]:
        """The cached deep features of these chunks (concatenated), or None if any is missing or stale."""
        interval = self.settings.interval
        with self.lock:
            entries = [self.cache.get(key) for key in keys]
        if any(e is None or not 0 <= step - e.step < interval for e in entries):
            return None
        devices = {e.deep.device for e in entries}
        if len(devices) > 1:
            return None
        return entries[0].deep if len(entries) == 1 else torch.cat([e.deep for e in entries])

    def store(self, keys: List[ChunkKey], step: int, deep: torch.Tensor) -> None:
        parts = deep.chunk(len(keys))
        if len(parts) != len(keys):
            return
        with self.lock:
            for key, part in zip(keys, parts):
                self.cache[key] = _Entry(step, part)

    def count(self, step: int, full: bool) -> None:
        with self.lock:
            (self.full_steps if full else self.cached_steps).add(step)

    def count_extra(self) -> None:
        with self.lock:
            self.extra_passes += 1

    def summary(self, finished: bool) -> str:
        cached = self.cached_steps - self.full_steps
        s = self.settings
        text = (f"{s.node_id}: {len(self.full_steps)} full evaluations, {len(cached)} cached steps of "
                f"{self.total_steps} (interval {s.interval}, depth {s.depth})")
        if self.extra_passes:
            text += f"; {self.extra_passes} extra guidance passes ran in full"
        return text if finished else text + " (run interrupted)"

    def brief(self, finished: bool) -> str:
        """The node's line in the editor, e.g. ``deep blocks ran on 7 of 20 steps; 13 on cached features``."""
        cached = len(self.cached_steps - self.full_steps)
        text = f"deep blocks ran on {len(self.full_steps)} of {self.total_steps} steps; {cached} on cached features"
        return text if finished else text + " (run interrupted)"

    def finish(self, finished: bool) -> None:
        log.info(self.summary(finished))
        canvas.show(self.settings.canvas, self.brief(finished))
        with self.lock:
            self.cache.clear()


# --- the hooks ---------------------------------------------------------------------------------------

def _with_transformer_options(model_options: Dict, **values) -> Dict:
    options = dict(model_options)
    transformer_options = dict(options.get("transformer_options", {}))
    transformer_options.update(values)
    options["transformer_options"] = transformer_options
    return options


def _chunk_keys(x: torch.Tensor, transformer_options: Dict) -> Optional[List[ChunkKey]]:
    cond_or_uncond = transformer_options.get("cond_or_uncond")
    uuids = transformer_options.get("uuids")
    if not cond_or_uncond or not uuids or len(uuids) != len(cond_or_uncond) or x.shape[0] % len(cond_or_uncond):
        return None
    shape = (x.shape[0] // len(cond_or_uncond),) + tuple(x.shape[1:])
    return [(uuid, kind, shape, x.dtype) for uuid, kind in zip(uuids, cond_or_uncond)]


def make_hooks(settings: Settings):
    """(start, predict_noise, calc_cond_batch, diffusion_model, output_block_patch) for one patch: ``start`` makes
    the run's state (:func:`.run.install`), the others are the hooks."""
    s = settings

    def start(guider, sigmas) -> DeepRun:
        return DeepRun(s, max(0, int(sigmas.shape[-1]) - 1) if sigmas is not None else 0)

    def predict_noise_wrapper(executor, x, timestep, model_options=None, seed=None, *args, **kwargs):
        model_options = run.mark_main_pass(model_options, s.marker_key, x)
        return executor(x, timestep, model_options, seed, *args, **kwargs)

    def calc_cond_batch_wrapper(executor, model, conds, x_in, timestep, model_options, *args, **kwargs):
        if run.take_main_pass(model_options, s.marker_key, x_in) is not None:
            model_options = _with_transformer_options(model_options, **{s.normal_key: True})
        return executor(model, conds, x_in, timestep, model_options, *args, **kwargs)

    def diffusion_model_wrapper(executor, *args, **kwargs):
        args = list(args)
        if len(args) < 6:
            return executor(*args, **kwargs)
        x, timesteps, context, y, control, transformer_options = args[:6]
        state = transformer_options.get(s.run_key)
        sigmas, sample_sigmas = transformer_options.get("sigmas"), transformer_options.get("sample_sigmas")
        if state is None or sigmas is None or sample_sigmas is None:
            return executor(*args, **kwargs)
        if not transformer_options.get(s.normal_key) or transformer_options.get(keys.GUIDANCE_PASS) is not None:
            state.count_extra()
            return executor(*args, **kwargs)
        chunks = _chunk_keys(x, transformer_options)
        sigma = float(sigmas.detach().max())  # one host sync per model call
        if chunks is None or not s.window.sigma_end <= sigma <= s.window.sigma_start:
            return executor(*args, **kwargs)
        step, start = state.step_of(sigma, sample_sigmas)
        scheduled = start is not None and step >= start and (step - start) % s.interval == 0
        deep = None if scheduled or s.interval == 1 else state.lookup(chunks, step)
        if deep is not None and deep.shape[0] == x.shape[0]:
            state.count(step, full=False)
            return shallow_forward(executor.class_obj, s.depth, deep, *args, **kwargs)
        state.count(step, full=True)
        if s.interval == 1:
            return executor(*args, **kwargs)
        slot: Dict[str, torch.Tensor] = {}
        args[5] = {**transformer_options, s.capture_key: slot}
        out = executor(*args, **kwargs)
        if "deep" in slot:
            state.store(chunks, step, slot["deep"])
        return out

    def output_block_patch(h, hsp, transformer_options):
        slot = transformer_options.get(s.capture_key)
        if slot is not None and transformer_options.get("block") == ("output", s.entry):
            slot["deep"] = h.detach().clone()  # later patches (FreeU) may change h in place
        return h, hsp

    return start, predict_noise_wrapper, calc_cond_batch_wrapper, diffusion_model_wrapper, output_block_patch


def with_deep_cache(model, node_id: str, interval: int, depth: int, window: SigmaWindow,
                    canvas_node: Optional[str] = None):
    """A clone of ``model`` with DeepCache; ``interval`` 1 evaluates every step in full (the result is unchanged).

    ``canvas_node``: the node's graph id, where the run's summary is shown in the editor."""
    unet = check_unet(model, node_id)
    check_depth(unet, depth, node_id)
    if interval < 1:
        raise ValueError(f"{node_id}: interval must be at least 1 (1 = every step in full), got {interval}")
    n = next(_instances)
    settings = Settings(node_id, int(interval), int(depth), window, entry_block(unet, depth), f"{WRAPPER_KEY}.run.{n}",
                        f"{WRAPPER_KEY}.normal.{n}", f"{WRAPPER_KEY}.marker.{n}", f"{WRAPPER_KEY}.capture.{n}",
                        canvas_node)
    start, predict, calc, forward, capture = make_hooks(settings)
    patched = model.clone()
    wrappers = comfy.patcher_extension.WrappersMP
    run.install(patched, settings.run_key, start)
    patched.add_wrapper_with_key(wrappers.PREDICT_NOISE, WRAPPER_KEY, predict)
    patched.add_wrapper_with_key(wrappers.CALC_COND_BATCH, WRAPPER_KEY, calc)
    patched.add_wrapper_with_key(wrappers.DIFFUSION_MODEL, WRAPPER_KEY, forward)
    # First in the list: the capture sees h as the network produced it, before any other block patch.
    patches = patched.model_options["transformer_options"].setdefault("patches", {})
    patches["output_block_patch"] = [capture] + list(patches.get("output_block_patch", []))
    return patched

