"""StepCache's spec and what one run keeps: the cached directions per chunk, the calls that use them, the counts.

:class:`StepRun` is the run's state (the run-state protocol, :mod:`patches.run`); :class:`_Call` one
tagged model call, which decides per batch item whether to reuse, forecasts or reuses the cached
direction, and stores what a full evaluation produced. With ``target_speedup`` each chunk entry keeps,
next to its reuse counters, one budget credit per batch item (:func:`..kernels.step_cache.credit_after`),
and the decision is :func:`..kernels.step_cache.budget_evaluates` instead of the threshold alone.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch

from ...kernels import step_cache as kc
from .. import canvas, once, run
from ..window import SigmaWindow

log = logging.getLogger(__name__)
_warn_once = functools.partial(once.warn_once, log)  # a warning per process, not per step

WRAPPER_KEY = "patchlab_step_cache"
STATE_KEY = "patchlab_step_cache"            # StepRun, in the run's transformer_options
MARKER_KEY = "patchlab_step_cache_marker"    # run.MainPass, on one evaluation's transformer_options
MAIN_KEY = "patchlab_step_cache_main"        # step id, on the main pass's transformer_options
CALL_KEY = "patchlab_step_cache_call"        # _Call, on one network call's transformer_options
INDICATORS = ("input", "first block")
# forecast: first order at half the step (two evaluations kept per chunk); taylor 2: second order through the last
# three; chebyshev: a Chebyshev fit over the last four (kernels.step_cache.HISTORY); plain: the last as it is (one).
REUSE_MODES = ("forecast", "plain", "taylor 2", "chebyshev")


@dataclass(frozen=True)
class CacheSpec:
    node_id: str
    indicator: str
    threshold: float
    max_consecutive: int
    forecast: bool
    window: SigmaWindow
    canvas: Optional[str] = None  # the node's id in the graph (UNIQUE_ID): where its summary is shown
    forecast_gain: float = kc.FORECAST_GAIN  # the share of the first-order step a forecast takes (0: plain reuse)
    target_speedup: float = 0.0  # > 0: evaluate at most about 1/target of the rows (a budget); 0: threshold alone
    method: str = "first"  # with forecast: "first" (kc.forecast at forecast_gain), "taylor 2" or "chebyshev"

    @property
    def keeps(self) -> int:
        """Full evaluations (directions [B, ...]) a chunk keeps: 1 for plain reuse, kc.HISTORY[method] otherwise."""
        return kc.HISTORY[self.method] if self.forecast else 1

    @property
    def budget(self) -> bool:
        return self.target_speedup > 0


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
    d_prev: Optional[torch.Tensor] = None      # the evaluation before (forecasts)
    sigma_prev: Optional[torch.Tensor] = None
    # (sigma, d) of the evaluations before d_prev, newest first: what the higher-order forecasts keep beyond two
    # (at most CacheSpec.keeps - 2)
    older: List[Tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    x_ref: Optional[torch.Tensor] = None
    block_ref: Optional[torch.Tensor] = None
    reused: List[int] = field(default_factory=list)  # per batch item: reused calls since its last evaluation
    credit: List[float] = field(default_factory=list)  # per batch item: its budget credit (target_speedup only)


ChunkKey = Tuple[Any, int, Tuple[int, ...]]


class StepRun(run.RunState):
    """Everything StepCache knows during one sampling run (the run-state protocol, :mod:`.run`)."""

    def __init__(self, spec: CacheSpec, sigmas: Optional[torch.Tensor] = None):
        super().__init__()
        self.spec = spec
        # the run's schedule on the host (one copy per run, budget only): the remaining calls are estimated on it
        self.schedule: List[float] = (sigmas.detach().float().cpu().tolist()
                                      if spec.budget and torch.is_tensor(sigmas) else [])
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

    def remaining(self, sigma: float) -> Tuple[float, float]:
        """Estimated calls of the run after the current one at ``sigma``, and those of them outside the window."""
        window = self.spec.window
        with self.lock:
            calls = self._step
        return kc.remaining_calls(self.schedule, sigma, calls, (window.sigma_start, window.sigma_end))

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

    def _speedup(self) -> str:
        """``"2.1x fewer"``, with the budget ``"2.1x fewer (target 2x)"``: the rows of the main passes saved."""
        fewer = canvas.fewer(self.full_rows + self.reused_rows, self.full_rows)
        return f"{fewer} (target {self.spec.target_speedup:g}x)" if self.spec.budget else fewer

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
                    f"{self.extra_rows} in extra passes; {self._speedup()} (indicator {spec.indicator}, threshold "
                    f"{spec.threshold:g}, {_reuse_name(spec)})")

    def brief(self) -> str:
        """The node's line in the editor, e.g. ``evaluated 18 of 40 rows: 2.2x fewer; 11 of 20 steps reused``
        (with target_speedup ``evaluated 20 of 40 rows: 2.0x fewer (target 2x); ...``)."""
        with self.lock:
            total = self.full_rows + self.reused_rows
            steps = len(self.steps)
            reused = sum(1 for full, hit in self.steps.values() if hit and not full)
            return f"evaluated {self.full_rows} of {total} rows: {self._speedup()}; {reused} of {steps} steps reused"

    def finish(self, finished: bool) -> None:
        """The run's INFO line and the node's summary in the editor; every cached tensor dropped."""
        log.info(self.summary())
        canvas.show(self.spec.canvas, self.brief())
        with self.lock:
            self.entries.clear()


def _row_sigmas(sigma, rows: int, device) -> Optional[torch.Tensor]:
    """The call's sigma per row, [rows] float32, or None if unknown."""
    if not torch.is_tensor(sigma) or sigma.numel() == 0:
        return None
    sigma = sigma.detach().float().reshape(-1).to(device)
    if sigma.numel() == rows:
        return sigma
    return sigma[:1].expand(rows)


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
        if (spec.threshold <= 0 and not spec.budget) or not self.valid or self.sigma is None:
            return False
        for entry in self.entries:
            if entry is None or (spec.budget and len(entry.credit) != self.rows):
                return False
            if spec.indicator == "first block" and not spec.budget and max(entry.reused) >= spec.max_consecutive:
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
        """Reuse if every item of every chunk changed less than the threshold (one host sync); with the budget,
        the budget's rule for the call as a whole: its largest change, its smallest credit."""
        changes = []
        for current, entry in zip(currents, self.entries):
            reference = getattr(entry, attribute)
            if reference.shape != current.shape:
                return False
            changes.append(kc.relative_change(current, reference))
        changes = torch.cat([c.to(self.sigmas.device) for c in changes])
        if not self.spec.budget:
            return bool(kc.all_below(changes, self.spec.threshold) & self._in_window().all())
        change, inside, sigma = self._host(changes, self._in_window())
        if not all(inside):
            return False  # outside the window every row is evaluated
        return not self._budget_evaluates(max(change), max(sigma), range(self.rows))

    def _host(self, changes: torch.Tensor, inside: torch.Tensor) -> Tuple[List[float], List[bool], List[float]]:
        """The budget's inputs on the host in one sync: changes, in-window flags and sigmas, per row given."""
        rows = changes.numel()
        values = torch.cat([changes.float(), inside.float(), self.sigmas[:rows].float()]).tolist()
        return values[:rows], [v > 0.5 for v in values[rows:2 * rows]], values[2 * rows:]

    def _budget_evaluates(self, change: float, sigma: float, items: Iterable[int]) -> bool:
        """The budget's rule (:func:`..kernels.step_cache.budget_evaluates`) for the batch items ``items`` in every
        chunk together: their largest ``change``, smallest credit, longest run of reuses."""
        spec = self.spec
        cells = [(entry, i) for entry in self.entries for i in items]
        credit = min(entry.credit[i] for entry, i in cells)
        reused = max(entry.reused[i] for entry, i in cells)
        remaining, outside = self.state.remaining(sigma)
        return kc.budget_evaluates(change, credit, reused, spec.threshold, spec.max_consecutive,
                                   spec.target_speedup, remaining, outside)

    def items_reusing(self, currents: List[torch.Tensor]) -> Optional[List[bool]]:
        """Per batch item, whether it reuses (indicator ``input``): in every chunk its change since its last full
        evaluation is below the threshold and its sigma in the window, and it has not reached ``max_consecutive``;
        with the budget, its sigma is in the window and the budget's rule says reuse. One host sync; None where a
        reference does not match."""
        changes = []
        for current, entry in zip(currents, self.entries):
            if entry.x_ref.shape != current.shape or len(entry.reused) != self.rows:
                return None
            changes.append(kc.relative_change(current, entry.x_ref).to(self.sigmas.device))
        inside = self._in_window().view(len(self.pieces), self.rows)
        if self.spec.budget:
            change, inside, sigma = self._host(torch.stack(changes).amax(0), inside.all(0))
            return [inside[i] and not self._budget_evaluates(change[i], sigma[i], (i,)) for i in range(self.rows)]
        below = (torch.stack(changes) < self.spec.threshold) & inside
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
            if self.spec.forecast and self.spec.method != "first" and entry.d_prev is not None:
                d = kc.forecast_history([entry.d_last, entry.d_prev] + [d for _, d in entry.older],
                                        [entry.sigma_last, entry.sigma_prev] + [s for s, _ in entry.older],
                                        sigma, self.spec.method)
            elif self.spec.forecast:
                d = kc.forecast(entry.d_last, entry.sigma_last, sigma, entry.d_prev, entry.sigma_prev,
                                gain=self.spec.forecast_gain)
            else:
                d = entry.d_last
            outputs.append(kc.denoised_from_direction(piece, sigma, d))
            entry.reused = [count + 1 if reusing else count for count, reusing in zip(entry.reused, items)]
            if self.spec.budget:  # the evaluated items pay in store()
                entry.credit = [kc.credit_after(credit, False, self.spec.target_speedup) if reusing else credit
                                for credit, reusing in zip(entry.credit, items)]
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
                self.state.put(key, _merged(entry, evaluated, d, sigma, scaled[index].detach(), self.spec))
                continue
            keep_previous = self.spec.forecast and entry is not None and entry.d_last.shape == d.shape
            self.state.put(key, _Entry(
                d_last=d, sigma_last=sigma,
                d_prev=entry.d_last if keep_previous else None,
                sigma_prev=entry.sigma_last if keep_previous else None,
                older=_older(entry, self.spec) if keep_previous else [],
                x_ref=scaled[index].detach() if scaled is not None else None,
                block_ref=block if self.spec.indicator == "first block" else None,
                reused=[0] * self.rows,
                credit=self._credit_evaluated(entry),
            ))

    def _credit_evaluated(self, entry: Optional[_Entry]) -> List[float]:
        """A chunk's credits after a call that evaluated every item (a new chunk starts each at 1); [] without
        the budget."""
        if not self.spec.budget:
            return []
        before = entry.credit if entry is not None and len(entry.credit) == self.rows else [1.0] * self.rows
        return [kc.credit_after(credit, True, self.spec.target_speedup) for credit in before]


