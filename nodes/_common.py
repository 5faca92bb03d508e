"""Pieces every PatchLab node shares: the category root, common inputs, validation."""

from __future__ import annotations

from typing import Any, Dict, Union

ROOT_CATEGORY = "PatchLab"
MAX_RESOLUTION = 16384  # ComfyUI's nodes.MAX_RESOLUTION

MODEL_INPUT = ("MODEL", {"tooltip": "The model to patch. It is cloned; the input model is left unchanged."})
MODEL_OUTPUT_TOOLTIP = "A patched clone of the input model."


def percent_inputs(what: str) -> Dict[str, Any]:
    """``start_percent`` / ``end_percent`` inputs: the part of the schedule where ``what`` acts."""
    return {
        "start_percent": ("FLOAT", {
            "default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001,
            "tooltip": f"Where in the schedule {what} starts: 0 is the first step, 1 the last. 0 (with end 1) "
                       "keeps it on for the whole run.",
        }),
        "end_percent": ("FLOAT", {
            "default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001,
            "tooltip": f"Where in the schedule {what} stops (must not be below start_percent). Outside the "
                       "window the result is exactly what it would be without this node.",
        }),
    }


def check_percents(start_percent: Any = None, end_percent: Any = None) -> Union[bool, str]:
    if start_percent is not None and end_percent is not None and start_percent > end_percent:
        return f"start_percent ({start_percent}) is after end_percent ({end_percent}); swap them"
    return True


def category(sub: str) -> str:
    return f"{ROOT_CATEGORY}/{sub}"


def check_ranges(node_cls: type, **values: Any) -> Union[bool, str]:
    """Check values against the min/max of ``node_cls``'s own input spec.

    ComfyUI skips its range check for inputs a ``VALIDATE_INPUTS`` names, so nodes
    that validate several inputs together call this first. Values that are None (a
    linked input, not known before the run) are not checked.
    """
    spec: Dict[str, Any] = {}
    for group in node_cls.INPUT_TYPES().values():
        spec.update(group)
    for name, value in values.items():
        if value is None or name not in spec or len(spec[name]) < 2:
            continue
        options = spec[name][1]
        if "min" in options and value < options["min"]:
            return f"{name} is {value}, below its minimum {options['min']}"
        if "max" in options and value > options["max"]:
            return f"{name} is {value}, above its maximum {options['max']}"
    return True


def first_error(*results: Union[bool, str, None]) -> Union[bool, str]:
    """The first error message among validation results, or True."""
    for result in results:
        if result is not True and result is not None:
            return result
    return True
