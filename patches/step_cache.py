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

import functools
import logging
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import comfy.patcher_extension
import torch

from ..kernels import step_cache as kc
from . import block_forward, canvas, families, keys, once, run
from .unet import is_unet
from .window import SigmaWindow

log = logging.getLogger(__name__)
_warn_once = functools.partial(once.warn_once, log)  # a warning per process, not per step

WRAPPER_KEY = "patchlab_step_cache"
STATE_KEY = "patchlab_step_cache"            # StepRun, in the run's transformer_options
MARKER_KEY = "patchlab_step_cache_marker"    # run.MainPass, on one evaluation's transformer_options
MAIN_KEY = "patchlab_step_cache_main"        # step id, on the main pass's transformer_options
CALL_KEY = "patchlab_step_cache_call"        # _Call, on one network call's transformer_options
INDICATORS = ("input", "first block")
REUSE_MODES = ("forecast", "plain")
WRAPPER_TYPES = (comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, comfy.patcher_extension.WrappersMP.PREDICT_NOISE,
                 comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, comfy.patcher_extension.WrappersMP.APPLY_MODEL)

# Wrapper keys of ComfyUI's own step caches (comfy_extras/nodes_easycache.py): one step cache per model.
CORE_CACHES = {"easycache": "EasyCache", "lazycache": "LazyCache"}
# Where the 'first block' indicator reaches (patches/families.py: the DiTs with the double_block replace at 0)
FIRST_BLOCK_FAMILIES = (f"SD1.x/SD2.x/SDXL UNets, {families.labels(lambda f: f.first_block)} (tested); "
                        f"{families.labels(lambda f: f.first_block, tested=False)} (same hook, untested)")


@dataclass(frozen=True)
class CacheSpec:
    node_id: str
    indicator: str
    threshold: float
    max_consecutive: int
    forecast: bool
    window: SigmaWindow
    canvas: Optional[str] = None  # the node's id in the graph (UNIQUE_ID): where its summary is shown



class _Reuse(Exception):
    """Raised by the first-block hook to end a call whose cache will be used; caught by the same call's wrapper."""

    def __init__(self, call: _Call):
        super().__init__("PatchLab StepCache: reuse (internal, never escapes the APPLY_MODEL wrapper)")
        self.call = call


@dataclass
class _Entry:
    """What one chunk keeps from its last full evaluations (tensors on the chunk's device, float32)."""

    d_last: torch.Tensor
    sigma_last: torch.Tensor
    d_prev: Optional[torch.Tensor] = None
    sigma_prev: Optional[torch.Tensor] = None
    x_ref: Optional[torch.Tensor] = None
    block_ref: Optional[torch.Tensor] = None
    reused: List[int] = field(default_factory=list)  # per batch item: reused calls since its last evaluation


ChunkKey = Tuple[Any, int, Tuple[int, ...]]


class StepRun(run.RunState):
    """Everything StepCache knows during one sampling run (the run-state protocol, :mod:`.run`)."""

    def __init__(self, spec: CacheSpec):
        super().__init__()
        self.spec = spec
        self.entries: Dict[ChunkKey, _Entry] = {}
        self._step = 0
        self.steps: Dict[int, List[int]] = {}  # step id -> [full calls, reused calls]
        self.full_rows = 0
        self.reused_rows = 0
        self.extra_rows = 0

    # -- steps
    def next_step(self) -> int:
        with self.lock:
            self._step += 1
            return self._step

    # -- entries and counts
    def get(self, keys: List[ChunkKey]) -> List[Optional[_Entry]]:
        with self.lock:
            return [self.entries.get(key) for key in keys]

    def put(self, key: ChunkKey, entry: Optional[_Entry]) -> None:
        with self.lock:
            if entry is None:
                self.entries.pop(key, None)
            else:
                self.entries[key] = entry

    def count(self, step: int, reused: bool, rows: int) -> None:
        with self.lock:
            counts = self.steps.setdefault(step, [0, 0])
            counts[1 if reused else 0] += 1
            if reused:
                self.reused_rows += rows
            else:
                self.full_rows += rows

    def count_extra(self, rows: int) -> None:
        with self.lock:
            self.extra_rows += rows

    def summary(self) -> str:
        with self.lock:
            steps = len(self.steps)
            reused = sum(1 for full, hit in self.steps.values() if hit and not full)
            partly = sum(1 for full, hit in self.steps.values() if hit and full)  # some rows or chunks reused
            full_calls = sum(full for full, _ in self.steps.values())
            hit_calls = sum(hit for _, hit in self.steps.values())
            spec = self.spec
            return (f"{spec.node_id}: reused {reused} of {steps} steps ({partly} partly); model calls: {full_calls} "
                    f"full, {hit_calls} reused; rows: {self.full_rows} evaluated, {self.reused_rows} reused, "
                    f"{self.extra_rows} in extra passes (indicator {spec.indicator}, threshold {spec.threshold:g}, "
                    f"{'forecast' if spec.forecast else 'plain reuse'})")

    def brief(self) -> str:
        """The node's line in the editor, e.g. ``evaluated 18 of 40 rows: 2.2x fewer; 11 of 20 steps reused``."""
        with self.lock:
            total = self.full_rows + self.reused_rows
            steps = len(self.steps)
            reused = sum(1 for full, hit in self.steps.values() if hit and not full)
            return (f"evaluated {self.full_rows} of {total} rows: {canvas.fewer(total, self.full_rows)}; "
                    f"{reused} of {steps} steps reused")

    def finish(self, finished: bool) -> None:
        """The run's INFO line and the node's summary in the editor; every cached tensor dropped."""
        log.info(self.summary())
        canvas.show(self.spec.canvas, self.brief())
        with self.lock:
            self.entries.clear()


