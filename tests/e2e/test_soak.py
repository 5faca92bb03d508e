"""Soak: one server, hundreds of queued example workflows with seeded random valid changes.

Every cycle queues every example workflow (on the test kit's tiny models) with its own
seeded changes: KSampler seed, sampler and steps, latent size (odd latent sides
included) and batch, and every FLOAT of every PatchLab node moved within 20 % of its
value (kept only where the node's own validation accepts it). After each cycle a few
prompts of that cycle are queued again exactly as they were and must save the same
latents bit for bit. The server's resident memory, read after models are unloaded,
must not grow by more than 5 % from the end of the first cycle to the end of the last.

``PATCHLAB_SOAK_CYCLES`` sets the number of cycles (default 8: over 300 prompts).
"""

import copy
import inspect
import logging
import os
import random
import sys
import time

import pytest
import safetensors.torch

from devtools import workflows
from devtools.server import ComfyServer, prepare_base_directory

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
log = logging.getLogger(__name__)

CYCLES = int(os.environ.get("PATCHLAB_SOAK_CYCLES", "8"))
RERUNS_PER_CYCLE = 4
MIN_PROMPTS = 300
RSS_GROWTH = 0.05
SAMPLERS = ("euler", "euler_ancestral", "dpmpp_2m", "dpmpp_2m_sde")
SIDES = (64, 72, 104, 128)  # pixels; latent sides 8, 9, 13, 16
SAMPLER_NODES = ("KSampler", "KSamplerAdvanced")
LATENT_NODES = ("EmptyLatentImage", "EmptySD3LatentImage")
PACK = sys.modules["patchlab"].NODE_CLASS_MAPPINGS
IDLE_PROMPT = {
    "1": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
    "2": {"class_type": "SaveLatent", "inputs": {"samples": ["1", 0], "filename_prefix": "soak_idle"}},
}


@pytest.fixture(scope="module")
def soak_server(tmp_path_factory):
    base = prepare_base_directory(tmp_path_factory.mktemp("comfyui_soak"), with_testkit=True)
    # --cache-none: every prompt runs every node, so each one really samples and patches.
    with ComfyServer(base, extra_args=["--cache-none"]) as running:
        yield running


def accepted(node_id, inputs):
    """Whether the node's own VALIDATE_INPUTS accepts these literal inputs (True without one)."""
    validate = getattr(PACK[node_id], "VALIDATE_INPUTS", None)
    if validate is None:
        return True
    names = inspect.signature(validate).parameters
    return validate(**{k: v for k, v in inputs.items() if k in names and not isinstance(v, list)}) is True


def moved_floats(node_id, inputs, info, rng):
    """The node's FLOAT widgets each moved within 20 %, clipped to their range; unchanged if not accepted."""
    floats = {}
    for group in ("required", "optional"):
        for name, spec in info["input"].get(group, {}).items():
            value = inputs.get(name)
            if spec[0] == "FLOAT" and isinstance(value, (int, float)) and not isinstance(value, bool):
                options = spec[1] if len(spec) > 1 else {}
                low, high = options.get("min", -1e9), options.get("max", 1e9)
                floats[name] = min(high, max(low, round(value * rng.uniform(0.8, 1.2), 4)))
    for _ in range(5):
        candidate = {**inputs, **floats}
        if accepted(node_id, candidate):
            return candidate
        floats = {name: value for name, value in floats.items() if rng.random() < 0.5}
    return inputs


def varied(prompt, object_info, rng):
    """A copy of an API prompt with seeded random valid changes, and a SaveLatent after every sampler."""
    prompt = copy.deepcopy(prompt)
    for node_id, node in list(prompt.items()):
        kind, inputs = node["class_type"], node["inputs"]
        if kind in SAMPLER_NODES:
            inputs["seed" if "seed" in inputs else "noise_seed"] = rng.randrange(2**32)
            inputs["sampler_name"] = rng.choice(SAMPLERS)
            inputs["steps"] = rng.randint(1, max(1, inputs["steps"]))
            prompt[f"soak_{node_id}"] = {"class_type": "SaveLatent",
                                         "inputs": {"samples": [node_id, 0], "filename_prefix": "soak"}}
        elif kind in LATENT_NODES:
            inputs["width"], inputs["height"] = rng.choice(SIDES), rng.choice(SIDES)
            inputs["batch_size"] = 2 if rng.random() < 0.15 else 1
        elif kind in PACK:
            node["inputs"] = moved_floats(kind, inputs, object_info[kind], rng)
    return prompt


def saved_latents(server, entry):
    """Every latent the prompt's SaveLatent nodes wrote, by node id."""
    found = {}
    for node_id, output in entry["outputs"].items():
        for index, item in enumerate(output.get("latents", [])):
            path = server.base / item.get("type", "output") / item.get("subfolder", "") / item["filename"]
            found[(node_id, index)] = safetensors.torch.load_file(str(path))["latent_tensor"]
    return found


def resident_mb(pid):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc status")


def settled_rss(server):
    """Resident memory after models are unloaded and ComfyUI's worker collected garbage."""
    server.post("/free", {"unload_models": True, "free_memory": True})
    for _ in range(2):  # the flags are acted on after the next prompt; the second one waits for that
        server.run(IDLE_PROMPT)
    return resident_mb(server.process.pid)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the server's memory from /proc")
def test_hundreds_of_varied_workflows_run_repeat_exactly_and_keep_memory_flat(soak_server):
    object_info = soak_server.object_info()
    bases = {path.stem: workflows.api_prompt_for(path, object_info, testkit=True)
             for path in workflows.example_paths()}
    rng = random.Random(12)
    started = time.monotonic()
    queued = 0
    rss = []  # settled server RSS after each cycle (MB)
    for cycle in range(CYCLES):
        ran = []
        for name in rng.sample(sorted(bases), len(bases)):
            prompt = varied(bases[name], object_info, rng)
            entry = soak_server.run(prompt, timeout=600)
            ran.append((name, prompt, saved_latents(soak_server, entry)))
            queued += 1
        sampled = [run for run in ran if run[2]]  # workflows that save a latent (not the schedule previews)
        for name, prompt, expected in rng.sample(sampled, RERUNS_PER_CYCLE):
            again = saved_latents(soak_server, soak_server.run(prompt, timeout=600))
            queued += 1
            assert again.keys() == expected.keys(), name
            for key, latent in expected.items():
                assert again[key].equal(latent), f"cycle {cycle}: {name} gave another latent when rerun"
        rss.append(settled_rss(soak_server))
        log.info("soak: cycle %d done, %d prompts, server RSS %.0f MB", cycle, queued, rss[-1])
    first_rss, last_rss = rss[0], rss[-1]
    log.info("soak: %d prompts in %.0f s; server RSS %.0f MB after the first cycle, %.0f MB after the last (%+.1f %%)",
             queued, time.monotonic() - started, first_rss, last_rss, 100 * (last_rss / first_rss - 1))
    assert soak_server.alive()
    if CYCLES * len(bases) >= MIN_PROMPTS:
        assert queued >= MIN_PROMPTS
    assert last_rss <= first_rss * (1 + RSS_GROWTH), (first_rss, last_rss)
