"""Tiny diffusion models built from ComfyUI's own classes, with seeded random weights.

The layouts keep the block structure of the real models (so every hook path runs:
SD1.5's transformer at full resolution, SDXL's 2/10-deep transformer stacks and
10-block middle, Flux's double and single stream blocks, SD3's MMDiT joint blocks,
Lumina 2's context/noise refiners before its single-stream layers, Qwen-Image's
double-stream-only stack, Wan's self/cross-attention blocks over a [T, h, w] video latent,
HunyuanVideo's double and single stream blocks over frames, Z-Image's NextDiT with its own
modulation, Flux.2's shared modulation, Chroma's modulation approximator) and shrink the widths, so
a sampling step takes milliseconds on a CPU. The result is a real
``comfy.model_patcher.ModelPatcher`` around a real ``comfy.model_base`` model.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.supported_models
import torch


@dataclass(frozen=True)
class Layout:
    name: str
    config_class: type
    unet_config: Dict
    context_dim: int
    pooled_dim: Optional[int] = None
    latent_channels: int = 4
    tokens: int = 16
    extra_cond: Dict = field(default_factory=dict)
    frames: int = 0          # video layouts: latent frames of an empty latent ([B, C, T, h, w]); 0 = image
    vae_factor: int = 8      # pixels per latent cell of the family's VAE (16 for Wan 2.2 and Flux.2)


class _TinySD15(comfy.supported_models.SD15):
    unet_extra_config = {"num_heads": 4, "num_head_channels": -1}


class _TinySDXL(comfy.supported_models.SDXL):
    unet_extra_config = {"num_heads": -1, "num_head_channels": 16}


class _TinyFlux(comfy.supported_models.Flux):
    pass


class _TinySD3(comfy.supported_models.SD3):
    pass


class _TinyLumina2(comfy.supported_models.Lumina2):
    pass


class _TinyAuraFlow(comfy.supported_models.AuraFlow):
    pass


class _TinyQwenImage(comfy.supported_models.QwenImage):
    pass


class _TinyWan21(comfy.supported_models.WAN21_T2V):
    pass


class _TinyWan21I2V(comfy.supported_models.WAN21_I2V):
    pass


class _TinyWan22(comfy.supported_models.WAN22_T2V):
    pass


class ClipVisionFeatures:
    """What Wan image-to-video reads from a CLIP vision output: ``penultimate_hidden_states`` [1, 257, 1280]
    (CLIP-H's patch tokens), seeded random values in place of an encoded picture."""

    def __init__(self, seed: int = 0):
        self.penultimate_hidden_states = torch.randn(1, 257, 1280, generator=torch.Generator().manual_seed(seed))


class _TinyHunyuanVideo(comfy.supported_models.HunyuanVideo):
    pass


class _TinyZImage(comfy.supported_models.ZImage):
    pass


class _TinyFlux2(comfy.supported_models.Flux2):
    pass


class _TinyChroma(comfy.supported_models.Chroma):
    pass


_WAN = {"image_model": "wan2.1", "model_type": "t2v", "patch_size": (1, 2, 2), "dim": 64, "ffn_dim": 128,
        "freq_dim": 256, "text_dim": 32, "num_heads": 4, "num_layers": 2, "window_size": (-1, -1), "qk_norm": True,
        "cross_attn_norm": True, "eps": 1e-6}


_UNET_COMMON = {
    "use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4,
    "use_spatial_transformer": True, "legacy": False, "use_temporal_attention": False,
    "use_temporal_resblock": False,
}

SD15_POOLED = None
SDXL_POOLED = 32

LAYOUTS = {
    # SD1.5: transformers at /1, /2, /4 (one each), none at /8; middle depth 1.
    "sd15": Layout(
        name="sd15", config_class=_TinySD15, context_dim=64,
        unet_config={**_UNET_COMMON, "adm_in_channels": None, "model_channels": 32,
                     "num_res_blocks": [2, 2, 2, 2], "channel_mult": [1, 2, 4, 4],
                     "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "transformer_depth_middle": 1,
                     "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
                     "use_linear_in_transformer": False, "context_dim": 64},
    ),
    # SDXL: no transformer at /1; 2-deep at /2, 10-deep at /4 and in the middle: the
    # 70 cross-attention layers InstantID patches.
    "sdxl": Layout(
        name="sdxl", config_class=_TinySDXL, context_dim=64, pooled_dim=SDXL_POOLED,
        unet_config={**_UNET_COMMON, "num_classes": "sequential", "adm_in_channels": SDXL_POOLED + 6 * 256,
                     "model_channels": 32, "num_res_blocks": [2, 2, 2], "channel_mult": [1, 2, 4],
                     "transformer_depth": [0, 0, 2, 2, 10, 10], "transformer_depth_middle": 10,
                     "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
                     "use_linear_in_transformer": True, "context_dim": 64},
    ),
    # Flux: 16-channel latent, 2x2 patches, one double and two single stream blocks.
    "flux": Layout(
        name="flux", config_class=_TinyFlux, context_dim=32, pooled_dim=32, latent_channels=16,
        unet_config={"image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 32,
                     "context_in_dim": 32, "hidden_size": 64, "mlp_ratio": 2.0, "num_heads": 4,
                     "depth": 1, "depth_single_blocks": 2, "axes_dim": [4, 6, 6], "theta": 10000,
                     "patch_size": 2, "qkv_bias": True, "guidance_embed": True},
        extra_cond={"guidance": 3.5},
    ),
    # SD3.5 Medium style MMDiT: 16-channel latent, 2x2 patches, three joint blocks (the
    # first with SD3.5's extra x-block self-attention, the last "pre_only" on the text
    # side), RMS qk-norm, pooled output through y_embedder, context through a Linear
    # context_embedder. depth=2 gives 2 heads of 64 (MMDiT's width is 64 * depth).
    # No pos_embed buffer: positions are computed for every latent size.
    "sd3": Layout(
        name="sd3", config_class=_TinySD3, context_dim=48, pooled_dim=32, latent_channels=16,
        unet_config={"in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": 2, "num_blocks": 3,
                     "input_size": None, "adm_in_channels": 32, "pos_embed_scaling_factor": None,
                     "context_embedder_config": {"target": "torch.nn.Linear",
                                                 "params": {"in_features": 48, "out_features": 128}},
                     "qk_norm": "rms", "x_block_self_attn_layers": [0]},
    ),
    # Lumina 2 (NextDiT): 16-channel latent, 2x2 patches, one context refiner and one
    # noise refiner block, then two single-stream layers over [text; image] tokens;
    # grouped-query attention (4 query heads, 2 key/value heads), no pooled output.
    "lumina2": Layout(
        name="lumina2", config_class=_TinyLumina2, context_dim=32, latent_channels=16,
        unet_config={"image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 64,
                     "cap_feat_dim": 32, "n_layers": 2, "n_refiner_layers": 1, "n_heads": 4, "n_kv_heads": 2,
                     "multiple_of": 16, "ffn_dim_multiplier": 4.0, "qk_norm": True, "axes_dims": [4, 6, 6],
                     "axes_lens": [300, 512, 512], "rope_theta": 10000.0},
    ),
    # AuraFlow: its own MMDiT (one double then one single layer), SDXL's 4-channel latent, 2x2 patches;
    # a DiT none of the attention-guidance nodes addresses (their refusal is tested on it).
    "auraflow": Layout(
        name="auraflow", config_class=_TinyAuraFlow, context_dim=32,
        unet_config={"in_channels": 4, "out_channels": 4, "patch_size": 2, "dim": 64, "n_layers": 2,
                     "n_double_layers": 1, "n_heads": 4, "global_conddim": 64, "cond_seq_dim": 32, "max_seq": 256},
    ),
    # Qwen-Image (MMDiT-style double-stream blocks only, no single-stream stack): 16-channel
    # latent with a frame axis ([B, 16, 1, H, W], Wan 2.1 latent format), 2x2 patches, three
    # transformer blocks over [text; image] joint attention with rotary embedding applied
    # before the attention call, the text through an RMSNorm and Linear txt_in, no pooled output.
    "qwen_image": Layout(
        name="qwen_image", config_class=_TinyQwenImage, context_dim=32, latent_channels=16,
        unet_config={"image_model": "qwen_image", "patch_size": 2, "in_channels": 64, "out_channels": 16,
                     "num_layers": 3, "attention_head_dim": 16, "num_attention_heads": 4,
                     "joint_attention_dim": 32, "axes_dims_rope": [4, 6, 6]},
    ),
    # Wan 2.1 t2v: 16-channel video latent [B, 16, T, h, w], (1, 2, 2) patches, two blocks each
    # with self-attention, cross-attention to the text (T5 width shrunk to 32) and a feed-forward;
    # 4 heads of 16 (rotary split 8/4/4 over frames, rows, columns).
    "wan21": Layout(
        name="wan21", config_class=_TinyWan21, context_dim=32, latent_channels=16, frames=3,
        unet_config={**_WAN, "in_dim": 16, "out_dim": 16},
    ),
    # Wan 2.1 i2v: the same blocks with image-to-video cross-attention (CLIP vision tokens through img_emb next
    # to the text), 36 input channels (the latent, a 4-channel mask and the start image's latent: zeros here) and
    # a CLIP vision output in every conditioning.
    "wan21_i2v": Layout(
        name="wan21_i2v", config_class=_TinyWan21I2V, context_dim=32, latent_channels=16, frames=3,
        extra_cond={"clip_vision_output": ClipVisionFeatures()},
        unet_config={**_WAN, "model_type": "i2v", "in_dim": 36, "out_dim": 16},
    ),
    # Wan 2.2 TI2V 5B: the same blocks over Wan 2.2's 48-channel latent (16x16 pixels per cell).
    "wan22": Layout(
        name="wan22", config_class=_TinyWan22, context_dim=32, latent_channels=48, frames=3, vae_factor=16,
        unet_config={**_WAN, "in_dim": 48, "out_dim": 48},
    ),
    # HunyuanVideo (1.0): 16-channel video latent, (1, 2, 2) patches, the text through the token
    # refiner, one double and two single stream blocks, pooled vector (CLIP-L, shrunk to 32) and
    # guidance embedding. HunyuanVideo 1.5 is the same network class with a 32-channel latent and a
    # vision input, which the hooks do not see.
    "hunyuan_video": Layout(
        name="hunyuan_video", config_class=_TinyHunyuanVideo, context_dim=32, pooled_dim=32, latent_channels=16,
        frames=3, extra_cond={"guidance": 6.0},
        unet_config={"image_model": "hunyuan_video", "in_channels": 16, "out_channels": 16, "patch_size": [1, 2, 2],
                     "vec_in_dim": 32, "axes_dim": [4, 6, 6], "context_in_dim": 32, "hidden_size": 64,
                     "mlp_ratio": 2.0, "num_heads": 4, "depth": 1, "depth_single_blocks": 2, "theta": 256,
                     "qkv_bias": True, "guidance_embed": True, "meanflow": False, "byt5": False,
                     "use_cond_type_embedding": False, "vision_in_dim": None},
    ),
    # Z-Image (Turbo): Lumina 2's NextDiT with Z-Image's modulation, whose 256-wide time embedding
    # sets the smallest width (dim 256, 4 heads of 64); one refiner each, two layers; Qwen3 text
    # shrunk to 32; caption and image tokens padded to multiples of 32 (checkpoints with a cap_pad_token).
    "zimage": Layout(
        name="zimage", config_class=_TinyZImage, context_dim=32, latent_channels=16,
        unet_config={"image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 256, "cap_feat_dim": 32,
                     "n_layers": 2, "n_refiner_layers": 1, "n_heads": 4, "n_kv_heads": 4, "axes_dims": [16, 24, 24],
                     "axes_lens": [1536, 512, 512], "rope_theta": 256.0, "ffn_dim_multiplier": 8.0 / 3.0,
                     "qk_norm": True, "z_image_modulation": True, "time_scale": 1000.0, "pad_tokens_multiple": 32},
    ),
    # Flux.2: 128-channel latent (16x16 pixels per cell), 1x1 patches, modulation shared by all
    # blocks (global_modulation), SiLU-gated MLPs without biases, four rotary axes, guidance
    # embedding; one double and two single stream blocks. Its text (Mistral) is padded to 512 tokens
    # by ComfyUI; the pooled output is required by the model class but unused.
    "flux2": Layout(
        name="flux2", config_class=_TinyFlux2, context_dim=32, pooled_dim=32, latent_channels=128, vae_factor=16,
        extra_cond={"guidance": 4.0},
        unet_config={"image_model": "flux2", "in_channels": 128, "out_channels": 128, "vec_in_dim": None,
                     "context_in_dim": 32, "hidden_size": 64, "mlp_ratio": 3.0, "num_heads": 4, "depth": 1,
                     "depth_single_blocks": 2, "axes_dim": [4, 4, 4, 4], "theta": 2000, "patch_size": 1,
                     "qkv_bias": False, "guidance_embed": True, "global_modulation": True, "mlp_silu_act": True,
                     "ops_bias": False, "default_ref_method": "index", "ref_index_scale": 10.0},
    ),
    # Chroma: Flux's blocks (one double, two single) with the per-block modulation computed by
    # the distilled approximator MLP instead of a vector input; no guidance embedding (real CFG).
    "chroma": Layout(
        name="chroma", config_class=_TinyChroma, context_dim=32, pooled_dim=32, latent_channels=16,
        unet_config={"image_model": "chroma", "in_channels": 64, "out_channels": 64, "in_dim": 64, "out_dim": 64,
                     "hidden_dim": 64, "n_layers": 2, "hidden_size": 64, "context_in_dim": 32,
                     "axes_dim": [4, 6, 6], "num_heads": 4, "depth": 1, "depth_single_blocks": 2, "patch_size": 2,
                     "qkv_bias": True, "mlp_ratio": 2.0, "theta": 10000},
    ),
}


# Fields that newer ComfyUI releases added as required to a family's parameter dataclass, with the
# values their model detection gives the real checkpoints: image_model -> (module, dataclass, fields).
NEWER_FIELDS = {
    "flux": ("comfy.ldm.flux.model", "FluxParams", {"txt_ids_dims": []}),
    "flux2": ("comfy.ldm.flux.model", "FluxParams", {"txt_ids_dims": [3]}),
    "chroma": ("comfy.ldm.chroma.model", "ChromaParams", {"txt_ids_dims": [], "vec_in_dim": None}),
    "hunyuan_video": ("comfy.ldm.hunyuan_video.model", "HunyuanVideoParams", {"meanflow_sum": False}),
}


def _unet_config(spec: Layout) -> Dict:
    """The layout's unet config, completed with fields this ComfyUI's model class requires."""
    return complete_unet_config(spec.unet_config)


def complete_unet_config(unet_config: Dict) -> Dict:
    """A copy of ``unet_config`` with the fields this ComfyUI's model class requires and the config lacks
    (:data:`NEWER_FIELDS`); used by the test kit's layouts and the real-size bench models alike."""
    import dataclasses
    import importlib

    config = dict(unet_config)
    if config.get("image_model") in NEWER_FIELDS:
        module, name, fields = NEWER_FIELDS[config["image_model"]]
        known = {f.name for f in dataclasses.fields(getattr(importlib.import_module(module), name))}
        config.update({k: v for k, v in fields.items() if k in known and k not in config})
    return config


def layout(name: str) -> Layout:
    if name not in LAYOUTS:
        raise ValueError(f"unknown tiny layout {name!r}; expected one of {', '.join(LAYOUTS)}")
    return LAYOUTS[name]


def _is_norm(module: torch.nn.Module) -> bool:
    return isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm)) or type(module).__name__ == "RMSNorm"


