"""Normalized Attention Guidance (Chen et al. 2025, arXiv 2505.21179) as a MODEL patch.

In every attention that reads the text, the same queries attend once more, to the *negative*
prompt's keys and values: ``Z+ = Attn(Q, K+, V+)``, ``Z- = Attn(Q, K-, V-)``, combined per token
by :func:`kernels.attention.normalized_attention_guidance` before the layer's output projection
(as the paper's reference code). Only the rows of the positive prompt are guided (chunks tagged
cond in ``cond_or_uncond``: at CFG 1 every row, at CFG > 1 the positive branch; the negative
branch of CFG stays plain, and PatchLab's PAG/SEG/SLG/TPG extra passes, tagged cond, are guided
as the positive they are compared with).

Where the pieces come from:

* the negative prompt: a ``SAMPLER_SAMPLE`` wrapper reads the guider's processed ``negative``
  conditioning (present at CFG 1 too, where ComfyUI leaves it out of the model calls), or the
  node's own ``negative`` input, and puts its tensor into that run's copy of the model options;
* per model call, an ``APPLY_MODEL`` wrapper checks the schedule window once and maps the
  negative into the network's text space (UNets: as it is; Wan: the network's ``text_embedding``),
  handing it and the running network (whose layers project it) to the layers;
* UNets (SD1.x, SD2.x, SDXL): an **attn2 replace** at every transformer (chaining one another
  pack put there) projects K- and V- with that transformer's own ``attn2.to_k`` / ``to_v``
  (:mod:`.unet`);
* Wan 2.1 / 2.2: a ``double_block`` **block replace** on every block installs an
  ``optimized_attention_override`` for that block call which acts in the attention call that reads
  the text (:mod:`.wan`);
* Flux, Flux.2, Chroma, HunyuanVideo (joint attention): :mod:`.flux` (a text stream for the
  negative, :mod:`.joint`, no second image stream); SD3/SD3.5: :mod:`.mmdit`; Qwen-Image: :mod:`.qwen`;
  Z-Image / Lumina 2: :mod:`.lumina` (the same scheme on their blocks).

The package: :mod:`.core` (the spec, the keys, the negative of a run, the rows a call guides),
:mod:`.joint` (the negative's text stream of joint-attention models), one module per family, each
exposing ``network_text(base, negative, t, options, mask)`` and ``install(patched)``: :mod:`.unet`,
:mod:`.wan`, :mod:`.flux`, :mod:`.mmdit`, :mod:`.qwen`, :mod:`.lumina`; this module picks the family
(the ``nag`` column of ``patches/families.py``), wraps the model calls and installs. Imports run one
way: the family modules import the core and the stream, never this module.

The negative prompt never runs as a pass of its own: per guided layer, the K/V projections of
its tokens and one more cross-attention of the positive rows (joint-attention models: the
negative's text side of each block and two attention calls of its size). A step a step cache reuses is not
re-guided: the cached prediction already carries the guidance of the step it came from.
"""

from __future__ import annotations

import logging

import comfy.patcher_extension
import torch

from .. import families
from ..unet import is_unet, transformer_keys
from . import flux, lumina, mmdit, qwen, unet, wan
from .core import (
    CALL_KEY,
    NEGATIVE_KEY,
    NEGATIVE_MASK_KEY,
    NODE_ID,
    SPEC_KEY,
    WRAPPER_KEY,
    NagCall,
    NagSpec,
    sampler_sample_wrapper,
)

log = logging.getLogger(__name__)

WRAPPERS = comfy.patcher_extension.WrappersMP
MODULES = {"unet": unet, "wan": wan, "flux": flux, "mmdit": mmdit, "qwen": qwen, "lumina": lumina}

__all__ = ["NagCall", "NagSpec", "family", "with_nag"]


def family(model) -> str:
    """The key of the family module that reaches this model (``MODULES``); RuntimeError naming the supported
    families for any other model."""
    if transformer_keys(model):
        return "unet"
    net = model.model.diffusion_model
    row = families.of_network(net)
    if row is not None and row.nag is not None:
        return row.nag
    raise RuntimeError(
        f"{NODE_ID} supports UNet models (SD1.x, SD2.x, SDXL), Wan 2.1/2.2 text-to-video, Flux, Flux.2, Chroma, "
        f"HunyuanVideo, SD3/SD3.5, Qwen-Image, Z-Image and Lumina 2; this model is {type(model.model).__name__} "
        f"with a {type(net).__name__} network. Remove the node for this model.")


def apply_model_wrapper(executor, x, t, *args, **kwargs):
    """APPLY_MODEL wrapper: inside the window, hand the layers the negative in the network's text space."""
    args = list(args)
    options = args[3] if len(args) > 3 else kwargs.get("transformer_options")
    spec = options.get(SPEC_KEY) if options else None
    negative = options.get(NEGATIVE_KEY) if options else None
    if spec is None or negative is None or spec.is_off or not spec.window.contains(t):
        return executor(x, t, *args, **kwargs)
    base = executor.class_obj
    dtype = base.manual_cast_dtype if base.manual_cast_dtype is not None else base.get_dtype()
    net = base.diffusion_model
    # the negative's text mask where the model masks the positive's text in every block (HunyuanVideo)
    row = families.of_network(net)
    mask = options.get(NEGATIVE_MASK_KEY) if row is not None and row.key == "hunyuan_video" else None
    if mask is not None:  # 1/0 -> an additive bias, as the model turns its own
        mask = (mask.to(device=x.device) - 1).to(dtype) * torch.finfo(dtype).max
    module = MODULES["unet" if is_unet(net) else row.nag]
    context = module.network_text(base, negative.to(device=x.device, dtype=dtype), t, options, mask)
    options = {**options, CALL_KEY: NagCall(spec, context, net, tuple(x.shape), mask)}
    if len(args) > 3:
        args[3] = options
    else:
        kwargs["transformer_options"] = options
    return executor(x, t, *args, **kwargs)


def with_nag(model, spec: NagSpec):
    """A clone guided by ``spec``: the layer hooks of the model's family, the two wrappers, the spec (a second
    NAG node replaces the first's settings)."""
    module = MODULES[family(model)]
    patched = model.clone()
    module.install(patched)
    transformer_options = patched.model_options.setdefault("transformer_options", {})
    if transformer_options.get(SPEC_KEY) is not None:
        log.info("%s: this model already has NAG; the new node's settings replace the earlier ones", NODE_ID)
    transformer_options[SPEC_KEY] = spec
    if not patched.get_wrappers(WRAPPERS.SAMPLER_SAMPLE, WRAPPER_KEY):
        patched.add_wrapper_with_key(WRAPPERS.SAMPLER_SAMPLE, WRAPPER_KEY, sampler_sample_wrapper)
    if not patched.get_wrappers(WRAPPERS.APPLY_MODEL, WRAPPER_KEY):
        patched.add_wrapper_with_key(WRAPPERS.APPLY_MODEL, WRAPPER_KEY, apply_model_wrapper)
    return patched