class _Call:
    """One tagged model call (``apply_model``): its chunks, their entries, and what the first-block hook saw."""

    def __init__(self, state: StepRun, x: torch.Tensor, sigma: torch.Tensor, transformer_options: Dict,
                 model_sampling):
        self.state = state
        self.spec = state.spec
        uuids = list(transformer_options.get("uuids") or [None])
        flags = list(transformer_options.get("cond_or_uncond") or [0] * len(uuids))
        self.valid = x.shape[0] % len(uuids) == 0 and len(flags) == len(uuids)
        self.rows = x.shape[0] // max(1, len(uuids))
        self.pieces = list(x.split(self.rows)) if self.valid else [x]
        self.keys: List[ChunkKey] = [(uuid, int(flag), tuple(piece.shape))
                                     for uuid, flag, piece in zip(uuids, flags, self.pieces)]
        self.entries = state.get(self.keys) if self.valid else []
        self.sigmas = _row_sigmas(sigma, x.shape[0], x.device)
        self.sigma = self.sigmas.split(self.rows) if self.sigmas is not None and self.valid else None
        self.model_sampling = model_sampling
        self.block_residual: Optional[torch.Tensor] = None
        self.stem: Optional[torch.Tensor] = None

    def eligible(self) -> bool:
        """May this call reuse (before looking at any indicator)? No host sync."""
        spec = self.spec
        if spec.threshold <= 0 or not self.valid or self.sigma is None:
            return False
        for entry in self.entries:
            if entry is None or (spec.indicator == "first block" and max(entry.reused) >= spec.max_consecutive):
                return False
            if spec.indicator == "input" and entry.x_ref is None:
                return False
            if spec.indicator == "first block" and entry.block_ref is None:
                return False
        return True

    def _in_window(self) -> torch.Tensor:
        """[rows] bool: the row's sigma is in the window (and positive: x - sigma * d needs sigma > 0)."""
        positive = self.sigmas > kc.EPS
        if self.spec.window.is_always:
            return positive
        return self.spec.window.mask(self.sigmas) & positive

    def scaled_inputs(self) -> List[torch.Tensor]:
        """The network's input per chunk: ComfyUI's ``calculate_input`` of x for the chunk's sigmas."""
        if self.model_sampling is None or not hasattr(self.model_sampling, "calculate_input"):
            return self.pieces
        return [self.model_sampling.calculate_input(kc.per_item(sigma, piece), piece)
                for sigma, piece in zip(self.sigma, self.pieces)]

    def decide(self, currents: List[torch.Tensor], attribute: str) -> bool:
        """Reuse if every item of every chunk changed less than the threshold (one host sync)."""
        changes = []
        for current, entry in zip(currents, self.entries):
            reference = getattr(entry, attribute)
            if reference.shape != current.shape:
                return False
            changes.append(kc.relative_change(current, reference))
        changes = torch.cat([c.to(self.sigmas.device) for c in changes])
        return bool(kc.all_below(changes, self.spec.threshold) & self._in_window().all())

    def items_reusing(self, currents: List[torch.Tensor]) -> Optional[List[bool]]:
        """Per batch item, whether it reuses (indicator ``input``): in every chunk its change since its last full
        evaluation is below the threshold and its sigma in the window, and it has not reached ``max_consecutive``.
        One host sync; None where a reference does not match."""
        changes = []
        for current, entry in zip(currents, self.entries):
            if entry.x_ref.shape != current.shape or len(entry.reused) != self.rows:
                return None
            changes.append(kc.relative_change(current, entry.x_ref).to(self.sigmas.device))
        below = (torch.stack(changes) < self.spec.threshold) & self._in_window().view(len(self.pieces), self.rows)
        allowed = [all(entry.reused[i] < self.spec.max_consecutive for entry in self.entries)
                   for i in range(self.rows)]
        return [bool(b) and a for b, a in zip(below.all(0).tolist(), allowed)]

    def first_block(self, residual: torch.Tensor) -> None:
        """Called by the first-block hook with that block's residual [rows of the call, ...]; may raise _Reuse."""
        if self.block_residual is not None:
            return  # a second call of the hook in one forward (nested chain): the first one counts
        self.block_residual = residual.detach()
        if self.valid and self.eligible() and residual.shape[0] == self.rows * len(self.pieces):
            if self.decide(list(self.block_residual.split(self.rows)), "block_ref"):
                raise _Reuse(self)

    def reuse(self, items: Optional[List[bool]] = None) -> torch.Tensor:
        """The denoised prediction ``x - sigma * d`` from the cached (or forecast) direction, per chunk, every row;
        ``items``: the batch items that reuse (default all), whose reuse counters advance."""
        items = items if items is not None else [True] * self.rows
        outputs = []
        for piece, sigma, entry in zip(self.pieces, self.sigma, self.entries):
            if self.spec.forecast:
                d = kc.forecast(entry.d_last, entry.sigma_last, sigma, entry.d_prev, entry.sigma_prev,
                                gain=kc.FORECAST_GAIN)
            else:
                d = entry.d_last
            outputs.append(kc.denoised_from_direction(piece, sigma, d))
            entry.reused = [count + 1 if reusing else count for count, reusing in zip(entry.reused, items)]
        return torch.cat(outputs) if len(outputs) > 1 else outputs[0]

    def store(self, x: torch.Tensor, denoised: torch.Tensor, scaled: Optional[List[torch.Tensor]],
              evaluated: Optional[List[bool]] = None) -> None:
        """Keep what the next steps need from this evaluation (``scaled``: the inputs, indicator ``input``;
        ``evaluated``: the batch items the network evaluated, default all; the others keep their entry rows)."""
        if not self.valid or not torch.is_tensor(denoised) or denoised.shape != x.shape:
            if torch.is_tensor(denoised) and denoised.shape != x.shape:
                _warn_once(f"{self.spec.node_id}: the model's output {tuple(denoised.shape)} does not match its "
                           f"input {tuple(x.shape)}; this model is evaluated in full")
            return
        blocks = (list(self.block_residual.split(self.rows)) if self.block_residual is not None
                  and self.block_residual.shape[0] == x.shape[0] else [None] * len(self.pieces))
        if self.spec.indicator == "first block" and self.block_residual is None:
            _warn_once(f"{self.spec.node_id}: the first block of this model did not run through its hook, so "
                       "nothing is reused; use indicator 'input' for this model")
        for index, (key, entry, piece, sigma, out, block) in enumerate(zip(
                self.keys, self.entries, self.pieces, self.sigma, denoised.split(self.rows), blocks)):
            d = kc.direction(piece, sigma, out.detach())
            if evaluated is not None and not all(evaluated):
                self.state.put(key, _merged(entry, evaluated, d, sigma, scaled[index].detach(), self.spec.forecast))
                continue
            keep_previous = self.spec.forecast and entry is not None and entry.d_last.shape == d.shape
            self.state.put(key, _Entry(
                d_last=d, sigma_last=sigma,
                d_prev=entry.d_last if keep_previous else None,
                sigma_prev=entry.sigma_last if keep_previous else None,
                x_ref=scaled[index].detach() if scaled is not None else None,
                block_ref=block if self.spec.indicator == "first block" else None,
                reused=[0] * self.rows,
            ))


