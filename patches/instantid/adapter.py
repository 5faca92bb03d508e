"""InstantID (Wang et al. 2024, arXiv 2401.07519): weights, face tokens, the IP attention patch, the ControlNet.

* Weights: ``models/instantid/*.bin|*.safetensors`` with an ``image_proj`` Resampler
  and ``ip_adapter`` key/value projections ``{2n+1}.to_k_ip/to_v_ip`` for the 70 SDXL
  cross-attention layers (input 4, 5, 7, 8; output 0-5; then the middle block).
* Face tokens: the Resampler turns 512-d face embeddings into 16 x 2048 tokens; the
  uncond tokens are zeros or seeded noise.
* The patch: an ``attn2`` replace per cross-attention layer adding
  ``weight * attention(q, K_ip, V_ip)`` to the text attention. K_ip/V_ip of the (fixed)
  face tokens are projected once when the node runs, so a step only moves [16, C]
  tensors. Each chunk of a model call gets cond or uncond tokens from ``cond_or_uncond``;
  the schedule window and the mask act per sample and per token; any attn2 replace
  already at a layer is chained, not replaced or mutated.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import comfy.utils
import torch
import torch.nn.functional as F

from ...kernels import attention as ka
from ...kernels.resampler import Resampler, ResamplerShape, shape_problems
from ..unet import Key, attend, transformers
from ..window import SigmaWindow

log = logging.getLogger(__name__)

SDXL_LAYERS = 70


# --- weights ----------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class InstantIDWeights:
    """A loaded InstantID file: the Resampler (float32, CPU) and the per-layer (to_k_ip, to_v_ip) weights."""

    path: str
    resampler: Resampler
    ip_layers: Tuple[Tuple[torch.Tensor, torch.Tensor], ...]

    def __deepcopy__(self, memo):
        return self


def _split(raw: Dict) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    if isinstance(raw.get("image_proj"), dict) and isinstance(raw.get("ip_adapter"), dict):
        return raw["image_proj"], raw["ip_adapter"]
    groups = {"image_proj": {}, "ip_adapter": {}}
    for key, value in raw.items():
        group, _, rest = key.partition(".")
        if group in groups and rest:
            groups[group][rest] = value
    return groups["image_proj"], groups["ip_adapter"]


def _problems_list(problems: List[str]) -> str:
    shown = "; ".join(problems[:8])
    return shown + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")


def load_weights(path: str, node_id: str) -> InstantIDWeights:
    """Load and check an InstantID file; clear errors name the file and what is wrong with it."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{node_id}: {path} does not exist. Put ip-adapter.bin from the InstantID release "
                                "into ComfyUI/models/instantid/.")
    try:
        raw = comfy.utils.load_torch_file(path, safe_load=True)
    except Exception as error:  # pickle, zip and safetensors errors all mean the same to the user
        raise ValueError(f"{node_id}: cannot read {path} ({type(error).__name__}: {error}). The file is damaged or "
                         "not a weights file; download it again.") from None
    image_proj, ip_adapter = _split(raw)
    if not image_proj or not ip_adapter:
        raise ValueError(f"{node_id}: {path} is not an InstantID file: it has no 'image_proj' and 'ip_adapter' "
                         f"weights (found keys like {', '.join(list(raw)[:5])}). Use InstantID's ip-adapter.bin.")
    try:
        shape = ResamplerShape.from_state_dict(image_proj)
    except KeyError as missing:
        raise ValueError(f"{node_id}: {path}: image_proj lacks {missing}; this is not InstantID's Resampler.") from None
    problems = shape_problems(image_proj, shape)
    if problems:
        raise ValueError(f"{node_id}: {path}: image_proj does not match a Resampler: {_problems_list(problems)}.")
    layers = _ip_layers(ip_adapter, shape.output_dim, path, node_id)
    resampler = Resampler.from_state_dict({k: v.float() for k, v in image_proj.items()}).eval()
    return InstantIDWeights(path=str(path), resampler=resampler, ip_layers=layers)


