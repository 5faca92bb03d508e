"""Attention guidance on DiTs: block addresses, the per-block replace and the attention override it installs.

A DiT block is addressed as ``stack.index`` (``double.7``, ``single.0``, ``joint.10``; Qwen-Image's
transformer blocks, double-stream blocks ComfyUI replaces as ``double_block``, are ``double.N``).
PatchLab puts a ``patches_replace["dit"]`` block replace at every chosen block (chaining a
replace another pack put there). In normal passes it only calls the block. In PatchLab's
extra passes (``transformer_options["patchlab_guidance_pass"]`` holds the specs, one group
of batch rows each) it acts on the rows of the specs that chose this block:

* SLG rows: the block is skipped (its output is its input for those rows);
* PAG / SEG rows: the block runs with an ``optimized_attention_override`` (chained to one
  already present) that, in those rows only, replaces image-to-image attention by the
  identity (PAG: image tokens attend to the text and to themselves) or blurs the image
  queries on the token grid (SEG). The override lives in a copy of ``transformer_options``
  handed to this block only, so no other block sees it.

Token layout: the block replace knows the text and image streams of its block (Flux double,
SD3 joint and Qwen-Image blocks get both, and attend over [text; image]; Flux single blocks
get their concatenation, and the text length comes from the conditioning, recorded by an
APPLY_MODEL wrapper in extra passes together with the latent shape). The image grid is
``ceil(H / p) x ceil(W / p)`` for patch size ``p`` (the models pad to whole patches), the
first tokens of the image stream (Flux Kontext and Qwen-Image Edit reference tokens follow it
and are treated as image tokens but not blurred). Qwen-Image's latent has a frame axis of
length 1 ([B, C, 1, H, W]) and the same grid. Flux and Qwen-Image apply the rotary embedding
before the attention call, so the queries SEG blurs carry it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import comfy.patcher_extension

from ..kernels import attention as ka

log = logging.getLogger(__name__)

PASS_KEY = "patchlab_guidance_pass"
LATENT_KEY = "patchlab_latent_shape"
TEXT_KEY = "patchlab_text_tokens"
WRAPPER_KEY = "patchlab_attention_guidance"
DitKey = Tuple[str, int]

# stack name -> (network attribute holding the blocks, patches_replace["dit"] block name)
FAMILIES = {
    "flux": {"double": ("double_blocks", "double_block"), "single": ("single_blocks", "single_block")},
    "mmdit": {"joint": ("joint_blocks", "double_block")},
    "qwen_image": {"double": ("transformer_blocks", "double_block")},
}

_warned = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning(message)


def family(model) -> Optional[str]:
    """Which supported DiT family the model's network is (None: not a supported DiT)."""
    net = model.model.diffusion_model
    module = type(net).__module__
    # Flux.1/Flux 2 and Chroma put the text first in their single blocks (HunyuanVideo, with the same block
    # names, puts it last and is not covered).
    if module.startswith(("comfy.ldm.flux.", "comfy.ldm.chroma.")) and hasattr(net, "single_blocks"):
        return "flux"
    if module.startswith("comfy.ldm.modules.diffusionmodules.mmdit") and hasattr(net, "joint_blocks"):
        return "mmdit"
    if module.startswith("comfy.ldm.qwen_image.") and hasattr(net, "transformer_blocks"):
        return "qwen_image"
    return None


def stacks(model) -> Dict[str, int]:
    """``{stack name: number of blocks}`` of a supported DiT (empty for any other model)."""
    name = family(model)
    if name is None:
        return {}
    net = model.model.diffusion_model
    return {stack: len(getattr(net, attr)) for stack, (attr, _) in FAMILIES[name].items()}


def patch_size(model) -> int:
    net = model.model.diffusion_model
    size = getattr(net, "patch_size", 2)
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def describe(available: Dict[str, int]) -> str:
    return ", ".join(f"{stack}.0-{count - 1}" if count > 1 else f"{stack}.0"
                     for stack, count in available.items() if count)


def auto_blocks(model) -> List[DitKey]:
    """The family's default: blocks 7-9 of the first stack (Flux double, SD3 joint), at the same relative depth
    (7/19 to 9/19) in a shallower stack; the anchors' SLG layers and the middle of the stack PAG papers perturb.
    Qwen-Image (no published value) takes that relative depth in its own stack: double.22-28 of 60."""
    stack, count = next(iter(stacks(model).items()))
    if count >= 10 and family(model) != "qwen_image":
        return [(stack, i) for i in (7, 8, 9)]
    first = min(count - 1, int(count * 7 / 19))
    last = max(first, min(count - 1, int(count * 9 / 19)))
    return [(stack, i) for i in range(first, last + 1)]


