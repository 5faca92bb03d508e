"""Guidance that saves model calls: leave the negative prompt out of the model call where guidance is off.

At a step where guidance is off, the negative conditioning is removed from the model
call and the positive prediction is handed on as the negative one too, so pre-CFG, CFG
and post-CFG functions all run and see ``uncond_denoised == cond_denoised``: CFG gives
exactly the positive prediction, a cfg = 1 step, for one model pass instead of two.

Hooks (installed once per model, whatever number of nodes is chained):

* a ``WrappersMP.CALC_COND_BATCH`` wrapper (stacks with other packs' wrappers): the
  decision point. It receives ``(executor, model, conds, x_in, timestep, model_options)``
  and calls the executor with ``[cond, None]`` at a skipped step; calls with anything
  other than exactly a positive and a negative (PAG/SEG/SLG/SAG extra passes, cfg = 1
  steps, guiders with more conditionings such as PerpNeg) pass through untouched;
* where the model already holds a ``sampler_calc_cond_batch_function`` (that slot
  replaces ``calc_cond_batch`` inside ``sampling_function``, so a wrapper of it may never
  run), that function is chained: ours decides, then calls it (with the negative left
  out at a skipped step). The previous function is kept, never dropped;
* a ``WrappersMP.OUTER_SAMPLE`` wrapper that brackets each run: it creates the run's
  state (AdaptiveGuidance's "stopped", the counters) and logs one INFO line at the end.

Composition: every node adds a rule to the tuple at
``transformer_options["patchlab_guidance_skip"]``. Each rule says where ITS node turns
guidance off; a step is guided only where no rule turns guidance off (the off-sets add
up, so each node keeps its promise whatever else is chained), unless something needs the
negative prediction at that step: an active PatchLab SAG spec (it records the negative
pass's attention and blurs the negative prediction) or ComfyUI's SelfAttentionGuidance
(needs it at every step). Such steps are computed as without the skip nodes.

Decisions are made once per model call for the whole batch: one host transfer per step
(the sigmas, plus AdaptiveGuidance's verdict of the previous step, in one tensor).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import comfy.patcher_extension
import torch

from ..kernels.guidance_skip import prediction_similarity
from . import canvas, core_nodes, keys, once, run
from .window import SigmaWindow

log = logging.getLogger(__name__)
_warn_once = functools.partial(once.warn_once, log)  # a warning per process, not per step

RULES_KEY = "patchlab_guidance_skip"       # transformer_options: tuple of rules
WRAPPER_KEY = "patchlab_guidance_skip"     # key of both wrappers
STATE_KEY = "patchlab_guidance_skip_run"   # transformer_options: the run's SkipRun
CORE_SAG_MODULE = "nodes_sag"
CALC = comfy.patcher_extension.WrappersMP.CALC_COND_BATCH


def _inside(window: SigmaWindow, sigma: float) -> bool:
    return window.is_always or window.sigma_end <= sigma <= window.sigma_start


# --- rules ---------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class IntervalRule:
    """GuidanceInterval: guidance only inside ``window``."""

    node: str
    window: SigmaWindow
    canvas: Optional[str] = None  # the node's id in the graph (UNIQUE_ID): where its summary is shown

    def off(self, sigmas: Sequence[float], state: SkipRun) -> bool:
        return not any(_inside(self.window, s) for s in sigmas)

    def __deepcopy__(self, memo):
        return self


@dataclass(frozen=True)
class Truncation:
    """Where RenormCFG's ``cfg_trunc`` turns guidance off.

    ``comfyui``: while ``sigma >= sigma_limit`` (the early, high-noise steps; ComfyUI's
    RenormCFG). ``paper``: once ``sigma < sigma_limit`` (the late, low-noise steps; the
    CFG truncation of Lumina-Image 2.0), ``sigma_limit`` being the sigma at the schedule
    percent given.
    """

    mode: str
    sigma_limit: float

    def covers(self, sigma: float) -> bool:
        return sigma >= self.sigma_limit if self.mode == "comfyui" else sigma < self.sigma_limit

    def mask(self, sigma: torch.Tensor) -> torch.Tensor:
        """Per-sample boolean [B] (no host sync)."""
        return sigma >= self.sigma_limit if self.mode == "comfyui" else sigma < self.sigma_limit


@dataclass(frozen=True, eq=False)
class TruncationRule:
    """RenormCFG: guidance off where its truncation covers sigma, inside the node's window."""

    node: str
    truncation: Truncation
    window: SigmaWindow
    canvas: Optional[str] = None

    def off(self, sigmas: Sequence[float], state: SkipRun) -> bool:
        return all(self.truncation.covers(s) and _inside(self.window, s) for s in sigmas)

    def __deepcopy__(self, memo):
        return self