@torch.no_grad()
def randomize(module: torch.nn.Module, seed: int, gain: float = 1.0) -> None:
    """Seeded weights: N(0, gain^2 / fan_in) for matrices and kernels, 0 for biases, 1 for norm scales.

    ComfyUI builds models with uninitialised storage (weights come from checkpoints), so
    every parameter is written here. Fan-in scaling keeps activations O(1) through the
    depth of the network, so patches have effects a test can see.
    """
    generator = torch.Generator().manual_seed(seed)
    norm_params = set()
    for sub in module.modules():
        if _is_norm(sub):
            for name, param in sub.named_parameters(recurse=False):
                norm_params.add(id(param))
                param.fill_(1.0 if name in ("weight", "scale") else 0.0)
    for name, param in module.named_parameters():
        if id(param) in norm_params:
            continue
        if param.ndim >= 2:
            std = gain / param[0].numel() ** 0.5
            param.copy_(torch.randn(param.shape, generator=generator) * std)
        elif name.endswith("scale"):
            param.fill_(1.0)
        else:
            param.zero_()
    for name, buffer in module.named_buffers():
        if buffer.is_floating_point() and not torch.isfinite(buffer).all():
            raise RuntimeError(f"tiny model buffer {name} is not finite")


# A memory_usage_factor so large that ComfyUI's sampler never fits two conds in one
# model call: cond and uncond (and each batch chunk) then run as separate calls.
CHUNKED = 1e12


