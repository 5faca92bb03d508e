"""Workflow files: read the editor (UI) format, convert it to the API format, adapt it to the test kit.

* ``devtools/examples/builder.py``'s ``Builder`` writes UI-format workflows (what the graph
  editor saves and loads) from a few lines of Python, with this module's object-info helpers.
* :func:`ui_to_api` converts a UI workflow to the API prompt ``POST /prompt`` takes,
  using ``/object_info`` (or the same information built in-process) to map widget
  values onto input names, as the editor does.
* :func:`use_testkit` swaps checkpoint, text-encoder and VAE nodes for the test kit's
  tiny stand-ins and shrinks the image size and step count, so a workflow written for
  real models runs in seconds on a CPU.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

EXAMPLE_DIR = Path(__file__).resolve().parent.parent / "example_workflows"

WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
FRONTEND_ONLY = ("Note", "MarkdownNote")

# Core node -> the test-kit node that stands in for it (same input names, same outputs).
TESTKIT_REPLACES = {
    "CheckpointLoaderSimple": "PatchLabTest_TinyCheckpoint",
    "CLIPTextEncode": "PatchLabTest_TinyTextEncode",
    "VAEDecode": "PatchLabTest_TinyVAEDecode",
    "VAEEncode": "PatchLabTest_TinyVAEEncode",
    "ControlNetLoader": "PatchLabTest_TinyControlNet",
    "UNETLoader": "PatchLabTest_TinyDiffusionModel",
    "CLIPLoader": "PatchLabTest_TinyTextEncoder",
    "VAELoader": "PatchLabTest_TinyVAELoader",
}
# CLIPLoader's type -> the tiny layout whose text encoder stands in for it.
CLIP_TYPE_LAYOUTS = {"wan": "wan21", "lumina2": "zimage", "hunyuan_video": "hunyuan_video", "qwen_image": "qwen_image"}

# Checkpoint names the example workflows use -> tiny layout standing in for them.
CHECKPOINT_LAYOUTS = {
    "v1-5-pruned-emaonly.safetensors": "sd15",
    "sd_xl_base_1.0.safetensors": "sdxl",
    "flux1-dev-fp8.safetensors": "flux",
    "sd3.5_medium_incl_clips_t5xxlfp8scaled.safetensors": "sd3",
    "playground-v2.5-1024px-aesthetic.fp16.safetensors": "sdxl",
}

# Nodes whose tensor size or cost the test kit shrinks: class -> inputs to cap.
SIZE_INPUTS = {"EmptyLatentImage": ("width", "height"), "EmptySD3LatentImage": ("width", "height"),
               "EmptyHunyuanLatentVideo": ("width", "height"), "Wan22ImageToVideoLatent": ("width", "height")}
LENGTH_INPUTS = {"EmptyHunyuanLatentVideo": "length", "Wan22ImageToVideoLatent": "length"}  # frames, capped at 9
STEP_INPUTS = {"KSampler": ("steps",), "KSamplerAdvanced": ("steps",)}


# --- object info -------------------------------------------------------------

def node_info(node_class: type) -> Dict[str, Any]:
    """The ``/object_info`` entry of a node class (V1 or V3), built in-process."""
    if hasattr(node_class, "GET_NODE_INFO_V1"):
        return node_class.GET_NODE_INFO_V1()
    inputs = node_class.INPUT_TYPES()
    return {
        "input": inputs,
        "input_order": {key: list(value) for key, value in inputs.items()},
        "output": list(node_class.RETURN_TYPES),
        "output_name": list(getattr(node_class, "RETURN_NAMES", node_class.RETURN_TYPES)),
    }


def input_spec(info: Dict, name: str) -> Tuple[Any, Dict]:
    for group in ("required", "optional"):
        spec = info["input"].get(group, {}).get(name)
        if spec is not None:
            return spec[0], (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
    raise KeyError(name)


def ordered_inputs(info: Dict) -> List[str]:
    order = info.get("input_order") or {k: list(v) for k, v in info["input"].items()}
    return list(order.get("required", [])) + list(order.get("optional", []))


def is_widget(kind: Any, options: Dict) -> bool:
    return (isinstance(kind, list) or kind in WIDGET_TYPES) and not options.get("forceInput", False)


def extra_widget_values(name: str, kind: Any, options: Dict) -> int:
    """Widgets the editor adds after an input (seed's control_after_generate, image upload)."""
    if kind == "INT" and (options.get("control_after_generate") or name in ("seed", "noise_seed")):
        return 1
    if options.get("image_upload"):
        return 1
    return 0


# --- UI -> API ---------------------------------------------------------------

def ui_to_api(workflow: Dict, object_info: Dict) -> Dict[str, Dict]:
    """Convert an editor workflow to an API prompt ``{id: {"class_type", "inputs"}}``."""
    links = {link[0]: (str(link[1]), link[2]) for link in workflow.get("links", [])}
    prompt = {}
    for node in workflow["nodes"]:
        kind = node["type"]
        if kind in FRONTEND_ONLY or node.get("mode", 0) == 2:
            continue
        if node.get("mode", 0) == 4:
            raise ValueError(f"node {node['id']} ({kind}) is bypassed; bypass is not supported here")
        if kind not in object_info:
            raise ValueError(f"node {node['id']}: type {kind!r} is not known to this ComfyUI")
        info = object_info[kind]
        linked = {slot["name"]: slot.get("link") for slot in node.get("inputs", [])}
        values = list(node.get("widgets_values") or [])
        inputs: Dict[str, Any] = {}
        for name in ordered_inputs(info):
            input_kind, options = input_spec(info, name)
            if is_widget(input_kind, options):
                if values:
                    inputs[name] = values.pop(0)
                del values[:extra_widget_values(name, input_kind, options)]
            link = linked.get(name)
            if link is not None:
                inputs[name] = list(links[link])
        prompt[str(node["id"])] = {"class_type": kind, "inputs": inputs}
    return prompt


def load(path: Path) -> Dict:
    return json.loads(Path(path).read_text())


def example_paths() -> List[Path]:
    return sorted(EXAMPLE_DIR.glob("*.json"))


# --- test kit ----------------------------------------------------------------

def layout_for_checkpoint(name: str) -> str:
    if name in CHECKPOINT_LAYOUTS:
        return CHECKPOINT_LAYOUTS[name]
    lowered = name.lower()
    if "sd3" in lowered:
        return "sd3"
    if "lumina" in lowered:
        return "lumina2"
    if "z_image" in lowered or "zimage" in lowered:
        return "zimage"
    if "wan2.2_ti2v" in lowered or "wan2.2_vae" in lowered:
        return "wan22"  # Wan 2.2 5B and its 48-channel VAE (the 14B experts are Wan 2.1 networks)
    if "wan" in lowered:
        return "wan21"
    if "hunyuan" in lowered:
        return "hunyuan_video"
    if lowered == "ae.safetensors":
        return "zimage"  # the Flux VAE, which Z-Image uses
    if "qwen" in lowered:
        return "qwen_image"
    if any(key in lowered for key in ("flux", "aura")):
        return "flux"
    return "sdxl" if "xl" in lowered else "sd15"


# Layout -> the trained reference model that stands in for its checkpoints where the demo asks for pictures.
TRAINED_LAYOUTS = {"sd15": "sd15_shapes", "flux": "flux_shapes"}
# Diffusion-model file name part (UNETLoader) -> the trained video model that stands in for it, once its weights
# are committed (the Wan 2.2 14B experts have Wan 2.1's layout but come in pairs: they stay on random weights).
TRAINED_DIFFUSION_MODELS = {"wan2.1_t2v": "wan_shapes"}
TRAINED_WEIGHTS = Path(__file__).resolve().parent / "testkit" / "shapes" / "weights"
SHAPES_PROMPT = "red circle"
CLIP_SHAPES_PROMPT = "red circle moving right"
SHAPES_PROMPTS = {"sd15_shapes": SHAPES_PROMPT, "flux_shapes": SHAPES_PROMPT, "wan_shapes": CLIP_SHAPES_PROMPT}
# The clip the video model was trained on: EmptyHunyuanLatentVideo's inputs for 4 latent frames of 16x16.
SHAPES_VIDEO_LATENTS = {"wan_shapes": {"width": 128, "height": 128, "length": 13}}


def trained_stand_in(kind: str, file_name: str) -> Optional[str]:
    """The trained reference model the demo loads in place of ``file_name`` in a loader of ``kind``
    (CheckpointLoaderSimple or UNETLoader), or None where random weights stand in."""
    if kind == "CheckpointLoaderSimple":
        return TRAINED_LAYOUTS.get(layout_for_checkpoint(file_name))
    for part, name in TRAINED_DIFFUSION_MODELS.items() if kind == "UNETLoader" else ():
        if part in file_name.lower() and (TRAINED_WEIGHTS / f"{name}.safetensors").is_file():
            return name
    return None


def use_testkit(prompt: Dict, max_side: int = 128, max_steps: int = 3, trained: bool = False) -> Dict:
    """A copy of an API prompt running on the test kit's tiny models.

    Checkpoint, text-encoder and VAE nodes become their tiny stand-ins (the
    checkpoint's layout chosen from its file name); image sizes are scaled down to at
    most ``max_side`` pixels (multiples of 16), video lengths capped at 9 frames and
    KSampler steps at ``max_steps``. With ``trained``, SD1.5 and Flux checkpoints become
    the trained reference models and Wan 2.1 text-to-video diffusion models ``wan_shapes``
    once it is trained (``trained_stand_in``), with the text encoder and VAE that serve
    them; their samplers run 20 steps with the positive prompt ``SHAPES_PROMPTS[model]``
    and an empty negative, so the pictures show a shape (the video model: moving, in the
    128x128 px, 13-frame clip it was trained on).
    """
    prompt = copy.deepcopy(prompt)
    stand_ins = {}  # loader node id -> the trained model it loads
    for node_id, node in prompt.items() if trained else ():
        name = node["inputs"].get("ckpt_name", node["inputs"].get("unet_name"))
        if isinstance(name, str) and trained_stand_in(node["class_type"], name):
            stand_ins[node_id] = trained_stand_in(node["class_type"], name)
    if stand_ins:
        _ask_for_shapes(prompt, stand_ins)
    for node_id, node in prompt.items():
        kind = node["class_type"]
        inputs = node["inputs"]
        stand_in = stand_ins.get(node_id) or node.pop("_trained", None)
        if kind == "CheckpointLoaderSimple":
            node["inputs"] = {"layout": stand_in or layout_for_checkpoint(inputs["ckpt_name"]), "seed": 0}
        if kind == "UNETLoader":
            name = inputs["unet_name"]
            seed = 1 if "low_noise" in name else 0
            node["inputs"] = {"layout": stand_in or layout_for_checkpoint(name), "seed": seed}
        if kind == "CLIPLoader":
            node["inputs"] = {"layout": stand_in or CLIP_TYPE_LAYOUTS.get(inputs.get("type"), "sd15")}
        if kind == "VAELoader":
            node["inputs"] = {"layout": stand_in or layout_for_checkpoint(inputs["vae_name"])}
        if kind in TESTKIT_REPLACES:
            node["class_type"] = TESTKIT_REPLACES[kind]
        if "_shapes_latent" in node:
            inputs.update(node.pop("_shapes_latent"))
        else:
            _shrink(kind, inputs, max_side)
        shapes = node.pop("_shapes_steps", False)
        for name in STEP_INPUTS.get(kind, ()):
            if isinstance(inputs.get(name), int):
                before = inputs[name]
                inputs[name] = 20 if shapes else min(inputs[name], max_steps)
                _scale_step_range(inputs, before, inputs[name])
    return prompt


def _shrink(kind: str, inputs: Dict, max_side: int) -> None:
    """A latent node's size scaled down to at most ``max_side`` pixels (multiples of 16), its length to 9 frames."""
    if kind in LENGTH_INPUTS and isinstance(inputs.get(LENGTH_INPUTS[kind]), int):
        inputs[LENGTH_INPUTS[kind]] = min(inputs[LENGTH_INPUTS[kind]], 9)
    if kind in SIZE_INPUTS and all(isinstance(inputs.get(k), int) for k in SIZE_INPUTS[kind]):
        width, height = inputs["width"], inputs["height"]
        scale = min(1.0, max_side / max(width, height))
        inputs["width"] = max(16, int(width * scale) // 16 * 16)
        inputs["height"] = max(16, int(height * scale) // 16 * 16)


def _scale_step_range(inputs: Dict, before: int, after: int) -> None:
    """KSamplerAdvanced's start/end steps follow a change of its steps (Wan 2.2's expert switch stays halfway)."""
    for name in ("start_at_step", "end_at_step"):
        value = inputs.get(name)
        if isinstance(value, int) and before and value < before:
            inputs[name] = round(value * after / before)


def _upstream(prompt: Dict, node_id: str) -> set:
    """Every node the node ``node_id`` depends on, itself included."""
    seen, todo = set(), [node_id]
    while todo:
        current = todo.pop()
        if current in seen or current not in prompt:
            continue
        seen.add(current)
        todo += [v[0] for v in prompt[current]["inputs"].values() if isinstance(v, list) and len(v) == 2]
    return seen


def _ask_for_shapes(prompt: Dict, stand_ins: Dict[str, str]) -> None:
    """Samplers fed by a loader of ``stand_ins`` (node id -> trained model): the trained model's shapes prompt,
    an empty negative, 20 steps; the text encoders and VAEs serving them load that model's, the video model's
    latent is its clip (markers that ``use_testkit`` reads)."""
    samplers = {}  # sampler node id -> the trained model it samples
    for node_id, node in prompt.items():
        inputs = node["inputs"]
        if not {"positive", "negative"} <= set(inputs):
            continue
        feeding = [stand_ins[i] for i in _upstream(prompt, str(inputs.get("model", [""])[0])) if i in stand_ins]
        if not feeding:
            continue
        samplers[node_id] = model = feeding[0]
        for role, text in (("positive", SHAPES_PROMPTS[model]), ("negative", ""), ("latent_image", None)):
            for source in _upstream(prompt, str(inputs.get(role, [""])[0])):
                _serve(prompt[source], model, text)
        node["_shapes_steps"] = True
    for node in prompt.values():  # the VAEs decoding what those samplers made
        if node["class_type"] == "VAEDecode":
            made = _upstream(prompt, str(node["inputs"]["samples"][0])) & set(samplers)
            for source in _upstream(prompt, str(node["inputs"]["vae"][0])) if made else ():
                _serve(prompt[source], samplers[min(made)], None)


def _serve(node: Dict, model: str, text: Optional[str]) -> None:
    """A node upstream of a sampler (or a decoder) of the trained ``model``: ``text`` for its text encodes, its
    model's files for its text-encoder and VAE loaders, the clip it was trained on for a video latent."""
    kind = node["class_type"]
    if kind == "CLIPTextEncode" and text is not None:
        node["inputs"]["text"] = text
    elif kind in ("CLIPLoader", "VAELoader"):
        node["_trained"] = model
    elif kind == "EmptyHunyuanLatentVideo" and model in SHAPES_VIDEO_LATENTS:
        node["_shapes_latent"] = SHAPES_VIDEO_LATENTS[model]


def use_checkpoint(prompt: Dict, ckpt_name: str) -> Dict:
    """A copy of an API prompt with every CheckpointLoaderSimple loading ``ckpt_name``."""
    prompt = copy.deepcopy(prompt)
    for node in prompt.values():
        if node["class_type"] == "CheckpointLoaderSimple":
            node["inputs"]["ckpt_name"] = ckpt_name
    return prompt


def missing_choices(prompt: Dict, object_info: Dict) -> List[str]:
    """Combo values of an API prompt the server does not offer (a model file or input image that is not there)."""
    missing = []
    for node in prompt.values():
        info = object_info.get(node["class_type"])
        if info is None:
            continue
        for name, value in node["inputs"].items():
            try:
                kind, options = input_spec(info, name)
            except KeyError:
                continue
            choices = kind if isinstance(kind, list) else options.get("options") if kind == "COMBO" else None
            if choices is not None and isinstance(value, str) and value not in choices:
                missing.append(f"{node['class_type']}.{name} = {value!r}")
    return missing


def bypass(prompt: Dict, node_id: str, through: str = "model") -> Dict:
    """A copy of an API prompt without ``node_id``: whatever used its first output gets its ``through`` input."""
    prompt = copy.deepcopy(prompt)
    source = prompt.pop(node_id)["inputs"][through]
    for node in prompt.values():
        for name, value in node["inputs"].items():
            if isinstance(value, list) and len(value) == 2 and value[0] == node_id and value[1] == 0:
                node["inputs"][name] = list(source)
    return prompt


def write(path: Path, workflow: Dict) -> None:
    Path(path).write_text(json.dumps(workflow, indent=2) + "\n")


def api_prompt_for(path: Path, object_info: Dict, testkit: bool = True) -> Optional[Dict]:
    """The API prompt of an example workflow file, adapted to the test kit if asked."""
    prompt = ui_to_api(load(path), object_info)
    return use_testkit(prompt) if testkit else prompt


class LocalObjectInfo(dict):
    """``/object_info`` built in-process on demand, from ComfyUI's registry and PatchLab's nodes.

    Needs ``bootstrap.import_comfyui()``, ``load_core_nodes()`` and ``load_pack()`` first.
    """

    def __missing__(self, kind: str) -> Dict:
        import sys

        import nodes

        from . import bootstrap

        pack = sys.modules[bootstrap.PACK_NAME]
        classes = {**nodes.NODE_CLASS_MAPPINGS, **pack.NODE_CLASS_MAPPINGS}
        if kind not in classes:
            raise KeyError(f"no node type {kind!r} in this ComfyUI or PatchLab")
        self[kind] = node_info(classes[kind])
        return self[kind]

    def __contains__(self, kind) -> bool:
        try:
            self[kind]
        except KeyError:
            return False
        return True

    def get(self, kind, default=None):
        return self[kind] if kind in self else default
