"""Every FLOAT input of every PatchLab node rejects NaN and infinities before a run.

Validation runs through ComfyUI's own ``execution.validate_inputs`` (what ``POST /prompt``
runs), on prompts built from each node's schema, so a node added later is walked too.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import sys

import execution
import pytest

import nodes as comfy_nodes
from patchlab.nodes import _common as common

pack = sys.modules["patchlab"]
NODES = pack.NODE_CLASS_MAPPINGS
WIDGETS = ("INT", "FLOAT", "STRING", "BOOLEAN")
NON_FINITE = [math.nan, math.inf, -math.inf]


def inputs_of(node):
    for group in ("required", "optional"):
        for name, spec in node.INPUT_TYPES().get(group, {}).items():
            yield group, name, spec[0], (spec[1] if len(spec) > 1 else {})


def is_widget(kind, options):
    return (isinstance(kind, list) or kind in WIDGETS) and not options.get("forceInput", False)


LINK_TYPES = sorted({kind for node in NODES.values() for _, _, kind, options in inputs_of(node)
                     if not is_widget(kind, options)} | {"FLOAT"})


class Outputs:
    """A test node with one output of every type the pack's nodes take by link."""

    RETURN_TYPES = tuple(LINK_TYPES)
    FUNCTION = "run"
    CATEGORY = "PatchLab/testing"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}


@pytest.fixture(autouse=True)
def registered(monkeypatch):
    """The pack's nodes in ComfyUI's registry, as the custom-node loader puts them."""
    for node_id, node in NODES.items():
        monkeypatch.setitem(comfy_nodes.NODE_CLASS_MAPPINGS, node_id, node)
    monkeypatch.setitem(comfy_nodes.NODE_CLASS_MAPPINGS, "PatchLabTest_Outputs", Outputs)


def link(kind):
    return ["1", LINK_TYPES.index(kind)]


def default_inputs(node):
    inputs = {}
    for group, name, kind, options in inputs_of(node):
        if is_widget(kind, options):
            if "default" in options:
                inputs[name] = options["default"]
            elif isinstance(kind, list):
                inputs[name] = kind[0] if kind else ""
            else:
                inputs[name] = {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}[kind]
        elif group == "required":
            inputs[name] = link(kind)
    return inputs


def validate(node_id, **changes):
    """ComfyUI's validation of a prompt with one ``node_id`` node (defaults, changed by ``changes``)."""
    inputs = {**default_inputs(NODES[node_id]), **changes}
    prompt = {"1": {"class_type": "PatchLabTest_Outputs", "inputs": {}},
              "2": {"class_type": node_id, "inputs": inputs}}
    valid, errors, _ = asyncio.run(execution.validate_inputs("test", prompt, "2", {}))
    return valid, errors


def messages(errors):
    return " | ".join(f"{error['message']}: {error['details']}" for error in errors)


FLOAT_INPUTS = [(node_id, name) for node_id in sorted(NODES) for _, name, kind, _ in inputs_of(NODES[node_id])
                if kind == "FLOAT"]
RANGED_INPUTS = [(node_id, name, options) for node_id in sorted(NODES)
                 for _, name, kind, options in inputs_of(NODES[node_id]) if kind in ("INT", "FLOAT")]
COMBO_INPUTS = [(node_id, name) for node_id in sorted(NODES) for _, name, kind, _ in inputs_of(NODES[node_id])
                if isinstance(kind, list) and kind]


def test_the_pack_has_float_inputs_to_walk():
    assert len(FLOAT_INPUTS) > 50


@pytest.mark.parametrize("value", NON_FINITE, ids=repr)
@pytest.mark.parametrize("node_id,name", FLOAT_INPUTS)
def test_every_float_input_rejects_non_finite_values(node_id, name, value):
    valid, errors = validate(node_id, **{name: value})
    assert not valid
    assert any(node_id in e["details"] and f"{name} is {value!r}," in e["details"] for e in errors), messages(errors)


@pytest.mark.parametrize("node_id", sorted(NODES))
def test_finite_defaults_still_validate(node_id):
    valid, errors = validate(node_id)
    # Only a combo with nothing to choose (no model files in a test run) may fail.
    empty_combos = {name for _, name, kind, _ in inputs_of(NODES[node_id]) if kind == []}
    assert valid or all(e["type"] == "value_not_in_list" and e["extra_info"]["input_name"] in empty_combos
                        for e in errors), messages(errors)


@pytest.mark.parametrize("node_id,name", FLOAT_INPUTS)
def test_comfyui_passes_every_float_input_to_validate_inputs(node_id, name):
    spec = inspect.getfullargspec(NODES[node_id].VALIDATE_INPUTS)
    assert name in spec.args and spec.varargs is None


