"""The trained reference models: layouts, word-table text encoder, RGB latent map, loading.

Three models, each built from ComfyUI's own classes and trained by ``devtools.testkit.shapes.train``
on ``devtools.testkit.shapes.data``:

- ``sd15_shapes``: an SD1.5-layout UNet (eps prediction, transformers at /1, /2, /4, none
  at /8, middle depth 1), 4-channel latent;
- ``flux_shapes``: a Flux-layout DiT (velocity, double then single stream blocks, 2x2
  patches, no guidance embedding: it is sampled with real CFG), 16-channel latent;
- ``wan_shapes``: ComfyUI's ``WanModel`` in the Wan 2.1 text-to-video layout (velocity with
  Wan's shift 8, 1x2x2 patches, self-attention over all frames, cross-attention to the text),
  16-channel video latent [B, 16, T, h, w], trained on clips (``data.draw_clips``) named
  ``"<colour> <shape> moving <direction>"``.

The "text encoder" is a table of one vector per known word (stored in the weights file);
a prompt becomes ``TOKENS`` vectors: its known words in order, then the padding vector.
Unknown words are left out, so ``"a red circle"`` means ``"red circle"`` and ``""`` is
the unconditional prompt the models were trained with. The video model knows the motion
words too (``VIDEO_VOCABULARY``); the image models leave them out.

The "VAE" is a fixed orthonormal map between RGB and the latent channels, so a latent
decodes to its 16x16 picture exactly; decoding then upscales it 8x (nearest). Internal
latents (what the network sees, after the model's ``latent_format.process_in``) are
``A @ (2 * rgb - 1)`` per pixel with A [C, 3], ``A^T A = I``; a video latent [B, C, T, h, w]
maps frame by frame and decodes to B*T pictures, clip-major (as the test kit's VAE does).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import comfy.model_management
import comfy.model_patcher
import comfy.supported_models
import torch
import torch.nn.functional as F

from .. import tiny_models
from . import data

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
TOKENS = 8
PAD = "<pad>"
VOCABULARY = (PAD,) + data.COLOUR_NAMES + data.SHAPES
VIDEO_VOCABULARY = VOCABULARY + ("moving",) + data.DIRECTIONS  # appended: the image words keep their rows
VAE_FACTOR = 8


class _SD15Shapes(comfy.supported_models.SD15):
    unet_extra_config = {"num_heads": 4, "num_head_channels": -1}


class _FluxShapes(comfy.supported_models.Flux):
    pass


class _WanShapes(comfy.supported_models.WAN21_T2V):
    """Wan 2.1 t2v as ComfyUI detects it: ``model_base.WAN21`` (ModelType.FLOW, shift 8), ``latent_formats.Wan21``."""


@dataclass(frozen=True)
class Spec:
    name: str
    config_class: type
    unet_config: Dict
    context_dim: int
    latent_channels: int
    pooled_dim: Optional[int] = None
    lr: float = 3e-4
    default_cfg: float = 5.0
    vocabulary: Tuple[str, ...] = VOCABULARY
    frames: int = 0  # latent frames of a clip ([B, C, T, h, w]); 0 for the image models
    flow_t: str = "logit-normal"  # how flow models draw the training time t before the schedule's shift (train.py)


SPECS = {
    "sd15_shapes": Spec(
        name="sd15_shapes", config_class=_SD15Shapes, context_dim=64, latent_channels=4,
        # the test kit's tiny SD1.5 layout (transformers at /1, /2, /4, context 64) at widths
        # 64/64/128/128: ComfyUI's UNet normalises in 32 groups, so at the test kit's width 32 the
        # output GroupNorm is a per-channel instance norm that removes every channel's spatial mean,
        # and the network cannot predict the mean of the noise; the mean colour of a sample was then
        # off by sigma_max / 16 (0.9 at SD1.5's sigma 14.6) and only 44 % of colours came out right.
        unet_config={**tiny_models.LAYOUTS["sd15"].unet_config, "model_channels": 64, "channel_mult": [1, 1, 2, 2]},
    ),
    "flux_shapes": Spec(
        name="flux_shapes", config_class=_FluxShapes, context_dim=64, latent_channels=16, pooled_dim=64,
        unet_config={"image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 64,
                     "context_in_dim": 64, "hidden_size": 192, "mlp_ratio": 4.0, "num_heads": 6,
                     "depth": 2, "depth_single_blocks": 4, "axes_dim": [8, 12, 12], "theta": 10000,
                     "patch_size": 2, "qkv_bias": True, "guidance_embed": False},
    ),
    # 8 blocks of width 128 (4 heads of 32; rotary split 12/10/10 over frames, rows, columns), feed-forward 512:
    # 2.31M parameters over 256 tokens per clip (4 x 8 x 8). One training step of 16 clips on one idle thread:
    # 0.86 s, 3.0 times a flux_shapes step measured beside it (width 192 and 6 blocks, 3.95M: 1.19 s, 4.2 times).
    "wan_shapes": Spec(
        name="wan_shapes", config_class=_WanShapes, context_dim=64, latent_channels=16,
        vocabulary=VIDEO_VOCABULARY, frames=data.FRAMES,
        # Wan's shift 8 moves a logit-normal t so far up that 2 % of the draws fall below sigma 0.5 and none below
        # 0.09, where 20 normal-scheduler steps end (0.50, 0.34, 0.06); a uniform t through the same shift visits
        # the sigmas as those steps do.
        flow_t="uniform",
        unet_config={"image_model": "wan2.1", "model_type": "t2v", "patch_size": (1, 2, 2), "in_dim": 16,
                     "out_dim": 16, "dim": 128, "ffn_dim": 512, "freq_dim": 256, "text_dim": 64, "num_heads": 4,
                     "num_layers": 8, "window_size": (-1, -1), "qk_norm": True, "cross_attn_norm": True,
                     "eps": 1e-6},
    ),
}
NAMES = tuple(SPECS)
IMAGE_NAMES = tuple(n for n, s in SPECS.items() if not s.frames)
VIDEO_NAMES = tuple(n for n, s in SPECS.items() if s.frames)


def spec(name: str) -> Spec:
    if name not in SPECS:
        raise ValueError(f"unknown trained model {name!r}; expected one of {', '.join(SPECS)}")
    return SPECS[name]


def build(name: str, dtype: torch.dtype = torch.float32) -> comfy.model_patcher.ModelPatcher:
    """The model with uninitialised weights, in a real ModelPatcher (train or load into it)."""
    s = spec(name)
    config = s.config_class(tiny_models._unet_config(s))  # completed for newer ComfyUI releases
    config.set_inference_dtype(dtype, None)
    model = config.get_model({})
    model.to(dtype)
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


# -- text -------------------------------------------------------------------------------------------

def words(text: str, vocabulary: Sequence[str] = VOCABULARY) -> List[str]:
    """The known words of a prompt, in order (case and punctuation ignored, at most TOKENS)."""
    return [w for w in re.findall(r"[a-z<>]+", text.lower()) if w in vocabulary and w != PAD][:TOKENS]


def word_table(name: str, seed: int = 0) -> torch.Tensor:
    """The initial word vectors [len(vocabulary), context_dim] (unit RMS; stored with the weights)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(len(spec(name).vocabulary), spec(name).context_dim, generator=generator)


