"""Pieces every PatchLab node shares: the category root, the model-patch bases, input specs, validation."""

from __future__ import annotations

import inspect
import math
from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

from ..patches.window import SigmaWindow

ROOT_CATEGORY = "PatchLab"
MAX_RESOLUTION = 16384  # ComfyUI's nodes.MAX_RESOLUTION

MODEL_INPUT = ("MODEL", {"tooltip": "The model to patch. It is cloned; the input model is left unchanged."})
MODEL_OUTPUT_TOOLTIP = "A patched clone of the input model."
# The hidden input that tells a node its id in the graph: where it shows, after a run, what it saved.
HIDDEN_NODE_ID = {"unique_id": "UNIQUE_ID"}


def category(sub: str) -> str:
    return f"{ROOT_CATEGORY}/{sub}"


class ModelPatchNode:
    """Base of every node whose one output is a patched clone of its MODEL input.

    A subclass sets NODE_ID, DISPLAY_NAME, DESCRIPTION and CATEGORY, defines INPUT_TYPES, and its ``patch``
    returns ``(clone,)``.
    """

    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = (MODEL_OUTPUT_TOOLTIP,)
    FUNCTION = "patch"


# --- input specs: one call per input, the (type, options) pair ComfyUI reads ---------------------------

InputSpec = Tuple[Any, Dict[str, Any]]


def float_input(default: float, low: float, high: float, step: float, tooltip: str, **extra: Any) -> InputSpec:
    """A FLOAT widget: default, min, max, step, any ``extra`` options (e.g. ``round=False``), the tooltip."""
    return ("FLOAT", {"default": default, "min": low, "max": high, "step": step, **extra, "tooltip": tooltip})


def int_input(default: int, low: int, high: int, tooltip: str, step: Optional[int] = None) -> InputSpec:
    """An INT widget: default, min, max, the step only where a node sets one (ComfyUI's default is 1), the tooltip."""
    options: Dict[str, Any] = {"default": default, "min": low, "max": high}
    if step is not None:
        options["step"] = step
    options["tooltip"] = tooltip
    return ("INT", options)


def combo_input(choices: Iterable[str], default: str, tooltip: str) -> InputSpec:
    """A drop-down of ``choices`` (a list, as ComfyUI expects) with its default and tooltip."""
    return (list(choices), {"default": default, "tooltip": tooltip})


def percent_input(default: float, tooltip: str) -> InputSpec:
    """A FLOAT input for a point of the schedule: 0 is the first step, 1 the last."""
    return float_input(default, 0.0, 1.0, 0.001, tooltip)


def percent_inputs(what: str, start: float = 0.0) -> Dict[str, Any]:
    """``start_percent`` / ``end_percent`` inputs: the part of the schedule where ``what`` acts."""
    return {
        "start_percent": percent_input(start, f"Where in the schedule {what} starts: 0 is the first step, 1 the "
                                              "last. 0 (with end 1) keeps it on for the whole run."),
        "end_percent": percent_input(1.0, f"Where in the schedule {what} stops (must not be below start_percent). "
                                          "Outside the window the result is exactly what it would be without this "
                                          "node."),
    }


# --- checks a VALIDATE_INPUTS calls: True, or the message ComfyUI shows ------------------------------

def check_percents(start_percent: Any = None, end_percent: Any = None) -> Union[bool, str]:
    if start_percent is not None and end_percent is not None and start_percent > end_percent:
        return f"start_percent ({start_percent}) is after end_percent ({end_percent}); swap them"
    return True


def check_window(node_cls: type, start_percent: Any = None, end_percent: Any = None,
                 **ranged: Any) -> Union[bool, str]:
    """The checks of a node with a schedule window: ranges of the percents (and of ``ranged``), their order."""
    return first_error(check_ranges(node_cls, start_percent=start_percent, end_percent=end_percent, **ranged),
                       check_percents(start_percent, end_percent))


def check_ranges(node_cls: type, **values: Any) -> Union[bool, str]:
    """Check values against the min/max of ``node_cls``'s own input spec.

    ComfyUI skips its range check for inputs a ``VALIDATE_INPUTS`` names, so nodes
    that validate several inputs together call this first. Values that are None (a
    linked input, not known before the run) or not numbers (a malformed value ComfyUI's
    own type check reports) are not checked.
    """
    spec = input_specs(node_cls)
    for name, value in values.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or name not in spec or len(spec[name]) < 2:
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