def resolve(model, entries, node_id: str) -> List[DitKey]:
    """The block keys the parsed entries select in this DiT; ValueError listing the model's blocks otherwise."""
    available = stacks(model)
    chosen: List[DitKey] = []
    for entry in entries:
        if entry[0] == "auto":
            chosen.extend(auto_blocks(model))
            continue
        if entry[0] == "all":
            chosen.extend((stack, i) for stack, count in available.items() for i in range(count))
            continue
        kind, stack, first, last = entry[0], entry[1], entry[2], entry[3]
        if kind != "dit" or stack not in available:
            name = ".".join(str(p) for p in entry[1:] if p is not None)
            raise ValueError(f"{node_id}: block {name!r} is a UNet address; this model is a DiT with blocks "
                             f"{describe(available)} (write e.g. '{next(iter(available))}.0' or 'auto')"
                             if kind != "dit" else
                             f"{node_id}: this model has no {stack!r} blocks; it has {describe(available)}")
        count = available[stack]
        if first is None:
            first, last = 0, count - 1
        elif last is None:
            last = first
        if first > last or last >= count:
            wanted = f"{stack}.{first}" + (f"-{last}" if last != first else "")
            raise ValueError(f"{node_id}: block {wanted!r} does not exist in this model; it has "
                             f"{describe(available)}")
        chosen.extend((stack, i) for i in range(first, last + 1))
    return chosen


# --- the extra pass: latent shape and text length --------------------------------------------

def apply_model_wrapper(executor, x, *args, **kwargs):
    """APPLY_MODEL wrapper: in PatchLab's extra passes, hand the latent shape and text length to the blocks."""
    args = list(args)
    options = args[4] if len(args) > 4 else kwargs.get("transformer_options")
    if options is not None and options.get(PASS_KEY):
        options = dict(options)
        options[LATENT_KEY] = tuple(x.shape)
        context = args[2] if len(args) > 2 else kwargs.get("c_crossattn")
        options[TEXT_KEY] = None if context is None else int(context.shape[1])
        if len(args) > 4:
            args[4] = options
        else:
            kwargs["transformer_options"] = options
    return executor(x, *args, **kwargs)


apply_model_wrapper.patchlab_attention = True


def install_wrapper(patched) -> None:
    if not patched.get_wrappers(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY):
        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY,
                                     apply_model_wrapper)


# --- the attention override -----------------------------------------------------------------------

@dataclass(frozen=True)
class Tokens:
    """Where text and image tokens lie in this block's attention calls."""

    joint: int                 # tokens of the joint (text + image) sequence
    text: Tuple[int, int]      # text range inside the joint sequence
    image: Tuple[int, int]     # image range inside the joint sequence (grid first, then reference tokens)
    grid: Optional[Tuple[int, int]]  # the image's token grid, None when it cannot be placed

    def split(self, n: int):
        """(text range, image range) for an attention call over n tokens, or None for other calls."""
        if n == self.joint:
            return self.text, self.image
        if n == self.image[1] - self.image[0]:  # image-only self-attention (SD3.5's x-block attn2)
            return (0, 0), (0, n)
        return None


def _heads_first(t, heads: int, skip_reshape: bool):
    if skip_reshape:
        return t
    return t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)  # [B, N, H*D] or [B, N, H, D]


def _write(out, part: slice, tokens: Tuple[int, int], values, skip_output_reshape: bool) -> None:
    """Write heads-first values [b, H, n, D] into rows ``part``, tokens ``tokens`` of the attention output."""
    if skip_output_reshape:
        out[part, :, tokens[0]:tokens[1]] = values.to(out.dtype)
    else:
        batch, heads, n, dim = values.shape
        out[part, tokens[0]:tokens[1]] = values.transpose(1, 2).reshape(batch, n, heads * dim).to(out.dtype)