@pytest.mark.parametrize("node_id,name,options", [(n, i, o) for n, i, o in RANGED_INPUTS if "max" in o])
def test_values_above_the_maximum_are_still_rejected(node_id, name, options):
    valid, errors = validate(node_id, **{name: options["max"] + 1})
    assert not valid and any(name in e["details"] for e in errors), messages(errors)


@pytest.mark.parametrize("node_id,name,options", [(n, i, o) for n, i, o in RANGED_INPUTS if "min" in o])
def test_values_below_the_minimum_are_still_rejected(node_id, name, options):
    valid, errors = validate(node_id, **{name: options["min"] - 1})
    assert not valid and any(name in e["details"] for e in errors), messages(errors)


@pytest.mark.parametrize("node_id,name", COMBO_INPUTS)
def test_unknown_combo_choices_are_still_rejected(node_id, name):
    valid, errors = validate(node_id, **{name: "no such choice"})
    assert not valid and any(name in e["details"] for e in errors), messages(errors)


def test_a_linked_float_input_is_not_checked_before_the_run():
    valid, errors = validate("PatchLab_RescaleCFG", multiplier=link("FLOAT"))
    assert valid, messages(errors)


def test_a_widget_value_sent_as_the_string_nan_is_rejected():
    valid, errors = validate("PatchLab_ModelSamplingSD3", shift="nan")
    assert not valid and "PatchLab_ModelSamplingSD3: shift is nan" in messages(errors)


def test_the_message_says_what_to_give_instead():
    _, errors = validate("PatchLab_RescaleCFG", multiplier=math.nan)
    assert "not a finite number" in messages(errors) and "between 0.0 and 1.0 (default 0.7)" in messages(errors)


def test_an_existing_multi_input_check_still_fires():
    valid, errors = validate("PatchLab_RescaleCFG", start_percent=0.8, end_percent=0.2)
    assert not valid and "start_percent (0.8) is after end_percent (0.2); swap them" in messages(errors)


def test_an_existing_sigma_check_still_fires():
    valid, errors = validate("PatchLab_ModelSamplingContinuousV", sigma_max=0.5, sigma_min=2.0)
    assert not valid and "must be larger than sigma_min" in messages(errors)


def test_a_kwargs_validation_still_gets_its_inputs():
    valid, errors = validate("PatchLab_PerturbedAttentionGuidance", blocks="mid block 3")
    assert not valid and "cannot read block" in messages(errors)


def test_a_kwargs_validation_no_longer_hides_ranges_from_comfyui():
    valid, errors = validate("PatchLab_PerturbedAttentionGuidance", scale=1000.0)
    assert not valid and "scale is 1000.0, above its maximum 100.0" in messages(errors)


def test_guarding_twice_changes_nothing():
    node = NODES["PatchLab_RescaleCFG"]
    before = inspect.getfullargspec(node.VALIDATE_INPUTS)
    common.guard_inputs(node)
    assert inspect.getfullargspec(node.VALIDATE_INPUTS) == before
    assert "swap them" in node.VALIDATE_INPUTS(start_percent=0.8, end_percent=0.2)


def test_a_new_node_is_guarded_and_keeps_its_own_check():
    class NewNode:
        NODE_ID = "PatchLab_NewNode"

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 2.0}),
                                 "mode": (["a", "b"],)}}

        @classmethod
        def VALIDATE_INPUTS(cls, **values):
            return "mode b needs strength 1" if values.get("mode") == "b" and values.get("strength") != 1.0 else True

    common.guard_inputs(NewNode)
    assert "PatchLab_NewNode: strength is inf" in NewNode.VALIDATE_INPUTS(strength=math.inf, mode="a")
    assert NewNode.VALIDATE_INPUTS(strength=0.5, mode="b") == "mode b needs strength 1"
    assert NewNode.VALIDATE_INPUTS(strength=0.5, mode="a") is True
    assert "above its maximum" in NewNode.VALIDATE_INPUTS(strength=3.0, mode="a")


def test_a_subclass_of_a_guarded_node_is_guarded_with_its_own_inputs():
    base = NODES["PatchLab_ModelSamplingSD3"]

    class Derived(base):
        @classmethod
        def INPUT_TYPES(cls):
            spec = base.INPUT_TYPES()
            spec["required"]["extra"] = ("FLOAT", {"default": 0.0, "min": -1.0, "max": 1.0})
            return spec

    common.guard_inputs(Derived)
    assert "extra is nan" in Derived.VALIDATE_INPUTS(shift=3.0, extra=math.nan)
    assert base.VALIDATE_INPUTS(shift=3.0) is True
    assert "extra" not in inspect.getfullargspec(base.VALIDATE_INPUTS).args