# --- a model patch acting in a part of the schedule --------------------------------------------------

class WindowPatchNode(ModelPatchNode):
    """A ModelPatchNode that acts in a part of the schedule.

    Its required inputs: the model, the node's own ``OPTIONS`` (name -> input spec), then ``start_percent`` /
    ``end_percent`` (the part of the schedule where ``WHAT`` acts; ``START`` is start_percent's default); then any
    ``OPTIONAL_INPUTS`` and ``HIDDEN_INPUTS``. The window's ranges and order are checked before a run; a node with
    more multi-input checks writes its own VALIDATE_INPUTS.
    """

    WHAT = "the patch"
    START = 0.0
    OPTIONS: Dict[str, InputSpec] = {}
    OPTIONAL_INPUTS: Dict[str, InputSpec] = {}
    HIDDEN_INPUTS: Dict[str, str] = {}  # HIDDEN_NODE_ID for a node that shows what it did on the canvas

    @classmethod
    def INPUT_TYPES(cls):
        types = {"required": {"model": MODEL_INPUT, **cls.OPTIONS, **percent_inputs(cls.WHAT, start=cls.START)}}
        if cls.OPTIONAL_INPUTS:
            types["optional"] = dict(cls.OPTIONAL_INPUTS)
        if cls.HIDDEN_INPUTS:
            types["hidden"] = dict(cls.HIDDEN_INPUTS)
        return types

    @classmethod
    def VALIDATE_INPUTS(cls, start_percent=None, end_percent=None):
        return check_window(cls, start_percent, end_percent)

    @staticmethod
    def window(model, start_percent: float, end_percent: float) -> SigmaWindow:
        """The percents as a sigma interval on the model's own schedule."""
        return SigmaWindow.from_percents(model, start_percent, end_percent)


# --- the central input guard ---------------------------------------------------
#
# ComfyUI 0.3.75 (execution.validate_inputs) converts every widget value to its type,
# then range-checks (min/max, combo choices) only the inputs its VALIDATE_INPUTS does
# not name, and none at all when VALIDATE_INPUTS takes **kwargs; linked inputs are not
# known yet and reach VALIDATE_INPUTS as None. A NaN passes every min/max comparison,
# so ComfyUI lets it through. guard_inputs gives a node a VALIDATE_INPUTS that names
# every FLOAT input (ComfyUI passes them all), rejects NaN and infinities, does
# ComfyUI's own range checks for the inputs it now names in ComfyUI's place, then calls
# the node's own VALIDATE_INPUTS with exactly what it received before.

GUARD_MARK = "_patchlab_guarded"
VALIDATE = "VALIDATE_INPUTS"


def input_specs(node_cls: type) -> Dict[str, Tuple]:
    """Every required and optional input of a V1 node: name -> (type, options)."""
    spec: Dict[str, Tuple] = {}
    for group, inputs in node_cls.INPUT_TYPES().items():
        if group != "hidden":
            spec.update(inputs)
    return spec


def float_inputs(node_cls: type) -> List[str]:
    """Names of the node's FLOAT inputs, in schema order."""
    return [name for name, spec in input_specs(node_cls).items() if spec[0] == "FLOAT"]


def _options(spec: Tuple) -> Dict[str, Any]:
    return spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}


def check_finite(node_cls: type, **values: Any) -> Union[bool, str]:
    """An error naming node, input and value for the first NaN/infinite FLOAT input, or True.

    None (a linked input) is not checked; a list (INPUT_IS_LIST nodes) is checked item by item.
    """
    node_id = getattr(node_cls, "NODE_ID", node_cls.__name__)
    for name, spec in input_specs(node_cls).items():
        if spec[0] != "FLOAT" or values.get(name) is None:
            continue
        value = values[name]
        for item in value if isinstance(value, (list, tuple)) else (value,):
            if isinstance(item, (int, float)) and not math.isfinite(item):
                options = _options(spec)
                bounds = f" between {options['min']} and {options['max']}" if {"min", "max"} <= set(options) else ""
                default = f" (default {options['default']})" if "default" in options else ""
                return (f"{node_id}: {name} is {item}, which is not a finite number; NaN and infinities are not "
                        f"allowed. Give a number{bounds}{default}.")
    return True