def _merged(entry: _Entry, evaluated: List[bool], d: torch.Tensor, sigma: torch.Tensor, x_ref: torch.Tensor,
            forecast: bool) -> _Entry:
    """A chunk's entry after a call that evaluated only the items ``evaluated``: their rows take the new direction,
    sigma and input (the previous direction moving to ``d_prev``); the other rows stay. A row without a previous
    evaluation keeps ``sigma_prev == sigma_last``, which the forecast reads as plain reuse."""
    rows = torch.tensor(evaluated, device=d.device)
    by_row = rows.view(-1, *([1] * (d.ndim - 1)))
    by_sigma = rows.to(sigma.device)
    d_prev = entry.d_prev if entry.d_prev is not None else entry.d_last
    sigma_prev = entry.sigma_prev if entry.sigma_prev is not None else entry.sigma_last
    return _Entry(
        d_last=torch.where(by_row, d, entry.d_last), sigma_last=torch.where(by_sigma, sigma, entry.sigma_last),
        d_prev=torch.where(by_row, entry.d_last, d_prev) if forecast else None,
        sigma_prev=torch.where(by_sigma, entry.sigma_last, sigma_prev) if forecast else None,
        x_ref=torch.where(rows.to(x_ref.device).view_as(by_row), x_ref, entry.x_ref),
        reused=[0 if done else count for done, count in zip(evaluated, entry.reused)],
    )


