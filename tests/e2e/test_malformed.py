"""Malformed prompts sent through POST /prompt are rejected with a clear error; the server keeps working.

Wrong types, unknown combo values, block strings that do not parse, links to nodes or outputs
that do not exist, a missing required input: HTTP 400 naming the problem, never a stack trace
from inside torch. A block list that parses but names blocks the model lacks is only known at
run time: the run fails with a message naming the node and the blocks it has.
"""

import json

import pytest

from devtools.server import PromptRejected


def prompt():
    """Tiny SD1.5 -> APG -> PAG -> SAG -> ToMe -> KSampler -> preview, in the API format."""
    window = {"start_percent": 0.0, "end_percent": 1.0}
    return {
        "1": {"class_type": "PatchLabTest_TinyCheckpoint", "inputs": {"layout": "sd15", "seed": 0}},
        "2": {"class_type": "PatchLab_AdaptiveProjectedGuidance",
              "inputs": {"model": ["1", 0], "eta": 1.0, "norm_threshold": 5.0, "momentum": -0.5, "mode": "paper",
                         **window}},
        "3": {"class_type": "PatchLab_PerturbedAttentionGuidance",
              "inputs": {"model": ["2", 0], "scale": 3.0, "blocks": "middle", "rescale": 0.0, **window}},
        "4": {"class_type": "PatchLab_SelfAttentionGuidance",
              "inputs": {"model": ["3", 0], "scale": 0.5, "blur_sigma": 2.0, "threshold": 1.0,
                         "block": "middle.0.0", **window}},
        "5": {"class_type": "PatchLab_TokenMerging",
              "inputs": {"model": ["4", 0], "ratio": 0.5, "max_downsample": 1, "stride_x": 2, "stride_y": 2,
                         "destinations": "random", "seed": 3, "metric": "input",
                         "merge": "queries, keys and values", **window}},
        "6": {"class_type": "PatchLabTest_TinyTextEncode", "inputs": {"text": "a lighthouse", "clip": ["1", 1]}},
        "7": {"class_type": "PatchLabTest_TinyTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
        "8": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "9": {"class_type": "KSampler",
              "inputs": {"model": ["5", 0], "seed": 0, "steps": 2, "cfg": 5.0, "sampler_name": "euler",
                         "scheduler": "normal", "positive": ["6", 0], "negative": ["7", 0],
                         "latent_image": ["8", 0], "denoise": 1.0}},
        "10": {"class_type": "PatchLabTest_TinyVAEDecode", "inputs": {"samples": ["9", 0], "vae": ["1", 2]}},
        "11": {"class_type": "PreviewImage", "inputs": {"images": ["10", 0]}},
    }


def changed(node, name, value):
    def change(p):
        if value is DELETE:
            del p[node]["inputs"][name]
        else:
            p[node]["inputs"][name] = value
    return change


DELETE = object()

# id -> (change, the node the error is reported on, words the error must contain)
MALFORMED = {
    "string_for_a_float": (changed("2", "eta", "strong"), "2", "eta"),
    "list_for_an_int": (changed("5", "max_downsample", [1, 2, 3]), "5", "max_downsample"),
    "unknown_combo_value": (changed("2", "mode", "diffusers"), "2", "diffusers"),
    "unknown_sampler": (changed("9", "sampler_name", "euler_fast"), "9", "euler_fast"),
    "pag_blocks_do_not_parse": (changed("3", "blocks", "middle.x"), "3", "cannot read block 'middle.x'"),
    "pag_blocks_too_deep": (changed("3", "blocks", "input.9.9.9.9"), "3", "cannot read block"),
    "pag_blocks_empty": (changed("3", "blocks", ""), "3", "no block given"),
    "sag_block_does_not_parse": (changed("4", "block", "nowhere"), "4", "nowhere"),
    "link_of_the_wrong_type": (changed("2", "model", ["6", 0]), "2", "CONDITIONING"),
    "link_without_an_output_index": (changed("3", "model", ["2"]), "3", "model"),
    "missing_required_input": (changed("3", "scale", DELETE), "3", "scale"),
    "missing_model_link": (changed("4", "model", DELETE), "4", "model"),
}

# ComfyUI 0.3.75 reports these as an exception during its own validation (not per node).
BROKEN_LINKS = {
    "link_to_a_node_that_does_not_exist": changed("2", "model", ["99", 0]),
    "output_index_out_of_range": changed("2", "model", ["1", 7]),
}


def reject(server, change):
    p = prompt()
    change(p)
    with pytest.raises(PromptRejected) as rejected:
        server.queue(p)
    return rejected.value.response


def no_torch_trace(response):
    text = json.dumps(response)
    assert "torch/" not in text and "torch\\\\" not in text, text[:2000]


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_prompt_is_rejected_naming_node_and_input(server, case):
    change, node, words = MALFORMED[case]
    response = reject(server, change)
    no_torch_trace(response)
    assert node in response["node_errors"], response
    text = json.dumps(response["node_errors"][node])
    assert words in text, text
    assert server.alive()


@pytest.mark.parametrize("case", sorted(BROKEN_LINKS))
def test_a_link_to_nothing_is_rejected(server, case):
    response = reject(server, BROKEN_LINKS[case])
    no_torch_trace(response)
    assert response.get("error") or response.get("node_errors"), response
    assert server.alive()


def test_blocks_the_model_lacks_fail_the_run_naming_node_and_blocks(server):
    p = prompt()
    p["3"]["inputs"]["blocks"] = "output.99"
    entry = server.wait(server.queue(p))
    assert entry["status"]["status_str"] == "error"
    (error,) = [data for kind, data in entry["status"]["messages"] if kind == "execution_error"]
    assert error["node_id"] == "3"
    assert "'output.99' has no self-attention in this model" in error["exception_message"]
    assert "blocks with transformers: input.1" in error["exception_message"]
    assert not any("torch" in line for line in error.get("traceback", [])), error["traceback"]


def test_a_max_downsample_that_is_not_a_power_of_two_is_rejected_before_the_run(server):
    response = reject(server, changed("5", "max_downsample", 3))
    assert "max_downsample" in json.dumps(response["node_errors"]["5"])


def test_the_server_still_runs_a_valid_prompt_after_the_malformed_ones(server):
    for change in [*[c for c, _, _ in MALFORMED.values()], *BROKEN_LINKS.values()]:
        p = prompt()
        change(p)
        with pytest.raises(PromptRejected):
            server.queue(p)
    assert server.run(prompt())["status"]["status_str"] == "success"
