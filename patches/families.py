"""The DiT families PatchLab reaches, by network class: one table for every node that needs to know.

ComfyUI offers hooks per network class, not per checkpoint: a ``patches_replace["dit"]`` block
replace where the class's forward looks one up (``double_block`` / ``single_block`` by index, with
``transformer_options`` in its arguments), and nothing of the kind in others (Lumina 2's NextDiT in
0.3.75). Each row names a network (module prefix and class names, as ComfyUI 0.3.75 defines them)
and says

* ``stacks``: the blocks attention guidance (PAG, SEG, SLG) addresses, ``stack.N`` (empty: none);
* ``first_block``: whether StepCache's ``first block`` indicator reaches block 0 (the ``double_block``
  replace at index 0);
* ``nag``: the module of ``patches.nag`` that reaches the network's text attention (None: NAG refuses it);
* ``tested``: whether the test kit has a model of the class (messages list untested ones apart).

Adding a family is one row here (and a test-kit layout).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple


@dataclass(frozen=True)
class Stack:
    """One stack of blocks: the network attribute holding them, the ``patches_replace["dit"]`` name ComfyUI
    offers for them (None: the network has no block replace; PatchLab wraps the blocks' forward during its
    own extra passes), and where its attention finds text and image tokens:

    * ``joint``: the block gets both streams (``img``, ``txt``) and attends over their concatenation;
    * ``self``: the block gets the image stream and the cross-attention context; its first attention call
      is image self-attention (Wan), later ones read the text;
    * ``text_first`` / ``text_last``: one stream holding text and image (Flux and Lumina 2 single blocks put
      the text first, HunyuanVideo's last).
    """

    attr: str
    replace: Optional[str]
    tokens: str


@dataclass(frozen=True)
class Family:
    key: str                           # the token-layout family attention guidance uses
    label: str                         # shown in messages
    module: str                        # prefix of the network class's module
    classes: Tuple[str, ...]           # network class names
    stacks: Dict[str, Stack] = field(default_factory=dict)
    first_block: bool = False
    tested: bool = True
    rope: bool = True                  # positions enter every attention as a rotary embedding (not SD3, AuraFlow)
    nag: Optional[str] = None          # the patches.nag module for this network (None: no NAG)


_FLUX_STACKS = {"double": Stack("double_blocks", "double_block", "joint"),
                "single": Stack("single_blocks", "single_block", "text_first")}

FAMILIES = (
    Family("flux", "Flux, Flux.2", "comfy.ldm.flux.", ("Flux",), _FLUX_STACKS, first_block=True, nag="flux"),
    Family("flux", "Chroma", "comfy.ldm.chroma.", ("Chroma",), _FLUX_STACKS, first_block=True, nag="flux"),
    Family("mmdit", "SD3/SD3.5", "comfy.ldm.modules.diffusionmodules.mmdit", ("OpenAISignatureMMDITWrapper",),
           {"joint": Stack("joint_blocks", "double_block", "joint")}, first_block=True, rope=False, nag="mmdit"),
    Family("qwen_image", "Qwen-Image", "comfy.ldm.qwen_image.", ("QwenImageTransformer2DModel",),
           {"double": Stack("transformer_blocks", "double_block", "joint")}, first_block=True, nag="qwen"),
    Family("wan", "Wan 2.1/2.2", "comfy.ldm.wan.", ("WanModel",),
           {"double": Stack("blocks", "double_block", "self")}, first_block=True, nag="wan"),
    Family("wan", "Wan VACE / camera / HuMo", "comfy.ldm.wan.", ("VaceWanModel", "CameraWanModel", "HumoWanModel"),
           {"double": Stack("blocks", "double_block", "self")}, first_block=True, tested=False, nag="wan"),
    Family("hunyuan_video", "HunyuanVideo", "comfy.ldm.hunyuan_video.", ("HunyuanVideo",),
           {"double": Stack("double_blocks", "double_block", "joint"),
            "single": Stack("single_blocks", "single_block", "text_last")}, first_block=True, nag="flux"),
    Family("lumina2", "Z-Image, Lumina 2", "comfy.ldm.lumina.", ("NextDiT",),
           {"single": Stack("layers", None, "text_first")}, nag="lumina"),
    Family("auraflow", "AuraFlow", "comfy.ldm.aura.", ("MMDiT",), first_block=True, rope=False),
    Family("ltxv", "LTX-Video", "comfy.ldm.lightricks.", ("LTXVModel",), first_block=True, tested=False),
    Family("mochi", "Mochi", "comfy.ldm.genmo.", ("AsymmDiTJoint",), first_block=True, tested=False),
)


def of_network(net) -> Optional[Family]:
    """The family row of a diffusion network (None: a network no row names, UNets included)."""
    module, name = type(net).__module__, type(net).__name__
    for family in FAMILIES:
        if module.startswith(family.module) and name in family.classes:
            return family
    return None


def of_model(model) -> Optional[Family]:
    """The family row of a ModelPatcher's network."""
    return of_network(model.model.diffusion_model)


def labels(predicate, tested: bool = True) -> str:
    """The labels of the (tested or untested) families for which ``predicate(family)`` holds, in table order."""
    chosen = []
    for family in FAMILIES:
        if predicate(family) and family.tested == tested and family.label not in chosen:
            chosen.append(family.label)
    return ", ".join(chosen)