def _rows_of(value, index: torch.Tensor, rows: int):
    """``value`` cut to the rows ``index`` where it has one row per row of the call (tensors with ``rows`` rows, in
    dicts, lists and tuples: the conditioning, ControlNet outputs); everything else as it is."""
    if torch.is_tensor(value):
        return value.index_select(0, index.to(value.device)) if value.ndim and value.shape[0] == rows else value
    if isinstance(value, dict):
        return {key: _rows_of(item, index, rows) for key, item in value.items()}
    if type(value) in (list, tuple):
        return type(value)(_rows_of(item, index, rows) for item in value)
    return value


def _call_rows(args, kwargs, index: torch.Tensor, rows: int):
    """The APPLY_MODEL arguments of a call over the rows ``index`` only (``transformer_options``: a shallow copy with
    its per-row tensors, such as ``sigmas``, cut)."""
    def cut(value):
        if isinstance(value, dict) and ("cond_or_uncond" in value or "sigmas" in value):  # transformer_options
            return {key: _rows_of(item, index, rows) if torch.is_tensor(item) else item for key, item in value.items()}
        return _rows_of(value, index, rows)

    return [cut(arg) for arg in args], {key: cut(value) for key, value in kwargs.items()}


def _row_sigmas(sigma, rows: int, device) -> Optional[torch.Tensor]:
    """The call's sigma per row, [rows] float32, or None if unknown."""
    if not torch.is_tensor(sigma) or sigma.numel() == 0:
        return None
    sigma = sigma.detach().float().reshape(-1).to(device)
    if sigma.numel() == rows:
        return sigma
    return sigma[:1].expand(rows)


def _transformer_options(args, kwargs) -> Optional[Dict]:
    options = kwargs.get("transformer_options")
    if isinstance(options, dict):
        return options
    for arg in reversed(args):
        if isinstance(arg, dict):
            return arg
    return None


# --- the wrappers ---------------------------------------------------------------------------

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
        return StepRun(spec)

    return start


def predict_noise_wrapper(executor, x, timestep, model_options=None, seed=None, *args, **kwargs):
    state = run.of(model_options, STATE_KEY)
    if state is not None:
        model_options = run.mark_main_pass(model_options, MARKER_KEY, x, state.next_step())
    return executor(x, timestep, model_options, seed, *args, **kwargs)


def calc_cond_batch_wrapper(executor, *args, **kwargs):
    args = list(args)
    model_options = args[-1] if args and isinstance(args[-1], dict) else kwargs.get("model_options", {})
    transformer_options = model_options.get("transformer_options", {})
    state = transformer_options.get(STATE_KEY)
    if state is None or transformer_options.get(keys.GUIDANCE_PASS) is not None or len(args) < 3:
        return executor(*args, **kwargs)
    marker = run.take_main_pass(model_options, MARKER_KEY, args[2])
    if marker is None:
        return executor(*args, **kwargs)
    tagged = dict(model_options)
    tagged["transformer_options"] = {**transformer_options, MAIN_KEY: marker.step}
    if isinstance(args[-1], dict):
        args[-1] = tagged
    else:
        kwargs["model_options"] = tagged
    return executor(*args, **kwargs)