def check_like_comfyui(node_cls: type, **values: Any) -> Union[bool, str]:
    """ComfyUI's own widget checks (min/max, combo choice) for the given values; None (linked) skipped."""
    spec = input_specs(node_cls)
    ranged = check_ranges(node_cls, **{k: v for k, v in values.items() if isinstance(v, (int, float))})
    if ranged is not True:
        return ranged
    for name, value in values.items():
        if name in spec and isinstance(spec[name][0], list) and value is not None and value not in spec[name][0]:
            return f"{name}: {value!r} is not one of {spec[name][0]}"
    return True


def _original_validate(node_cls: type) -> Optional[Any]:
    """The node's own VALIDATE_INPUTS as found in its class dict (or a base's), never a guard."""
    for klass in node_cls.__mro__:
        if VALIDATE in klass.__dict__:
            raw = klass.__dict__[VALIDATE]
            func = getattr(raw, "__func__", raw)
            if getattr(func, GUARD_MARK, False):
                return func.original
            return raw
    return None


def _guard_signature(node_cls: type, original: Optional[Any]) -> Tuple[inspect.Signature, List[str], bool]:
    """The guard's signature (the original's parameters plus every FLOAT input), the original's named inputs,
    and whether the original takes **kwargs."""
    params = [inspect.Parameter("cls", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    tail: List[inspect.Parameter] = []
    named: List[str] = []
    takes_kwargs = False
    if original is not None:
        for param in inspect.signature(original.__get__(None, node_cls)).parameters.values():
            if param.kind == inspect.Parameter.POSITIONAL_OR_KEYWORD:
                params.append(param)
                named.append(param.name)
            else:
                tail.append(param)
                takes_kwargs = takes_kwargs or param.kind == inspect.Parameter.VAR_KEYWORD
                if param.kind == inspect.Parameter.KEYWORD_ONLY:
                    named.append(param.name)
    # ComfyUI reads argspec.args: the FLOAT inputs must be positional-or-keyword parameters.
    params += [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None)
               for name in float_inputs(node_cls) if name not in named]
    return inspect.Signature(params + tail), named, takes_kwargs


def guard_inputs(node_cls: type) -> type:
    """Give a V1 node the central VALIDATE_INPUTS guard (idempotent); returns the class.

    The guard rejects NaN/+-inf in every FLOAT input with a message naming the node, the
    input and the value, range-checks the FLOAT inputs it makes ComfyUI pass to it (and,
    for a node whose own VALIDATE_INPUTS takes **kwargs, every input, which ComfyUI then
    skips), and then returns what the node's own VALIDATE_INPUTS returns for the values
    ComfyUI gave it before. A node without FLOAT inputs and without **kwargs validation
    is left as it is.
    """
    original = _original_validate(node_cls)
    signature, named, takes_kwargs = _guard_signature(node_cls, original)
    if not float_inputs(node_cls) and not takes_kwargs:
        return node_cls
    arguments = inspect.Signature(list(signature.parameters.values())[1:])
    own = set(named)

    def validate(cls, *args: Any, **kwargs: Any) -> Union[bool, str]:
        bound = arguments.bind(*args, **kwargs).arguments
        values: Dict[str, Any] = {}
        for name, value in bound.items():
            kind = arguments.parameters[name].kind
            if kind == inspect.Parameter.VAR_KEYWORD:
                values.update(value)
            elif kind != inspect.Parameter.VAR_POSITIONAL:
                values[name] = value
        result = first_error(check_finite(cls, **values),
                             check_like_comfyui(cls, **{k: v for k, v in values.items() if k not in own}))
        if result is not True or original is None:
            return result
        passed = values if takes_kwargs else {k: v for k, v in values.items() if k in own}
        extra = bound.get(next((p.name for p in arguments.parameters.values()
                                if p.kind == inspect.Parameter.VAR_POSITIONAL), ""), ())
        return original.__get__(None, cls)(*extra, **passed)

    validate.__signature__ = signature
    validate.__name__ = validate.__qualname__ = VALIDATE
    validate.__doc__ = f"PatchLab's input guard around {node_cls.__name__}'s own validation (see nodes/_common.py)."
    validate.original = original
    setattr(validate, GUARD_MARK, True)
    setattr(node_cls, VALIDATE, classmethod(validate))
    return node_cls
