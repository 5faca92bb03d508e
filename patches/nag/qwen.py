"""Normalized Attention Guidance on Qwen-Image: double-stream blocks, joint attention over [text; image].

As on Flux (:mod:`.flux`, the stream of :mod:`.joint`), the negative prompt gets a text stream of
its own and never an image stream. Qwen-Image has double-stream blocks only; per block the
negative's stream runs the block's text side: ``txt_mod`` modulation of ``txt_norm1``,
``attn.add_q/k/v_proj``, the added q/k RMS norms, the rotary embedding of its own text positions
(Qwen-Image numbers the text from an offset set by the latent's size, the same for the negative),
then the joint attention call's override (the image queries attend to [negative text keys; image
keys] -> Z-, the negative text queries to the same keys), ``attn.to_add_out``, the gated residual,
``txt_norm2`` / ``txt_mlp``. Reference latents of Qwen-Image-Edit count as image tokens (they are
guided too). The text attention mask of newer ComfyUI is not applied to the negative (its tokens are
all attended).

Hook: a ``double_block`` replace on every transformer block (chaining one already there).
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
from comfy.ldm.flux.math import apply_rope1

from .. import block_forward
from .core import guided_replace, install_block_replaces
from .joint import STATE_PE, STATE_TEXT, Negative, make_override, rows_of, stream


def network_text(base, negative: torch.Tensor, t: torch.Tensor, options: Dict,
                 mask: Optional[torch.Tensor]) -> torch.Tensor:
    """The negative prompt in Qwen-Image's text-stream space [1, T-, C] (``txt_norm``, ``txt_in``)."""
    net = base.diffusion_model
    return net.txt_in(net.txt_norm(negative))


def text_rope(net, tokens: int, latent_shape, dtype, device) -> torch.Tensor:
    """The rotary embedding of ``tokens`` text positions as Qwen-Image's forward numbers them: from half the larger
    side of the patch grid of ``latent_shape`` on, the same on all three axes."""
    patch = net.patch_size
    start = round(max(((latent_shape[-1] + patch // 2) // patch) // 2, ((latent_shape[-2] + patch // 2) // patch) // 2))
    ids = torch.arange(start, start + tokens, device=device).reshape(1, -1, 1).repeat(1, 1, 3)
    return net.pe_embedder(ids).to(dtype).contiguous()


def _heads(linear, x: torch.Tensor, heads: int) -> torch.Tensor:
    return linear(x).view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)


def make_replace(index: int, previous=None):
    """The ``double_block`` replace of block ``index``: NAG in its joint attention, the negative stream advanced
    through the block's text side."""
    def guided(args, call, parts, run):
        block = call.network.transformer_blocks[index]
        attn = block.attn
        dtype = args["img"].dtype
        text = stream(call, parts, lambda tokens, device: text_rope(call.network, tokens, call.latent_shape, dtype,
                                                                     device))
        vec = args["vec"]
        if vec.shape[0] == 2 * args["img"].shape[0]:  # newer Qwen-Image-Edit: the text takes the first half
            vec = vec[:args["img"].shape[0]]
        mod1, mod2 = block.txt_mod(rows_of(vec, parts)).chunk(2, dim=-1)
        modulated, gate1 = block._modulate(block.txt_norm1(text), mod1)
        q = apply_rope1(attn.norm_added_q(_heads(attn.add_q_proj, modulated, attn.heads)), call.state[STATE_PE])
        k = apply_rope1(attn.norm_added_k(_heads(attn.add_k_proj, modulated, attn.heads)), call.state[STATE_PE])
        negative = Negative(q, k, _heads(attn.add_v_proj, modulated, attn.heads))
        n_txt = args["txt"].shape[1]
        args = block_forward.with_override(
            args, lambda chained: make_override(chained, call, parts, negative, lambda n: (n_txt, n)))
        out = run(args)
        if negative.text_out is not None:
            text = text + gate1 * attn.to_add_out(negative.text_out)
            modulated, gate2 = block._modulate(block.txt_norm2(text), mod2)
            call.state[STATE_TEXT] = torch.addcmul(text, gate2, block.txt_mlp(modulated))
        return out

    return guided_replace(previous, guided)


def install(patched) -> None:
    """A NAG replace on every transformer block (once; another replace there is chained)."""
    install_block_replaces(patched, "double_block", len(patched.model.diffusion_model.transformer_blocks),
                           make_replace)
