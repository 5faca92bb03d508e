"""Normalized Attention Guidance on SD3 / SD3.5 (MMDiT): joint attention over [text; image].

As on Flux (:mod:`.flux`, the stream of :mod:`.joint`), the negative prompt gets a text stream of
its own and never an image stream. MMDiT's joint blocks are split into a ``context_block`` (the text
side) and an ``x_block`` (the image side), each with ``pre_attention`` (modulation, norm, qkv, RMS
qk-norm) and ``post_attention`` (projection, MLP), so the negative's stream runs exactly the block's
own text code: its ``context_embedder`` embedding (with the network's registers in front where it
has them), then per block ``context_block.pre_attention`` -> q/k/v [R, T-, H*D], the joint attention
call's override (the image queries attend to [negative text keys; image keys] -> Z-; the negative
text queries to the same keys), ``context_block.post_attention``. The last block is ``pre_only`` on
the text side: there the stream ends. SD3.5 Medium's extra image self-attention (``attn2`` of the
first blocks) is the block's second attention call and is left alone.

Hook: a ``double_block`` replace on every joint block (ComfyUI's MMDiT offers it, chaining one
already there).
"""

from __future__ import annotations

from typing import Dict, Optional

import comfy.ops
import comfy.utils
import torch

from .. import block_forward
from .core import guided_replace, install_block_replaces
from .joint import STATE_TEXT, Negative, make_override, rows_of, stream


def network_text(base, negative: torch.Tensor, t: torch.Tensor, options: Dict,
                 mask: Optional[torch.Tensor]) -> torch.Tensor:
    """The negative prompt as MMDiT's first joint block reads its text [1, T-, C] (``context_embedder``, registers
    in front)."""
    net = base.diffusion_model
    if getattr(net, "context_embedder", None) is None:
        raise RuntimeError("PatchLab_NormalizedAttentionGuidance: this SD3-family model has no text input "
                           "(no context_embedder), so there is no negative prompt to guide with; remove the node")
    processor = getattr(net, "context_processor", None)
    if processor is not None:
        negative = processor(negative)
    text = net.context_embedder(negative)
    if getattr(net, "register_length", 0) > 0:
        registers = comfy.ops.cast_to_input(net.register, text).expand(text.shape[0], -1, -1)
        text = torch.cat((registers, text), dim=1)
    return text


def make_replace(index: int, previous=None):
    """The ``double_block`` replace of joint block ``index``: NAG in its joint attention, the negative stream
    advanced through the block's text side."""
    def guided(args, call, parts, run):
        if args.get("txt") is None:
            return run(args)
        text_side = call.network.joint_blocks[index].context_block
        text = stream(call, parts)
        qkv, intermediates = text_side.pre_attention(text, rows_of(args["vec"], parts))
        negative = Negative(*qkv)
        n_txt = args["txt"].shape[1]
        args = block_forward.with_override(
            args, lambda chained: make_override(chained, call, parts, negative, lambda n: (n_txt, n), token_dim=1))
        out = run(args)
        if negative.text_out is not None and not text_side.pre_only:
            call.state[STATE_TEXT] = text_side.post_attention(negative.text_out, *intermediates)
        return out

    return guided_replace(previous, guided)


def install(patched) -> None:
    """A NAG replace on every joint block (once; another replace there is chained)."""
    install_block_replaces(patched, "double_block", len(patched.model.diffusion_model.joint_blocks), make_replace)