def _ip_layers(ip_adapter: Dict[str, torch.Tensor], token_dim: int, path: str, node_id: str):
    pattern = re.compile(r"^(\d+)\.(to_k_ip|to_v_ip)\.weight$")
    unexpected = [k for k in ip_adapter if not pattern.match(k)]
    numbers = sorted({int(pattern.match(k).group(1)) for k in ip_adapter if pattern.match(k)})
    count = len(numbers)
    problems = [f"unexpected {k}" for k in unexpected]
    if count != SDXL_LAYERS:
        hint = " (an IP-Adapter for SD1.5 has 16)" if count == 16 else ""
        problems.insert(0, f"{count} attention layers, InstantID (SDXL) has {SDXL_LAYERS}{hint}")
    layers = []
    for n in range(count):
        pair = []
        for name in ("to_k_ip", "to_v_ip"):
            key = f"{2 * n + 1}.{name}.weight"
            tensor = ip_adapter.get(key)
            if tensor is None:
                problems.append(f"missing {key}")
            elif tensor.ndim != 2 or tensor.shape[1] != token_dim:
                problems.append(f"{key} has shape {tuple(tensor.shape)}, expected (channels, {token_dim})")
            pair.append(tensor)
        layers.append(tuple(pair))
    if problems:
        raise ValueError(f"{node_id}: {path}: ip_adapter weights do not fit InstantID: {_problems_list(problems)}.")
    return tuple((k.float(), v.float()) for k, v in layers)


# --- the model's cross-attention layers ----------------------------------------------------------

@dataclass(frozen=True)
class CrossAttentionLayer:
    key: Key
    width: int  # channels of the layer's queries (attn2.to_k output)


def cross_attention_layers(model) -> List[CrossAttentionLayer]:
    """The UNet's cross-attention layers in InstantID's order: input blocks, output blocks, then the middle."""
    found = {"input": [], "middle": [], "output": []}
    for key, transformer in transformers(model).items():
        attn2 = getattr(transformer, "attn2", None)
        if attn2 is not None:
            found[key[0]].append(CrossAttentionLayer(key, attn2.to_k.out_features))
    return found["input"] + found["output"] + found["middle"]


def check_fits(model, weights: InstantIDWeights, node_id: str) -> List[CrossAttentionLayer]:
    """The layers to patch; RuntimeError naming SDXL when the model's cross-attention does not fit the weights."""
    layers = cross_attention_layers(model)
    widths = [k.shape[0] for k, _ in weights.ip_layers]
    if len(layers) != len(widths) or any(layer.width != width for layer, width in zip(layers, widths)):
        raise RuntimeError(
            f"{node_id}: InstantID needs an SDXL model. This model ({type(model.model).__name__}) has "
            f"{len(layers)} cross-attention layers of widths {sorted({layer.width for layer in layers}) or 'none'}; "
            f"the InstantID weights fit {len(widths)} layers of widths {sorted(set(widths))}. Load an SDXL "
            "checkpoint (SD1.5, SD3 and Flux models are not supported)."
        )
    return layers


# --- face tokens ------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class FaceTokens:
    """Resampler output for the positive (cond) and negative (uncond) passes, [1, T, D] float32 on the CPU."""

    cond: torch.Tensor
    uncond: torch.Tensor

    def __deepcopy__(self, memo):
        return self


def combine_embeddings(embeds: torch.Tensor, method: str) -> torch.Tensor:
    """Several faces' embeddings [n, E] -> what the Resampler sees.

    average: the mean embedding [1, E]. norm average: each embedding scaled to unit
    length, averaged, and given back the mean length of the inputs (per embedding, not
    across images). concat: every embedding [n, E] (their tokens are concatenated).
    """
    if method == "concat" or embeds.shape[0] == 1:
        return embeds
    if method == "average":
        return embeds.mean(dim=0, keepdim=True)
    if method == "norm average":
        lengths = embeds.norm(dim=-1, keepdim=True)
        mean = (embeds / lengths.clamp_min(1e-12)).mean(dim=0, keepdim=True)
        return mean / mean.norm(dim=-1, keepdim=True).clamp_min(1e-12) * lengths.mean()
    raise ValueError(f"combine_embeds must be average, norm average or concat, got {method!r}")


def face_tokens(weights: InstantIDWeights, embeds: torch.Tensor, combine: str, noise: float) -> FaceTokens:
    """Face tokens from embeddings [n, E]; uncond from zeros, or seeded uniform noise of size ``noise``."""
    embeds = combine_embeddings(embeds.float().cpu(), combine)
    if noise > 0:
        seed = int(torch.sum(embeds.double()).abs().item() * 1000) % (2**31 - 1)
        negative = noise * torch.rand(embeds.shape, generator=torch.Generator().manual_seed(seed))
    else:
        negative = torch.zeros_like(embeds)
    with torch.no_grad():
        cond, uncond = weights.resampler(embeds), weights.resampler(negative)
    return FaceTokens(cond=cond.reshape(1, -1, cond.shape[-1]), uncond=uncond.reshape(1, -1, uncond.shape[-1]))


# --- the attention patch ------------------------------------------------------------------------------

