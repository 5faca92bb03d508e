"""One run-state protocol: what a technique remembers during one sampling run, and when it forgets it.

A technique that keeps something across the model calls of a run (a cache's entries, the count of
what it saved, SAG's attention record, APG's momentum) keeps it in a :class:`RunState` made when
sampling starts and finished when it ends:

* :func:`install` registers an ``OUTER_SAMPLE`` wrapper (once per key) that calls ``start(guider, sigmas)``,
  puts the state into the run's ``transformer_options`` under the technique's key, runs the sampler,
  takes the state out again and calls its :meth:`RunState.finish` (summary in the log and on the
  node; clear), after an interrupt or an error too. ``guider.model_options`` is the run's own copy
  there (``CFGGuider.sample`` made it), so nothing reaches the patched model;
* every hook of the run finds the state with :func:`of`, in the ``transformer_options`` ComfyUI hands
  it (or in the model options of a CFG function);
* the state is one object however ComfyUI copies the run's options (per model call, and per device
  in the multi-GPU split of 0.23+, which deep-copies them): :class:`RunState` deep-copies to itself
  and carries a lock for the hooks that run in the split's threads.

Main passes: :func:`mark_main_pass` and :func:`take_main_pass` tell a step's own model evaluation (the
first ``calc_cond_batch`` of a ``predict_noise`` call, on its own input) from the extra calls other
nodes make during the step.
"""

from __future__ import annotations

import threading
from typing import Callable, Dict, Optional

import comfy.patcher_extension

OUTER = comfy.patcher_extension.WrappersMP.OUTER_SAMPLE


class RunState:
    """A technique's state for one run; subclasses add what they keep and override :meth:`finish`."""

    def __init__(self):
        self.lock = threading.Lock()

    def finish(self, finished: bool) -> None:
        """The run ended (``finished`` False: interrupted or failed): summarise it and let go of what it held."""

    def __deepcopy__(self, memo):
        return self


def outer_sample_wrapper(key: str, start: Callable[[object, object], RunState]):
    """The OUTER_SAMPLE wrapper of the protocol for the state under ``key`` (see :func:`install`)."""
    def wrapper(executor, *args, **kwargs):
        guider = executor.class_obj
        state = start(guider, args[3] if len(args) > 3 else kwargs.get("sigmas"))
        options = guider.model_options.setdefault("transformer_options", {})
        options[key] = state
        finished = False
        try:
            result = executor(*args, **kwargs)
            finished = True
            return result
        finally:
            options.pop(key, None)
            state.finish(finished)

    return wrapper


def install(patched, key: str, start: Callable[[object, object], RunState], replace: bool = False) -> None:
    """Give each run of ``patched`` a state ``start(guider, sigmas)`` under ``key`` (see the module's docstring;
    ``sigmas``: the run's schedule).

    Installed once per key: a second node of the same technique keeps the first wrapper (its state
    reads the specs from the model options at run time), unless ``replace``."""
    if patched.get_wrappers(OUTER, key):
        if not replace:
            return
        patched.remove_wrappers_with_key(OUTER, key)
    patched.add_wrapper_with_key(OUTER, key, outer_sample_wrapper(key, start))


def of(options: Optional[Dict], key: str) -> Optional[RunState]:
    """The run's state under ``key`` from a hook's ``transformer_options`` or from model options."""
    if not options:
        return None
    found = options.get(key)
    if found is None:
        found = (options.get("transformer_options") or {}).get(key)
    return found


class MainPass:
    """The marker of one ``predict_noise`` call (one evaluation of the sampler): its input ``x`` and its step."""

    def __init__(self, x, step: int):
        self.x, self.step = x, step
        self._taken = False
        self._lock = threading.Lock()

    def take(self, x_in) -> bool:
        """Whether ``x_in`` is this evaluation's input and no call took the main pass yet (then this one does)."""
        with self._lock:
            if self._taken or x_in is not self.x:
                return False
            self._taken = True
            return True

    def __deepcopy__(self, memo):
        return self


def mark_main_pass(model_options: Dict, key: str, x, step: int = 0) -> Dict:
    """A copy of a ``predict_noise`` call's model options whose ``transformer_options`` carry a fresh
    :class:`MainPass` for ``x`` under ``key`` (the wrapper hands the copy on to the evaluation)."""
    options = dict(model_options or {})
    options["transformer_options"] = {**options.get("transformer_options", {}), key: MainPass(x, step)}
    return options


def take_main_pass(model_options: Dict, key: str, x_in) -> Optional[MainPass]:
    """In a ``calc_cond_batch`` wrapper: the evaluation's marker if this call is its main pass (the first call
    on the evaluation's own input), else None. Extra passes other nodes make during the step (on a blurred or
    repeated input, or after the main pass) get None."""
    marker = (model_options or {}).get("transformer_options", {}).get(key)
    return marker if marker is not None and marker.take(x_in) else None