@dataclass(frozen=True, eq=False)
class AdaptiveRule:
    """AdaptiveGuidance: off for the rest of the run once the predictions agree above ``threshold``.

    Checked at guided steps with ``sigma <= sigma_start`` (never before start_percent);
    every item of the batch has to exceed the threshold.
    """

    node: str
    threshold: float
    sigma_start: float
    canvas: Optional[str] = None

    def off(self, sigmas: Sequence[float], state: SkipRun) -> bool:
        return id(self) in state.stopped

    def observe(self, x: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor, sigmas: Sequence[float],
                state: SkipRun) -> None:
        if self.threshold >= 1.0 or id(self) in state.stopped or any(s > self.sigma_start for s in sigmas):
            return
        similarity = prediction_similarity(x, cond, uncond)
        state.set_pending(self, (similarity > self.threshold).all())

    def __deepcopy__(self, memo):
        return self


# --- per-run state ---------------------------------------------------------------------

class SkipRun(run.RunState):
    """What one sampling run remembers: stopped adaptive rules, the last verdicts, counters; at the end, one INFO
    line and each node's summary on the canvas. ``options``: the run's model options (the rules, the slot)."""

    def __init__(self, options: Optional[Dict] = None):
        super().__init__()
        self.options = options or {}
        self.stopped = set()
        self.pending: Dict[int, Tuple[AdaptiveRule, torch.Tensor]] = {}
        self.calls = 0
        self.skipped = 0
        self.rows = 0  # batch rows the positive and negative prompts would have sent to the network
        self.rows_saved = 0
        self.by_node: Dict[str, int] = {}
        self.by_rule: Dict[object, int] = {}  # rule -> calls where it turned guidance off
        self.deciding = False

    def set_pending(self, rule: AdaptiveRule, verdict: torch.Tensor) -> None:
        with self.lock:
            self.pending[id(rule)] = (rule, verdict)

    def read(self, timestep: torch.Tensor) -> List[float]:
        """The sigmas of this call as floats; folds the pending verdicts into ``stopped`` (one host transfer)."""
        with self.lock:
            pending = list(self.pending.values())
            self.pending.clear()
        sigmas = timestep.detach().reshape(-1).float()
        if pending:
            verdicts = [v.reshape(1).to(sigmas.device, torch.float32) for _, v in pending]
            values = torch.cat([sigmas] + verdicts).tolist()
        else:
            values = sigmas.tolist()
        count = sigmas.shape[0]
        with self.lock:
            for (rule, _), verdict in zip(pending, values[count:]):
                if verdict > 0.5:
                    self.stopped.add(id(rule))
        return values[:count]

    def count(self, rows: int, saved: int, off: Sequence) -> None:
        """One decided call: ``rows`` it would send with the negative, ``saved`` left out, the rules ``off``."""
        with self.lock:
            self.calls += 1
            self.rows += rows
            if saved:
                self.skipped += 1
                self.rows_saved += saved
                for node in sorted({rule.node for rule in off}):
                    self.by_node[node] = self.by_node.get(node, 0) + 1
                for rule in off:
                    self.by_rule[rule] = self.by_rule.get(rule, 0) + 1

    def finish(self, finished: bool) -> None:
        if finished:
            _report(self, self.options)


def _state(model_options: Dict) -> SkipRun:
    state = run.of(model_options, STATE_KEY)
    if state is None:  # sampled without the OUTER_SAMPLE wrapper: this model_options copy is the run's
        state = model_options.setdefault("transformer_options", {}).setdefault(STATE_KEY, SkipRun(model_options))
    return state


# --- the decision point -------------------------------------------------------------------


def negative_needed(model_options: Dict, sigmas: Sequence[float]) -> bool:
    """Whether another patch reads the negative prediction at this step (then it is computed)."""
    for fn in model_options.get("sampler_post_cfg_function", []):
        if core_nodes.made_by(fn, CORE_SAG_MODULE, "SelfAttentionGuidance"):
            _warn_once("PatchLab guidance skipping: ComfyUI's SelfAttentionGuidance needs the negative prediction "
                       "at every step, so no model evaluation is saved; PatchLab_SelfAttentionGuidance needs it "
                       "only inside its window")
            return True
    specs = model_options.get("transformer_options", {}).get(keys.ATTENTION_SPECS, ())
    for spec in specs:
        if getattr(spec, "kind", None) == "sag" and spec.scale != 0 and any(_inside(spec.window, s) for s in sigmas):
            return True
    return False


def guarded_call(call: Callable, model, conds: List, x_in: torch.Tensor, timestep: torch.Tensor,
                 model_options: Dict) -> List[torch.Tensor]:
    """``call(model, conds, x_in, timestep, model_options)`` with the negative left out where guidance is off."""
    transformer_options = model_options.get("transformer_options", {})
    rules = transformer_options.get(RULES_KEY, ())
    if (not rules or len(conds) != 2 or conds[0] is None or conds[1] is None
            or transformer_options.get(keys.GUIDANCE_PASS) is not None
            or (run.of(model_options, STATE_KEY) is None and "sample_sigmas" not in transformer_options)):
        return call(model, conds, x_in, timestep, model_options)  # not a sampling run's own options: no state
    state = _state(model_options)
    if state.deciding:  # inside our chained slot function, which has decided already
        return call(model, conds, x_in, timestep, model_options)
    sigmas = state.read(timestep)
    off = [rule for rule in rules if rule.off(sigmas, state)]
    rows = [x_in.shape[0] * max(len(c), 1) for c in conds]  # per prompt: batch x its conditioning entries
    if off and not negative_needed(model_options, sigmas):
        out = list(call(model, [conds[0], None], x_in, timestep, model_options))
        out[1] = out[0].clone()
        state.count(sum(rows), rows[1], off)
        return out
    out = call(model, conds, x_in, timestep, model_options)
    state.count(sum(rows), 0, ())
    for rule in rules:
        if isinstance(rule, AdaptiveRule):
            rule.observe(x_in, out[0], out[1], sigmas, state)
    return out