def _grid_mask(mask: torch.Tensor, extra_options, tokens: int) -> Optional[torch.Tensor]:
    """The MASK [M, H, W] resized to this layer's token grid: [M, tokens, 1] (None if the grid is unknown)."""
    shape = extra_options.get("original_shape")
    try:
        h, w = ka.token_grid(shape[-2], shape[-1], tokens)
    except (ValueError, TypeError):
        return None
    resized = F.interpolate(mask[:, None].float(), size=(h, w), mode="bilinear", align_corners=False)
    return resized.reshape(mask.shape[0], tokens, 1)


def make_attn2_replace(face_kv: Dict[str, torch.Tensor], weight: float, window: SigmaWindow,
                       mask: Optional[torch.Tensor], previous=None):
    """The attn2 replace of one layer; ``face_kv`` holds k/v [1, T, C] for "cond" and "uncond"."""
    def attn2_replace(q, k, v, extra_options):
        out = attend(q, k, v, extra_options, previous)
        tags = extra_options.get("cond_or_uncond") or [0]
        per_chunk = q.shape[0] // len(tags)
        keys = torch.cat([face_kv["uncond_k" if t == 1 else "cond_k"].expand(per_chunk, -1, -1) for t in tags])
        values = torch.cat([face_kv["uncond_v" if t == 1 else "cond_v"].expand(per_chunk, -1, -1) for t in tags])
        face = attend(q, keys.to(q.device, q.dtype), values.to(q.device, q.dtype), extra_options)
        scale = torch.full((q.shape[0], 1, 1), weight, device=q.device, dtype=q.dtype)
        sigmas = extra_options.get("sigmas")
        if sigmas is not None and not window.is_always:
            scale = scale * window.row_mask(sigmas.to(q.device), q.shape[0]).to(q.dtype)[:, None, None]
        if mask is not None:
            grid = _grid_mask(mask.to(q.device), extra_options, q.shape[1])
            if grid is not None:
                per_row = grid.repeat(max(1, per_chunk // grid.shape[0]), 1, 1)[:per_chunk].repeat(len(tags), 1, 1)
                scale = scale * per_row.to(q.dtype)
        return out + face * scale
    return attn2_replace


def project_face_tokens(weights: InstantIDWeights, tokens: FaceTokens) -> List[Dict[str, torch.Tensor]]:
    """Per layer, the face tokens through to_k_ip/to_v_ip: {cond_k, cond_v, uncond_k, uncond_v} [1, T, C]."""
    projected = []
    with torch.no_grad():
        for k_weight, v_weight in weights.ip_layers:
            projected.append({"cond_k": tokens.cond @ k_weight.T, "cond_v": tokens.cond @ v_weight.T,
                              "uncond_k": tokens.uncond @ k_weight.T, "uncond_v": tokens.uncond @ v_weight.T})
    return projected


def with_face_attention(model, weights: InstantIDWeights, tokens: FaceTokens, weight: float, window: SigmaWindow,
                        mask: Optional[torch.Tensor], node_id: str):
    """A clone whose 70 cross-attention layers also attend to the face tokens."""
    layers = check_fits(model, weights, node_id)
    patched = model.clone()
    if weight == 0:
        return patched
    replaces = patched.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
    for layer, face_kv in zip(layers, project_face_tokens(weights, tokens)):
        previous = replaces.get(layer.key, replaces.get(layer.key[:2]))
        patched.set_model_attn2_replace(make_attn2_replace(face_kv, weight, window, mask, previous), *layer.key)
    return patched


# --- the ControlNet -----------------------------------------------------------------------------------------

def with_controlnet(positive, negative, control_net, keypoints: torch.Tensor, tokens: FaceTokens, strength: float,
                    start_percent: float, end_percent: float):
    """Conditionings whose ControlNet sees the keypoint image and the face tokens as its cross-attention context.

    Uses ComfyUI's own ControlNet objects (a copy with the hint set, chained after any
    ControlNet already on the conditioning); the prompt conditioning itself is untouched.
    """
    if strength == 0:
        return positive, negative
    hint = keypoints.movedim(-1, 1)
    copies = {}
    result = []
    for conditioning, face in ((positive, tokens.cond), (negative, tokens.uncond)):
        entries = []
        for embedding, options in conditioning:
            options = dict(options)
            previous = options.get("control")
            if previous not in copies:
                copies[previous] = control_net.copy().set_cond_hint(hint, strength, (start_percent, end_percent))
                copies[previous].set_previous_controlnet(previous)
            options["control"] = copies[previous]
            options["control_apply_to_uncond"] = False
            options["cross_attn_controlnet"] = face.to(embedding.dtype)
            entries.append([embedding, options])
        result.append(entries)
    return result[0], result[1]