def make_override(previous, parts, tokens: Tokens):
    """An ``optimized_attention_override`` perturbing ``parts`` [(batch-row slice, spec)] of this block's calls."""
    def attend(func, *args, **kwargs):
        return previous(func, *args, **kwargs) if previous is not None else func(*args, **kwargs)

    def override(func, *args, **kwargs):
        out = attend(func, *args, **kwargs)
        q, k, v = args[:3]
        heads = args[3] if len(args) > 3 else kwargs.get("heads")
        skip_reshape = kwargs.get("skip_reshape", False)
        n_q = q.shape[2] if skip_reshape else q.shape[1]
        n_k = k.shape[2] if skip_reshape else k.shape[1]
        layout = tokens.split(n_q) if n_q == n_k else None
        if layout is None:
            return out
        text, image = layout
        out = out.clone()
        for part, spec in parts:
            qh, kh, vh = (_heads_first(t[part], heads, skip_reshape) for t in (q, k, v))
            if spec.kind == "pag":
                if kh.shape[1] != qh.shape[1]:  # grouped-query attention: repeat the key/value heads
                    kh = kh.repeat_interleave(qh.shape[1] // kh.shape[1], dim=1)
                    vh = vh.repeat_interleave(qh.shape[1] // vh.shape[1], dim=1)
                values = ka.joint_identity_attention(qh, kh, vh, text, image)
                _write(out, part, image, values, kwargs.get("skip_output_reshape", False))
            elif spec.kind == "seg" and tokens.grid is not None:
                blurred = ka.blur_grid_queries(qh, image[0], tokens.grid, spec.blur_sigma)
                if not skip_reshape:
                    blurred = blurred.transpose(1, 2).reshape(q[part].shape)
                sub_kwargs = dict(kwargs)
                mask = kwargs.get("mask")
                if mask is not None and mask.ndim >= 3 and mask.shape[0] == q.shape[0]:
                    sub_kwargs["mask"] = mask[part]
                out[part] = attend(func, blurred, k[part], v[part], *args[3:], **sub_kwargs).to(out.dtype)
        return out

    override.patchlab_attention = True
    return override


# --- the block replace -----------------------------------------------------------------------------

def _grid(options: Dict, size: int, image_tokens: int) -> Optional[Tuple[int, int]]:
    shape = options.get(LATENT_KEY)
    if shape is not None and len(shape) == 5 and shape[2] == 1:  # Qwen-Image: [B, C, 1, H, W]
        shape = shape[:2] + shape[3:]
    if shape is None or len(shape) != 4:
        _warn_once("Smoothed Energy Guidance blurs 2-D image latents only; this call's latent is not one")
        return None
    grid = (-(-shape[-2] // size), -(-shape[-1] // size))
    if grid[0] * grid[1] > image_tokens:
        _warn_once("Smoothed Energy Guidance found fewer image tokens than the latent's patch grid; no blur")
        return None
    return grid


def _tokens(stack: str, args: Dict, options: Dict, size: int, flipped: bool) -> Optional[Tokens]:
    img, txt = args.get("img"), args.get("txt")
    if txt is not None:  # the block gets both streams (Flux double, SD3 joint)
        n_txt, n_img = txt.shape[1], img.shape[1]
        if flipped:
            text, image = (n_img, n_img + n_txt), (0, n_img)
        else:
            text, image = (0, n_txt), (n_txt, n_txt + n_img)
        return Tokens(n_txt + n_img, text, image, _grid(options, size, n_img))
    n_joint = img.shape[1]
    n_txt = options.get(TEXT_KEY) if stack == "single" else 0
    if n_txt is None or n_txt > n_joint:
        _warn_once("attention guidance could not tell text from image tokens in a DiT block; it is left as is")
        return None
    return Tokens(n_joint, (0, n_txt), (n_txt, n_joint), _grid(options, size, n_joint - n_txt))


def make_block_replace(key: DitKey, previous, size: int, flipped: bool = False):
    """The ``patches_replace["dit"]`` replace PatchLab puts at block ``key``, chaining ``previous`` (or None)."""
    def run(args, extra):
        return previous(args, extra) if previous is not None else extra["original_block"](args)

    def block_replace(args, extra):
        options = args.get("transformer_options") or {}
        groups = options.get(PASS_KEY)
        acting = [g for g, spec in enumerate(groups or ()) if key in spec.blocks]
        if not acting:
            return run(args, extra)
        chunks = max(1, len(options.get("cond_or_uncond", [0])))
        per_chunk = args["img"].shape[0] // chunks
        rows = per_chunk // len(groups)
        slices = {g: [slice(c * per_chunk + g * rows, c * per_chunk + (g + 1) * rows) for c in range(chunks)]
                  for g in acting}
        streams = [name for name in ("img", "txt") if args.get(name) is not None]
        skipped = [part for g in acting if groups[g].kind == "slg" for part in slices[g]]
        if len(skipped) == chunks * len(groups):  # every row skips this block
            return {name: args[name] for name in streams}
        saved = [(part, {name: args[name][part].clone() for name in streams}) for part in skipped]
        parts = [(part, groups[g]) for g in acting if groups[g].kind in ("pag", "seg") for part in slices[g]]
        if parts:
            tokens = _tokens(key[0], args, options, size, flipped)
            if tokens is not None:
                inner = dict(options)
                inner["optimized_attention_override"] = make_override(
                    options.get("optimized_attention_override"), parts, tokens)
                args = {**args, "transformer_options": inner}
        out = run(args, extra)
        if saved:
            out = dict(out)
            for name in streams:
                if out.get(name) is None:
                    continue
                result = out[name].clone()
                for part, values in saved:
                    result[part] = values[name]
                out[name] = result
        return out

    block_replace.patchlab_attention = True
    return block_replace


def install_replaces(patched, keys) -> None:
    """Put PatchLab's block replace at every key (once; another pack's replace there is chained)."""
    name = family(patched)
    net = patched.model.diffusion_model
    size = patch_size(patched)
    replaces = patched.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {})
    for stack, index in sorted(keys):
        attr, block_name = FAMILIES[name][stack]
        existing = replaces.get((block_name, index))
        if existing is not None and getattr(existing, "patchlab_attention", False):
            continue
        flipped = bool(getattr(getattr(net, attr)[index], "flipped_img_txt", False))
        patched.set_model_patch_replace(make_block_replace((stack, index), existing, size, flipped),
                                        "dit", block_name, index)
    install_wrapper(patched)
