"""NaN and infinities sent through POST /prompt are rejected by validation, naming node, input and value."""

from __future__ import annotations

import copy
import math

import pytest

from devtools.server import PromptRejected


def prompt():
    """Tiny SD3 -> ModelSamplingSD3 -> RescaleCFG -> PAG -> KSampler, in the API format."""
    return {
        "1": {"class_type": "PatchLabTest_TinyCheckpoint", "inputs": {"layout": "sd3", "seed": 0}},
        "2": {"class_type": "PatchLab_ModelSamplingSD3", "inputs": {"model": ["1", 0], "shift": 3.0}},
        "3": {"class_type": "PatchLab_RescaleCFG",
              "inputs": {"model": ["2", 0], "multiplier": 0.7, "start_percent": 0.0, "end_percent": 1.0}},
        "4": {"class_type": "PatchLab_PerturbedAttentionGuidance",
              "inputs": {"model": ["3", 0], "scale": 3.0, "blocks": "auto", "rescale": 0.0,
                         "start_percent": 0.0, "end_percent": 1.0}},
        "5": {"class_type": "PatchLabTest_TinyTextEncode", "inputs": {"text": "a lighthouse", "clip": ["1", 1]}},
        "6": {"class_type": "PatchLabTest_TinyTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
        "7": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "8": {"class_type": "KSampler",
              "inputs": {"model": ["4", 0], "seed": 0, "steps": 2, "cfg": 4.0, "sampler_name": "euler",
                         "scheduler": "simple", "positive": ["5", 0], "negative": ["6", 0],
                         "latent_image": ["7", 0], "denoise": 1.0}},
        "9": {"class_type": "PatchLabTest_TinyVAEDecode", "inputs": {"samples": ["8", 0], "vae": ["1", 2]}},
        "10": {"class_type": "PreviewImage", "inputs": {"images": ["9", 0]}},
    }


TARGETS = [("4", "PatchLab_PerturbedAttentionGuidance", "scale"),
           ("3", "PatchLab_RescaleCFG", "multiplier"),
           ("2", "PatchLab_ModelSamplingSD3", "shift")]


def rejection(server, changed):
    with pytest.raises(PromptRejected) as rejected:
        server.queue(changed)
    return rejected.value.response


def details(response, node):
    return " | ".join(error["details"] for error in response["node_errors"][node]["errors"])


def test_the_finite_prompt_runs(server):
    entry = server.run(prompt())
    assert entry["status"]["status_str"] == "success"


@pytest.mark.parametrize("node,node_id,name", TARGETS, ids=[t[1] for t in TARGETS])
def test_nan_in_json_is_rejected_naming_node_input_and_value(server, node, node_id, name):
    changed = prompt()
    changed[node]["inputs"][name] = math.nan  # json.dumps writes NaN; ComfyUI's json.loads reads it back
    response = rejection(server, changed)
    assert f"{node_id}: {name} is nan," in details(response, node)
    assert set(response["node_errors"]) == {node}
    assert server.alive()


@pytest.mark.parametrize("value", [math.inf, -math.inf], ids=repr)
def test_infinity_in_json_is_rejected(server, value):
    changed = prompt()
    changed["2"]["inputs"]["shift"] = value  # Infinity / -Infinity in the JSON
    assert f"PatchLab_ModelSamplingSD3: shift is {value!r}," in details(rejection(server, changed), "2")


def test_every_non_finite_input_of_a_prompt_is_reported_and_the_server_keeps_working(server):
    changed = copy.deepcopy(prompt())
    for node, _, name in TARGETS:
        changed[node]["inputs"][name] = math.nan
    response = rejection(server, changed)
    assert {node for node, _, _ in TARGETS} <= set(response["node_errors"])
    assert server.alive()
    assert server.run(prompt())["status"]["status_str"] == "success"