def encode_words(table: torch.Tensor, prompts: Sequence[Sequence[str]],
                 vocabulary: Sequence[str] = VOCABULARY) -> torch.Tensor:
    """Word lists -> context [B, TOKENS, D]: the words' vectors, then the padding vector."""
    index = torch.zeros(len(prompts), TOKENS, dtype=torch.long)
    for row, prompt_words in enumerate(prompts):
        ids = [vocabulary.index(w) for w in prompt_words][:TOKENS]
        index[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
    return table[index]


def pooled(context: torch.Tensor) -> torch.Tensor:
    """The pooled vector [B, D] the Flux layout takes: the mean of the context tokens."""
    return context.mean(1)


# -- latent <-> RGB ---------------------------------------------------------------------------------

def rgb_basis(channels: int) -> torch.Tensor:
    """A [channels, 3] matrix with orthonormal columns: the first three DCT-II vectors over the channels."""
    n = torch.arange(channels, dtype=torch.float64)
    columns = [torch.full((channels,), 1 / math.sqrt(channels), dtype=torch.float64)]
    for k in (1, 2):
        columns.append(math.sqrt(2 / channels) * torch.cos(math.pi * (n + 0.5) * k / channels))
    return torch.stack(columns, 1).float()


def rgb_to_internal(images: torch.Tensor, channels: int) -> torch.Tensor:
    """[B, 3, h, w] (or clips [B, 3, T, h, w]) RGB in 0-1 -> [B, C, h, w] ([B, C, T, h, w]) as the network sees it."""
    return torch.einsum("br...,cr->bc...", images * 2 - 1, rgb_basis(channels).to(images))


def internal_to_rgb(latent: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] (or [B, C, T, h, w]) internal latent -> [B, 3, h, w] ([B, 3, T, h, w]) RGB clamped to 0-1."""
    basis = rgb_basis(latent.shape[1]).to(latent)
    return ((torch.einsum("bc...,cr->br...", latent, basis) + 1) / 2).clamp(0, 1)


def clips_to_internal(frames: torch.Tensor, channels: int) -> torch.Tensor:
    """Clips [B, T, 3, h, w] (``data.Clips.frames``) -> video latent [B, C, T, h, w] as the network sees it."""
    return rgb_to_internal(frames.movedim(1, 2), channels)


# -- weights ----------------------------------------------------------------------------------------

def weights_path(name: str) -> Path:
    return WEIGHTS_DIR / f"{name}.safetensors"


def manifest_path(name: str) -> Path:
    return WEIGHTS_DIR / f"{name}.json"


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


STORED_DTYPE = torch.float16  # half the file of fp32; loaded back as fp32


def save(name: str, diffusion_model: torch.nn.Module, table: torch.Tensor, path: Optional[Path] = None) -> Path:
    """Write the network's weights (fp16) and the word table (fp32) as one safetensors file."""
    from safetensors.torch import save_file

    path = Path(path) if path is not None else weights_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"diffusion_model.{k}": v.detach().to(STORED_DTYPE).contiguous()
               for k, v in diffusion_model.state_dict().items()}
    tensors["text_encoder.words"] = table.detach().float().contiguous()
    save_file(tensors, str(path), metadata={"model": name, "vocabulary": json.dumps(spec(name).vocabulary)})
    return path


