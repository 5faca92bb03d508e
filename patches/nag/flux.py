"""NAG on Flux-layout DiTs (Flux.1, Flux.2, Chroma, HunyuanVideo): the negative's text stream (:mod:`.joint`)
through the double and single blocks.

Hooks: a ``double_block`` / ``single_block`` replace on every block (chaining one already there)
computes the negative's q/k/v before the block and installs an ``optimized_attention_override``
for the block's one attention call; after the block, it advances the negative text stream.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import comfy.utils
import torch
from comfy.ldm.flux.math import apply_rope

from .. import block_forward
from .core import cond_parts, guided_replace, install_block_replaces
from .joint import STATE_PE, STATE_TEXT, Negative, make_override, rows_of, stream

STATE_TEXT_TOKENS = "tokens"   # the positive prompt's text length (Flux single blocks: [text; image])
STATE_IMAGE_TOKENS = "image"   # the image stream's length (HunyuanVideo single blocks: [image; text])
STATE_TEXT_LAST = "text_last"  # whether the double blocks put the text last (HunyuanVideo)


def network_text(base, negative: torch.Tensor, t: torch.Tensor, options: Dict,
                 mask: Optional[torch.Tensor]) -> torch.Tensor:
    """The negative prompt in the network's text-stream space [R, T-, C] (``txt_in``; HunyuanVideo's token refiner
    reads each row's timestep, so it gets one row per positive row of the call, and the negative's text mask, an
    additive bias [1, T-])."""
    net = base.diffusion_model
    if type(net).__module__.startswith("comfy.ldm.hunyuan_video"):
        parts = cond_parts(options.get("cond_or_uncond", []), t.shape[0])
        if not parts:
            return negative
        rows = sum(part.stop - part.start for part in parts)
        repeated = comfy.utils.repeat_to_batch_size(negative, rows)
        timesteps = base.model_sampling.timestep(rows_of(t, parts)).float()
        rows_mask = comfy.utils.repeat_to_batch_size(mask, rows) if mask is not None else None
        text = net.txt_in(repeated, timesteps, rows_mask, transformer_options=options)
        embed = getattr(net, "cond_type_embedding", None)
        if embed is not None:
            text = text + embed(torch.zeros_like(text[:, :, 0], dtype=torch.long)).to(text.dtype)
        return text
    return net.txt_in(negative)


def text_rope(net, tokens: int, device) -> torch.Tensor:
    """The rotary embedding of ``tokens`` text positions as the network's forward builds them (zeros; Flux.2 counts
    positions on its fourth axis)."""
    axes = len(net.params.axes_dim)
    ids = torch.zeros((1, tokens, axes), device=device, dtype=torch.float32)
    if axes == 4:
        ids[:, :, 3] = torch.linspace(0, tokens - 1, steps=tokens, device=device, dtype=torch.float32)
    return net.pe_embedder(ids)


def _heads(qkv: torch.Tensor, heads: int):
    q, k, v = qkv.view(qkv.shape[0], qkv.shape[1], 3, heads, -1).permute(2, 0, 3, 1, 4)
    return q, k, v


def _mod_rows(mod, parts: List[slice]):
    """A ModulationOut whose tensors are cut to the rows of ``parts`` (rows of 1 broadcast)."""
    fields = {}
    for name in ("shift", "scale", "gate"):
        t = getattr(mod, name)
        fields[name] = t if t.shape[0] == 1 else rows_of(t, parts)
    return type(mod)(**fields)


def _apply(tensor, mult, add=None):
    return torch.addcmul(add, tensor, mult) if add is not None else tensor * mult


def _double_text_mods(block, vec):
    txt_mod = getattr(block, "txt_mod", None)
    if getattr(block, "modulation", False) and txt_mod is not None:
        return txt_mod(vec)
    return vec[1]


def _single_mod(block, vec):
    modulation = getattr(block, "modulation", None)
    if isinstance(modulation, torch.nn.Module):
        return modulation(vec)[0]
    return vec


def _flux_rope(call):
    return lambda tokens, device: text_rope(call.network, tokens, device)


def make_double_replace(index: int, previous=None):
    """The ``double_block`` replace of Flux block ``index``: NAG in its joint attention, the negative stream
    advanced."""
    def guided(args, call, parts, run):
        block = call.network.double_blocks[index]
        text = stream(call, parts, _flux_rope(call))
        mod1, mod2 = (_mod_rows(m, parts) for m in _double_text_mods(block, args["vec"]))
        modulated = _apply(block.txt_norm1(text), 1 + mod1.scale, mod1.shift)
        q, k, v = _heads(block.txt_attn.qkv(modulated), block.num_heads)
        q, k = block.txt_attn.norm(q, k, v)
        q, k = apply_rope(q, k, call.state[STATE_PE])
        negative = Negative(q, k, v)
        n_img, n_txt = args["img"].shape[1], args["txt"].shape[1]
        flipped = getattr(block, "flipped_img_txt", False)
        call.state.update({STATE_TEXT_TOKENS: n_txt, STATE_IMAGE_TOKENS: n_img, STATE_TEXT_LAST: flipped})

        def image_range(n):
            return (0, n_img) if flipped else (n_txt, n_txt + n_img)

        args = block_forward.with_override(
            args, lambda chained: make_override(chained, call, parts, negative, image_range))
        out = run(args)
        if negative.text_out is not None:
            text = text + _apply(block.txt_attn.proj(negative.text_out), mod1.gate)
            text = text + _apply(block.txt_mlp(_apply(block.txt_norm2(text), 1 + mod2.scale, mod2.shift)), mod2.gate)
            call.state[STATE_TEXT] = text
        return out

    return guided_replace(previous, guided)


def make_single_replace(index: int, previous=None):
    """The ``single_block`` replace of Flux block ``index`` (one stream [text; image])."""
    def guided(args, call, parts, run):
        n_txt = call.state.get(STATE_TEXT_TOKENS)
        if n_txt is None:
            return run(args)
        block = call.network.single_blocks[index]
        text = stream(call, parts, _flux_rope(call))
        mod = _mod_rows(_single_mod(block, args["vec"]), parts)
        hidden = block.hidden_size
        qkv, mlp = torch.split(block.linear1(_apply(block.pre_norm(text), 1 + mod.scale, mod.shift)),
                               [3 * hidden, block.linear1.out_features - 3 * hidden], dim=-1)
        q, k, v = _heads(qkv, block.num_heads)
        q, k = block.norm(q, k, v)
        q, k = apply_rope(q, k, call.state[STATE_PE])
        negative = Negative(q, k, v)

        def image_range(n):
            return (0, call.state[STATE_IMAGE_TOKENS]) if call.state.get(STATE_TEXT_LAST) else (n_txt, n)

        args = block_forward.with_override(
            args, lambda chained: make_override(chained, call, parts, negative, image_range))
        out = run(args)
        if negative.text_out is not None:
            update = block.linear2(torch.cat((negative.text_out, block.mlp_act(mlp)), 2))
            call.state[STATE_TEXT] = text + _apply(update, mod.gate)
        return out

    return guided_replace(previous, guided)


def install(patched) -> None:
    """A NAG replace on every double and single block (once; another replace there is chained)."""
    net = patched.model.diffusion_model
    install_block_replaces(patched, "double_block", len(net.double_blocks), make_double_replace)
    install_block_replaces(patched, "single_block", len(net.single_blocks), make_single_replace)