def _merged(entry: _Entry, evaluated: List[bool], d: torch.Tensor, sigma: torch.Tensor, x_ref: torch.Tensor,
            spec: CacheSpec) -> _Entry:
    """A chunk's entry after a call that evaluated only the items ``evaluated``: their rows take the new direction,
    sigma and input (the previous direction moving to ``d_prev``) and pay for the evaluation from their credit;
    the other rows stay. A row without a previous evaluation keeps ``sigma_prev == sigma_last``, which the
    forecast reads as plain reuse."""
    forecast = spec.forecast
    rows = torch.tensor(evaluated, device=d.device)
    by_row = rows.view(-1, *([1] * (d.ndim - 1)))
    by_sigma = rows.to(sigma.device)
    d_prev = entry.d_prev if entry.d_prev is not None else entry.d_last
    sigma_prev = entry.sigma_prev if entry.sigma_prev is not None else entry.sigma_last
    older = []
    if forecast and spec.keeps > 2:  # evaluated rows shift their history by one, the others keep theirs
        slots = [(sigma_prev, d_prev)] + list(entry.older)
        while len(slots) < spec.keeps - 1:
            slots.append(slots[-1])  # a row without that many evaluations repeats its oldest: read as lower order
        older = [(torch.where(by_sigma, newer[0], kept[0]), torch.where(by_row, newer[1], kept[1]))
                 for newer, kept in zip(slots[:spec.keeps - 2], slots[1:spec.keeps - 1])]
    return _Entry(
        d_last=torch.where(by_row, d, entry.d_last), sigma_last=torch.where(by_sigma, sigma, entry.sigma_last),
        d_prev=torch.where(by_row, entry.d_last, d_prev) if forecast else None,
        sigma_prev=torch.where(by_sigma, entry.sigma_last, sigma_prev) if forecast else None,
        older=older,
        x_ref=torch.where(rows.to(x_ref.device).view_as(by_row), x_ref, entry.x_ref),
        reused=[0 if done else count for done, count in zip(evaluated, entry.reused)],
        credit=[kc.credit_after(credit, True, spec.target_speedup) if done else credit
                for done, credit in zip(evaluated, entry.credit)],
    )


def _older(entry: _Entry, spec: CacheSpec) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """The (sigma, d) pairs kept before ``d_prev`` after a call that evaluated every row of the chunk: the entry's
    ``d_prev`` joins them, newest first, at most ``spec.keeps - 2`` (none for plain reuse and the first order)."""
    if spec.keeps <= 2 or entry.d_prev is None or entry.d_prev.shape != entry.d_last.shape:
        return []
    return ([(entry.sigma_prev, entry.d_prev)] + list(entry.older))[:spec.keeps - 2]


def _reuse_name(spec: CacheSpec) -> str:
    """How a reused step is made, as the summary says it: ``forecast``, ``taylor 2 forecast``, ``plain reuse``..."""
    if not spec.forecast:
        return "plain reuse"
    return "forecast" if spec.method == "first" else f"{spec.method} forecast"