def build_model(layout_name: str = "sd15", seed: int = 0, dtype: torch.dtype = torch.float32,
                gain: float = 1.0, model_type=None, chunked: bool = False,
                **unet_overrides) -> comfy.model_patcher.ModelPatcher:
    """A tiny model of the given layout wrapped in a real ModelPatcher.

    ``model_type`` (a ``comfy.model_base.ModelType``) overrides the prediction type
    the config would choose (EPS for SD layouts, FLUX for flux and qwen_image, FLOW
    for sd3 and lumina2). ``chunked`` makes the model report a huge memory need, so ComfyUI runs
    cond and uncond in separate calls
    (``transformer_options["cond_or_uncond"]`` is then ``[0]`` or ``[1]``).
    ``unet_overrides`` replace entries of the layout's unet config (e.g.
    ``model_channels=64`` for the benchmark model).
    """
    spec = layout(layout_name)
    config = spec.config_class({**_unet_config(spec), **unet_overrides})
    config.set_inference_dtype(dtype, None)
    if model_type is not None:
        config.model_type = lambda state_dict, prefix="": model_type
    device = comfy.model_management.get_torch_device()
    offload = comfy.model_management.unet_offload_device()
    model = config.get_model({})
    randomize(model, seed, gain)
    if chunked:
        model.memory_usage_factor = CHUNKED
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=offload)