def manifest(name: str) -> Dict:
    path = manifest_path(name)
    if not path.is_file():
        raise RuntimeError(f"{path} is missing: train the model with `python -m devtools.testkit.shapes.train {name}`")
    return json.loads(path.read_text())


@dataclass
class Trained:
    """A loaded trained model: the ModelPatcher, its word table and its latent channels."""

    name: str
    model: comfy.model_patcher.ModelPatcher
    table: torch.Tensor

    def encode(self, text: str) -> List:
        """A prompt -> ComfyUI CONDITIONING [[context [1, TOKENS, D], extras]]."""
        vocabulary = spec(self.name).vocabulary
        context = encode_words(self.table, [words(text, vocabulary)], vocabulary)
        extras = {}
        if spec(self.name).pooled_dim is not None:
            extras["pooled_output"] = pooled(context)
        return [[context, extras]]

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """LATENT [B, C, h, w] -> IMAGE [B, 8h, 8w, 3] in 0-1; a video LATENT [B, C, T, h, w] -> B*T frames,
        clip-major (the latent format maps the 5-D latent: Wan's per-channel mean and std are [1, C, 1, 1, 1])."""
        internal = self.model.model.latent_format.process_in(latent.float())
        rgb = internal_to_rgb(internal)
        if rgb.ndim == 5:
            rgb = rgb.movedim(2, 1).flatten(0, 1)
        return F.interpolate(rgb, scale_factor=VAE_FACTOR, mode="nearest").permute(0, 2, 3, 1).contiguous()

    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """IMAGE [B, H, W, 3] -> LATENT [B, C, H/8, W/8] (mean over each 8x8 cell); for the video model the
        pictures are the frames of one clip: LATENT [1, C, B, H/8, W/8], as a video VAE encodes a clip."""
        rgb = F.avg_pool2d(pixels[..., :3].float().permute(0, 3, 1, 2), VAE_FACTOR, ceil_mode=True)
        if spec(self.name).frames:
            rgb = rgb.movedim(0, 1)[None]  # [1, 3, T, h, w]
        internal = rgb_to_internal(rgb, spec(self.name).latent_channels)
        return self.model.model.latent_format.process_out(internal)


def load(name: str, path: Optional[Path] = None, check: bool = True) -> Trained:
    """The committed model (its hash checked against the manifest unless ``check`` is False)."""
    from safetensors.torch import load_file

    path = Path(path) if path is not None else weights_path(name)
    if not path.is_file():
        raise RuntimeError(f"{path} is missing: train the model with `python -m devtools.testkit.shapes.train {name}`")
    if check:
        expected = manifest(name).get("sha256")
        if expected != sha256(path):
            raise RuntimeError(f"{path} does not match the sha256 in {manifest_path(name)}: "
                               "retrain it or update the manifest with the training command")
    tensors = load_file(str(path))
    table = tensors.pop("text_encoder.words")
    patcher = build(name)
    state = {k[len("diffusion_model."):]: v.float() for k, v in tensors.items()}
    # ComfyUI's own key conversion for the family, as its loader applies it (newer releases call the
    # qk-norm gain of Flux ``weight`` where 0.3.75, which wrote these files, calls it ``scale``).
    state = patcher.model.model_config.process_unet_state_dict(state)
    patcher.model.diffusion_model.load_state_dict(state, strict=True)
    return Trained(name, patcher, table)


def untrained(name: str, seed: int = 0) -> Trained:
    """The model with seeded random weights and word table (what a first training step starts from, output layer
    not zeroed): for checking that code runs before the model is trained; its samples mean nothing."""
    patcher = build(name)
    tiny_models.randomize(patcher.model.diffusion_model, seed)
    return Trained(name, patcher, word_table(name, seed))
