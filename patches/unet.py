"""A UNet's anatomy, the one place that knows it: how to recognise one, its transformers as ComfyUI
addresses them, and the resolution levels they work at.

ComfyUI's UNet (``openaimodel.UNetModel``: SD1.x, SD2.x, SDXL) runs input blocks, a middle block
and output blocks; each block is a list of layers. A ``SpatialTransformer`` layer holds
``transformer_blocks``, each a ``BasicTransformerBlock`` with ``attn1`` (self-attention) and
``attn2`` (cross-attention). ComfyUI addresses a transformer as ``(stage, block id, transformer
index)``: the key of attn1/attn2 replaces, and ``extra_options["block"]`` plus
``extra_options["block_index"]`` inside a hook. The middle block is ``("middle", 0, i)``.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Set, Tuple

import torch
from comfy.ldm.modules.attention import optimized_attention
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

Key = Tuple[str, int, int]
STAGES = ("input", "middle", "output")


def is_unet(model) -> bool:
    """Whether ``model`` (a ModelPatcher, or a network) is one of ComfyUI's UNets."""
    net = model.model.diffusion_model if hasattr(model, "model") else model
    return isinstance(net, UNetModel)


def stages(net) -> List[Tuple[str, list]]:
    """(stage, its blocks) in the order the UNet runs them."""
    middle = [net.middle_block] if net.middle_block is not None else []
    return [("input", list(net.input_blocks)), ("middle", middle), ("output", list(net.output_blocks))]


def transformers(model) -> Dict[Key, torch.nn.Module]:
    """Every transformer block (``BasicTransformerBlock``) of a model's UNet by its key, in running order; empty
    for a non-UNet."""
    net = model.model.diffusion_model
    if not is_unet(net):
        return {}
    found = {}
    for stage, blocks in stages(net):
        for block_id, block in enumerate(blocks):
            for layer in block:
                for index, transformer in enumerate(getattr(layer, "transformer_blocks", ())):
                    found[(stage, block_id, index)] = transformer
    return found


def transformer_keys(model) -> List[Key]:
    """Every transformer's key (stage, block id, transformer index), in running order; empty for a non-UNet."""
    return list(transformers(model))


def transformer_block(net, key: Key) -> Optional[torch.nn.Module]:
    """The transformer block at ``key`` (None if there is none)."""
    stage, block_id, index = key
    blocks = net.middle_block if stage == "middle" else getattr(net, f"{stage}_blocks")[block_id]
    for layer in blocks:
        found = getattr(layer, "transformer_blocks", None)
        if found is not None and index < len(found):
            return found[index]
    return None


def key_of(extra_options: Dict) -> Key:
    """The key of the transformer an attention hook is called in (``("", 0, 0)`` outside a UNet block)."""
    block = extra_options.get("block") or ("", 0)
    return (block[0], block[1], extra_options.get("block_index", 0))


def attend(q, k, v, extra: Dict, previous=None):
    """The attention of an attn1/attn2 replace: through ``previous`` (a replace another pack put at that key,
    chained) or ComfyUI's own."""
    if previous is not None:
        return previous(q, k, v, extra)
    return optimized_attention(q, k, v, extra["n_heads"], attn_precision=extra.get("attn_precision"))


def existing_replace(model_options: Dict, attention: str, key: Key):
    """The ``attention`` (attn1 / attn2) replace ComfyUI would call at ``key``: the one at the full key, else
    the one at ``(stage, block id)`` (the full key shadows it, so a replace of ours there chains it)."""
    replaces = model_options.get("transformer_options", {}).get("patches_replace", {}).get(attention, {})
    return replaces.get(key, replaces.get(key[:2]))


def transformer_levels(model) -> Set[int]:
    """Downsampling levels (0 = full resolution) that hold a transformer; empty for a non-UNet."""
    net = model.model.diffusion_model
    if not is_unet(net):
        return set()
    levels, level = set(), 0
    for block in net.input_blocks:
        for layer in block:
            if type(layer).__name__ == "Downsample":
                level += 1
            elif hasattr(layer, "transformer_blocks"):
                levels.add(level)
    if any(hasattr(layer, "transformer_blocks") for layer in net.middle_block or ()):
        levels.add(level)
    for block in net.output_blocks:
        for layer in block:
            if hasattr(layer, "transformer_blocks"):
                levels.add(level)
            elif type(layer).__name__ == "Upsample":
                level -= 1
    return levels