def text_seed(text: str) -> int:
    """A stable seed for a prompt text (the same in every process)."""
    return zlib.crc32(text.encode("utf-8"))


def conditioning(layout_name: str, seed: int = 0, batch: int = 1, tokens: Optional[int] = None) -> List:
    """A CONDITIONING list for the layout: seeded token embeddings (+ pooled output where the layout uses it)."""
    spec = layout(layout_name)
    generator = torch.Generator().manual_seed(seed)
    n_tokens = spec.tokens if tokens is None else tokens
    context = torch.randn(batch, n_tokens, spec.context_dim, generator=generator)
    extras = dict(spec.extra_cond)
    if spec.pooled_dim is not None:
        extras["pooled_output"] = torch.randn(batch, spec.pooled_dim, generator=generator)
    return [[context, extras]]


def empty_latent(layout_name: str, height: int = 16, width: int = 16, batch: int = 1,
                 frames: Optional[int] = None) -> torch.Tensor:
    """Zeros [batch, C, height, width] in latent units, [batch, C, frames, height, width] for video layouts."""
    spec = layout(layout_name)
    frames = spec.frames if frames is None else frames
    if frames:
        return torch.zeros(batch, spec.latent_channels, frames, height, width)
    return torch.zeros(batch, spec.latent_channels, height, width)


def build_controlnet(layout_name: str = "sdxl", seed: int = 1, hint_channels: int = 3):
    """A tiny ControlNet of the layout's UNet, as ComfyUI's ControlNet object (CONTROL_NET), random weights."""
    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.ops

    spec = layout(layout_name)
    config = spec.config_class(_unet_config(spec)).unet_config
    config = {k: v for k, v in config.items() if k not in ("out_channels", "transformer_depth_output")}
    config.update(hint_channels=hint_channels, dtype=torch.float32, operations=comfy.ops.disable_weight_init,
                  device=comfy.model_management.unet_offload_device())
    control_model = comfy.cldm.cldm.ControlNet(**config)
    randomize(control_model, seed, gain=0.5)
    return comfy.controlnet.ControlNet(control_model, load_device=comfy.model_management.get_torch_device())
