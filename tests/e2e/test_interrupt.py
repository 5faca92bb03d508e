"""POST /interrupt mid-sampling leaves nothing behind in the cached, patched MODEL of a real server.

The server here caches node outputs (ComfyUI's default), so the patch nodes' MODEL is the
same object in every prompt. A prompt is run once (fresh patches), then the same chain runs
with many steps and is interrupted after its second step (seen on the websocket's progress
messages), then the first prompt runs again with denoise 0.99999: ComfyUI samples the whole
schedule for any denoise above 0.9999, so the result must be the first run's, while the changed
input makes the sampler re-execute however many prompts the server's output cache keeps
(0.3.75 keeps one, newer releases more). It runs on the cached, interrupted MODEL and must save
exactly the latent of the first run.
"""

import asyncio
import copy
import json
import uuid

import aiohttp
import pytest
import safetensors.torch

from devtools.server import ComfyServer, prepare_base_directory

PATCHES = ("2", "3", "4", "5")


# Above 0.9999 KSampler takes the full schedule (comfy.samplers.KSampler.set_steps): the same
# sigmas as 1.0, but another input signature, so no output cache can serve the sampler.
FULL_SCHEDULE_DENOISE = 0.99999


def prompt(steps=3, seed=5, denoise=1.0):
    """Tiny SD1.5 -> APG (momentum) -> CFGZeroStar -> SAG -> ToMe -> KSampler -> SaveLatent."""
    window = {"start_percent": 0.0, "end_percent": 1.0}
    return {
        "1": {"class_type": "PatchLabTest_TinyCheckpoint", "inputs": {"layout": "sd15", "seed": 0}},
        "2": {"class_type": "PatchLab_AdaptiveProjectedGuidance",
              "inputs": {"model": ["1", 0], "eta": 1.0, "norm_threshold": 5.0, "momentum": -0.5, "mode": "paper",
                         **window}},
        "3": {"class_type": "PatchLab_CFGZeroStar",
              "inputs": {"model": ["2", 0], "mode": "paper", "zero_init_steps": 1, **window}},
        "4": {"class_type": "PatchLab_SelfAttentionGuidance",
              "inputs": {"model": ["3", 0], "scale": 0.5, "blur_sigma": 2.0, "threshold": 1.0,
                         "block": "middle.0.0", **window}},
        "5": {"class_type": "PatchLab_TokenMerging",
              "inputs": {"model": ["4", 0], "ratio": 0.5, "max_downsample": 1, "stride_x": 2, "stride_y": 2,
                         "destinations": "random", "seed": 3, "metric": "input",
                         "merge": "queries, keys and values", **window}},
        "6": {"class_type": "PatchLabTest_TinyTextEncode", "inputs": {"text": "a lighthouse", "clip": ["1", 1]}},
        "7": {"class_type": "PatchLabTest_TinyTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
        "8": {"class_type": "EmptyLatentImage", "inputs": {"width": 104, "height": 72, "batch_size": 2}},
        "9": {"class_type": "KSampler",
              "inputs": {"model": ["5", 0], "seed": seed, "steps": steps, "cfg": 5.0, "sampler_name": "euler",
                         "scheduler": "normal", "positive": ["6", 0], "negative": ["7", 0],
                         "latent_image": ["8", 0], "denoise": denoise}},
        "10": {"class_type": "SaveLatent", "inputs": {"samples": ["9", 0], "filename_prefix": "lifecycle"}},
    }


@pytest.fixture(scope="module")
def caching_server(tmp_path_factory):
    base = prepare_base_directory(tmp_path_factory.mktemp("comfyui_cached"), with_testkit=True)
    with ComfyServer(base) as running:
        yield running


def saved_latent(server, entry):
    (item,) = entry["outputs"]["10"]["latents"]
    path = server.base / item.get("type", "output") / item.get("subfolder", "") / item["filename"]
    return safetensors.torch.load_file(str(path))["latent_tensor"]


def cached_nodes(entry):
    return {node for kind, data in entry["status"]["messages"] if kind == "execution_cached" for node in data["nodes"]}


async def queue_and_interrupt(server, long_prompt, after_step=2, timeout=120):
    """Queue ``long_prompt`` and POST /interrupt once its sampler reported ``after_step`` steps."""
    client_id = uuid.uuid4().hex
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"ws://127.0.0.1:{server.port}/ws?clientId={client_id}") as ws:
            async with session.post(f"{server.url}/prompt",
                                    json={"prompt": long_prompt, "client_id": client_id}) as response:
                assert response.status == 200, await response.text()
                prompt_id = (await response.json())["prompt_id"]
            while True:
                message = await ws.receive(timeout=timeout)
                assert message.type in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY), message
                if message.type != aiohttp.WSMsgType.TEXT:
                    continue
                event = json.loads(message.data)
                data = event.get("data", {})
                if data.get("prompt_id") != prompt_id:
                    continue
                assert event["type"] not in ("execution_success", "execution_error"), event
                if event["type"] == "progress" and data.get("node") == "9" and data["value"] >= after_step:
                    reached = data
                    break
            async with session.post(f"{server.url}/interrupt", json={}) as response:
                assert response.status == 200
    return prompt_id, reached


def test_an_interrupted_run_leaves_the_cached_patched_model_as_fresh(caching_server):
    first = caching_server.run(prompt())
    expected = saved_latent(caching_server, first)

    long_prompt = prompt(steps=400, seed=9)
    prompt_id, reached = asyncio.run(queue_and_interrupt(caching_server, long_prompt))
    interrupted = caching_server.wait(prompt_id)
    kinds = [kind for kind, _ in interrupted["status"]["messages"]]
    assert "execution_interrupted" in kinds, kinds
    assert reached["value"] < reached["max"]
    assert set(PATCHES) <= cached_nodes(interrupted), "the long run did not reuse the patched MODEL"

    again = caching_server.run(copy.deepcopy(prompt(denoise=FULL_SCHEDULE_DENOISE)))
    assert set(PATCHES) <= cached_nodes(again), "the rerun did not reuse the interrupted patched MODEL"
    assert "9" not in cached_nodes(again), "the sampler did not run again"
    actual = saved_latent(caching_server, again)
    assert actual.shape == expected.shape
    assert (actual == expected).all(), f"max |diff| {float((actual - expected).abs().max()):.3g}"
    assert caching_server.alive()
