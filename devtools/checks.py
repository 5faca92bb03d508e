"""Helpers shared by the tests: run a node class, check a patch left its input alone."""

from __future__ import annotations

import re
from typing import Any, Dict, List, Tuple


def run_node(node_class: type, **inputs: Any) -> Tuple:
    """Call a node the way ComfyUI executes it (V1 FUNCTION or V3 ``execute``); returns its outputs."""
    if hasattr(node_class, "FUNCTION"):
        return tuple(getattr(node_class(), node_class.FUNCTION)(**inputs))
    output = node_class.execute(**inputs)
    return tuple(output.result if hasattr(output, "result") else output)


def snapshot(model) -> Dict[str, Any]:
    """What a patch must not change on the ModelPatcher it was given."""
    return {
        "model_options": _freeze(model.model_options),
        "object_patches": dict(model.object_patches),
        "patches_uuid": model.patches_uuid,
        "model_sampling": model.get_model_object("model_sampling"),
    }


def assert_unchanged(model, before: Dict[str, Any]) -> None:
    after = snapshot(model)
    for key, value in before.items():
        assert after[key] == value if key != "model_sampling" else after[key] is value, f"input model's {key} changed"


def _freeze(value: Any) -> Any:
    """A comparable copy of nested dicts/lists; other objects compared by identity."""
    if isinstance(value, dict):
        return tuple(sorted((repr(k), _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_freeze(v) for v in value))
    return ("id", id(value))


STEP_CACHE_LOG = re.compile(r"PatchLab_StepCache: reused (\d+) of (\d+) steps \((\d+) partly\); model calls: (\d+) "
                            r"full, (\d+) reused; rows: (\d+) evaluated, (\d+) reused, (\d+) in extra passes")
STEP_CACHE_KEYS = ("reused_steps", "steps", "partly", "full_calls", "reused_calls", "full_rows", "reused_rows",
                   "extra_rows")


def step_cache_runs(caplog) -> List[Dict[str, int]]:
    """The StepCache log lines so far as dicts (one per run, :data:`STEP_CACHE_KEYS`), and clear the log."""
    found = []
    for record in caplog.records:
        match = STEP_CACHE_LOG.search(record.getMessage())
        if match:
            found.append(dict(zip(STEP_CACHE_KEYS, map(int, match.groups()))))
    caplog.clear()
    return found
