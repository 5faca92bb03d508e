"""NAG on Wan 2.1 / 2.2 (text- and image-to-video): a block replace and the attention override it installs.

A ``double_block`` replace on every block installs, for that block call, an
``optimized_attention_override`` that acts in the attention call that reads the text (K- and V-
through the block's ``cross_attn.k`` / ``norm_k`` / ``v``): the second, or in image-to-video the
third (its cross-attention first attends to the CLIP vision tokens, left as is).
"""

from __future__ import annotations

from typing import Dict, List, Optional

import comfy.utils
import torch

from .. import block_forward
from .core import MARK, NODE_ID, NagCall, guide_rows, guided_replace, install_block_replaces

# Wan cross-attention classes -> which attention call of a Wan block reads the text: self-attention is the first;
# image-to-video's cross-attention attends to the CLIP vision tokens (second) before the text (third).
CROSS_ATTENTIONS = {"WanT2VCrossAttention": 2, "WanI2VCrossAttention": 3}


def network_text(base, negative: torch.Tensor, t: torch.Tensor, options: Dict,
                 mask: Optional[torch.Tensor]) -> torch.Tensor:
    """The negative as Wan's cross-attention reads it: the network's ``text_embedding`` of it."""
    return base.diffusion_model.text_embedding(negative)


def make_override(previous, cross_attn, call: NagCall, parts: List[slice]):
    """An ``optimized_attention_override`` for one Wan block call: guides the attention call that reads the text
    (the second, or the third after image-to-video's CLIP vision tokens) in ``parts``; every other call goes on to
    ``previous`` (or the attention itself)."""
    seen = [0]
    text_call = CROSS_ATTENTIONS[type(cross_attn).__name__]

    def override(func, *args, **kwargs):
        out = block_forward.attend(previous, func, *args, **kwargs)
        seen[0] += 1
        if seen[0] != text_call:
            return out
        q = args[0]
        k_neg = comfy.utils.repeat_to_batch_size(cross_attn.norm_k(cross_attn.k(call.context)), q.shape[0])
        v_neg = comfy.utils.repeat_to_batch_size(cross_attn.v(call.context), q.shape[0])
        out = out.clone()
        for part in parts:
            guide_rows(out, func(q[part], k_neg[part], v_neg[part], *args[3:], **kwargs), part, call.spec)
        return out

    setattr(override, MARK, True)
    return override


def make_replace(index: int, previous=None):
    """The ``double_block`` replace PatchLab's NAG puts at Wan block ``index`` (chaining ``previous``)."""
    def guided(args, call, parts, run):
        cross_attn = call.network.blocks[index].cross_attn
        args = block_forward.with_override(
            args, lambda chained: make_override(chained, cross_attn, call, parts))
        return run(args)

    return guided_replace(previous, guided)


def install(patched) -> None:
    """A NAG replace on every block (once; another replace there is chained); a clear error for a Wan variant
    whose cross-attention NAG does not know."""
    blocks = patched.model.diffusion_model.blocks
    kinds = {type(block.cross_attn).__name__ for block in blocks}
    if not kinds <= set(CROSS_ATTENTIONS):
        raise RuntimeError(f"{NODE_ID} supports Wan's text-to-video and image-to-video cross-attention; this Wan "
                           f"model's is {', '.join(sorted(kinds))}. Remove the node for this model.")
    install_block_replaces(patched, "double_block", len(blocks), make_replace)