def calc_cond_batch_wrapper(executor, model, conds, x_in, timestep, model_options):
    """CALC_COND_BATCH wrapper: the decision point for ``comfy.samplers.calc_cond_batch``."""
    return guarded_call(executor, model, conds, x_in, timestep, model_options)


def chain_slot(previous: Callable) -> Callable:
    """A ``sampler_calc_cond_batch_function`` that decides, then calls ``previous`` (another node's)."""
    def calc_cond_batch_function(args):
        def call(model, conds, x, sigma, model_options):
            state = run.of(model_options, STATE_KEY)
            if state is not None:
                state.deciding = True
            try:
                return previous({**args, "conds": conds, "input": x, "sigma": sigma, "model": model,
                                 "model_options": model_options})
            finally:
                if state is not None:
                    state.deciding = False
        return guarded_call(call, args["model"], args["conds"], args["input"], args["sigma"], args["model_options"])

    calc_cond_batch_function.patchlab_guidance_skip = True
    calc_cond_batch_function.previous = previous
    return calc_cond_batch_function


def _report(state: SkipRun, options: Dict) -> None:
    rules = options.get("transformer_options", {}).get(RULES_KEY, ())
    nodes = sorted({rule.node for rule in rules})
    if not nodes:
        return
    if state.calls == 0:
        slot = options.get("sampler_calc_cond_batch_function")
        if slot is not None and not getattr(slot, "patchlab_guidance_skip", False):
            _warn_once(f"{', '.join(nodes)}: another node's calc-cond-batch function replaced ComfyUI's and never "
                       "called it, so no negative pass could be skipped; apply the PatchLab node after that node")
        return
    per_node = ", ".join(f"{node} {state.by_node.get(node, 0)}" for node in nodes)
    log.info("PatchLab guidance skipping: negative prompt left out of %d of %d model calls, %d batch rows saved "
             "(steps turned off per node: %s)", state.skipped, state.calls, state.rows_saved, per_node)
    evaluated = state.rows - state.rows_saved
    for rule in rules:
        canvas.show(rule.canvas, f"guidance off in {state.by_rule.get(rule, 0)} of {state.calls} model calls; "
                                 f"evaluated {evaluated} of {state.rows} rows: {canvas.fewer(state.rows, evaluated)}")


# --- installing ---------------------------------------------------------------------------------

def truncation(model, mode: str, cfg_trunc: float) -> Truncation:
    """RenormCFG's truncation: ``comfyui`` reads cfg_trunc as a sigma, ``paper`` as a schedule percent (0-100)."""
    if mode == "comfyui":
        return Truncation("comfyui", float(cfg_trunc))
    if mode == "paper":
        sampling = model.get_model_object("model_sampling")
        return Truncation("paper", float(sampling.percent_to_sigma(min(max(cfg_trunc / 100.0, 0.0), 1.0))))
    raise ValueError(f"truncate is {mode!r}; expected 'comfyui' or 'paper'")


def can_truncate(model, trunc: Truncation) -> bool:
    """Whether ``trunc`` can cover any sigma of the model's schedule (else no rule, no hook, no cost)."""
    if trunc.mode == "paper":
        return trunc.sigma_limit > 0.0
    sigma_max = getattr(model.get_model_object("model_sampling"), "sigma_max", None)
    return sigma_max is None or trunc.sigma_limit <= float(sigma_max)


def rules_of(model) -> Tuple:
    return tuple(model.model_options.get("transformer_options", {}).get(RULES_KEY, ()))


def with_rule(model, rule):
    """A clone of ``model`` with ``rule`` added; the hooks installed once (an existing slot function chained)."""
    patched = model.clone()
    transformer_options = patched.model_options.setdefault("transformer_options", {})
    transformer_options[RULES_KEY] = rules_of(model) + (rule,)
    if not patched.get_wrappers(CALC, WRAPPER_KEY):
        patched.add_wrapper_with_key(CALC, WRAPPER_KEY, calc_cond_batch_wrapper)
    run.install(patched, STATE_KEY, lambda guider, sigmas: SkipRun(guider.model_options))
    slot: Optional[Callable] = patched.model_options.get("sampler_calc_cond_batch_function")
    if slot is not None and not getattr(slot, "patchlab_guidance_skip", False):
        patched.set_model_sampler_calc_cond_batch_function(chain_slot(slot))
    return patched