def apply_model_wrapper(executor, *args, **kwargs):
    """APPLY_MODEL: ``(x, t, c_concat, c_crossattn, control, transformer_options)`` -> denoised [B, C, ...]."""
    transformer_options = _transformer_options(args, kwargs)
    state = transformer_options.get(STATE_KEY) if transformer_options is not None else None
    if state is None:
        return executor(*args, **kwargs)
    x = args[0] if args else kwargs.get("x")
    sigma = args[1] if len(args) > 1 else kwargs.get("t")
    step = transformer_options.get(MAIN_KEY)
    if step is None or not torch.is_tensor(x) or x.ndim < 3 or transformer_options.get(keys.GUIDANCE_PASS) is not None:
        if torch.is_tensor(x):
            state.count_extra(int(x.shape[0]))
        return executor(*args, **kwargs)
    call = _Call(state, x, sigma, transformer_options, getattr(executor.class_obj, "model_sampling", None))
    scaled = None
    if state.spec.indicator == "input" and call.valid and call.sigma is not None:
        scaled = call.scaled_inputs()
        reusing = call.items_reusing(scaled) if call.eligible() else None
        if reusing is not None and all(reusing):
            state.count(step, True, int(x.shape[0]))
            return call.reuse()
        if reusing is not None and any(reusing):
            return _evaluate_some(executor, args, kwargs, call, reusing, scaled, step)
    if state.spec.indicator == "first block":
        transformer_options[CALL_KEY] = call
    try:
        output = executor(*args, **kwargs)
    except _Reuse as reuse:
        if reuse.call is not call:
            raise
        state.count(step, True, int(x.shape[0]))
        return call.reuse()
    finally:
        if transformer_options.get(CALL_KEY) is call:
            transformer_options.pop(CALL_KEY, None)
    state.count(step, False, int(x.shape[0]))
    if call.sigma is not None:
        call.store(x, output, scaled)
    return output


def _evaluate_some(executor, args, kwargs, call: _Call, reusing: List[bool], scaled: List[torch.Tensor],
                   step: int) -> torch.Tensor:
    """A call where some batch items reuse: the others are evaluated in one model call over their rows."""
    x = args[0] if args else kwargs["x"]
    rows = int(x.shape[0])
    index = torch.tensor([chunk * call.rows + item for chunk in range(len(call.pieces))
                          for item in range(call.rows) if not reusing[item]], device=x.device)
    sub_args, sub_kwargs = _call_rows(args, kwargs, index, rows)
    output = executor(*sub_args, **sub_kwargs)
    denoised = call.reuse(reusing)
    denoised = denoised.index_copy(0, index, output.to(denoised.dtype))
    call.store(x, denoised, scaled, evaluated=[not r for r in reusing])
    call.state.count(step, False, int(index.numel()))
    call.state.count(step, True, rows - int(index.numel()))
    return denoised


# --- the first-block hooks (spec-free: they act only through the call's _Call) ------------------------

def unet_input_block_patch(h, transformer_options):
    """input_block_patch: remember the stem conv's output, hand input block 1's residual to the call."""
    call = transformer_options.get(CALL_KEY)
    if call is None:
        return h
    block = transformer_options.get("block")
    if block == ("input", 0):
        call.stem = h
    elif block == ("input", 1):
        stem, call.stem = call.stem, None
        call.first_block(h - stem if stem is not None and stem.shape == h.shape else h)
    return h


setattr(unet_input_block_patch, keys.STEP_CACHE_MARK, True)


def dit_first_block(previous=None):
    """A ("double_block", 0) replace: run the block (or the replace already there), hand its residual to the call."""
    def replace(args, extra):
        out = block_forward.run_block(previous, args, extra)
        options = args.get("transformer_options")
        call = options.get(CALL_KEY) if isinstance(options, dict) else None
        if call is not None and torch.is_tensor(out.get("img")) and out["img"].shape == args["img"].shape:
            call.first_block(out["img"] - args["img"])
        return out

    setattr(replace, keys.STEP_CACHE_MARK, True)
    return replace


# --- installing ---------------------------------------------------------------------------------

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
