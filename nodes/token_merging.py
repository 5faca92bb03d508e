"""Speed-up nodes: token merging (ToMe) and token downsampling (ToDo) for UNet models."""

from __future__ import annotations

from typing import Union

from ..kernels.token_merging import DOWNSAMPLE_METHODS
from ..patches import token_merging as tm
from ._common import WindowPatchNode, category, check_window, combo_input, first_error, float_input, int_input

DOWNSAMPLES = [1, 2, 4, 8]


class _SpeedNode(WindowPatchNode):
    """What ToMe and ToDo share: the max_downsample check."""

    CATEGORY = category("speed")

    @classmethod
    def VALIDATE_INPUTS(cls, start_percent=None, end_percent=None, max_downsample=None):
        return first_error(check_window(cls, start_percent, end_percent, max_downsample=max_downsample),
                           power_of_two_error(max_downsample))


def max_downsample_input(default: int):
    return int_input(default, 1, 8, (
        "Touch self-attention whose token grid is at most this many times smaller than the latent (1, 2, 4 or 8). 1: "
        "only full resolution (SD1.5's largest, slowest layers; SDXL has none there, so use 2 or 4 for SDXL). Higher "
        "reaches more layers for a little more speed and some quality."), step=1)


def power_of_two_error(value) -> Union[bool, str]:
    """True, or the message for a max_downsample that is not 1, 2, 4 or 8 (None: linked, unknown yet)."""
    if not isinstance(value, int) or value in DOWNSAMPLES:  # None: linked; other types: ComfyUI reports them
        return True
    return f"max_downsample must be 1, 2, 4 or 8, got {value}"


def check_power_of_two(node_id: str, value: int) -> None:
    error = power_of_two_error(value)
    if error is not True:
        raise ValueError(f"{node_id}: {error}")


class TokenMerging(_SpeedNode):
    NODE_ID = "PatchLab_TokenMerging"
    DISPLAY_NAME = "Token Merging (PatchLab)"
    DESCRIPTION = (
        "Token Merging for Stable Diffusion (Bolya & Hoffman 2023, arXiv 2303.17604): before each high-resolution "
        "self-attention, the most similar tokens are averaged together and copied back afterwards, so attention "
        "runs on fewer tokens. Reaches SDXL's layers (max_downsample 2 or 4; ComfyUI's TomePatchModel touches no "
        "SDXL layer), merges keys and values too, takes its random choices from a seeded generator (the sampler's "
        "noise is never disturbed), and keeps cond and uncond merged alike. UNet models (SD1.x, SD2.x, SDXL)."
    )
    WHAT = "token merging"
    OPTIONS = {
        "ratio": float_input(0.3, 0.0, 0.9, 0.01, (
            "Share of the tokens merged away in each touched layer. 0 disables it; 0.3-0.5 keeps quality well "
            "(see the help page for measured speed-ups); above 0.6 details blur.")),
        "max_downsample": max_downsample_input(1),
        "stride_x": int_input(2, 1, 8, (
            "Width of the cells that each keep one destination token. 2 (with stride_y 2) keeps one in four "
            "tokens as a destination; larger strides allow more merging.")),
        "stride_y": int_input(2, 1, 8, "Height of the cells that each keep one destination token."),
        "destinations": combo_input(["random", "deterministic"], "random", (
            "random: a seeded random token of each cell is the destination (varies per layer and step, better "
            "quality); deterministic: the top-left token (ComfyUI's with no randomness).")),
        "seed": int_input(0, 0, 2**31 - 1,
                          "Seed of the random destinations. Independent of the sampler's seed and noise."),
        "metric": combo_input(["input", "query"], "input", (
            "What similarity is measured on: input, the normalised block input (ComfyUI's choice); query, the "
            "attention's query projection (one extra projection per layer).")),
        "merge": combo_input(["queries, keys and values", "queries only"], "queries, keys and values", (
            "queries, keys and values: attention runs on the merged tokens only (tomesd, fastest). queries only: "
            "merged queries attend to all tokens (ComfyUI's TomePatchModel).")),
    }

    def patch(self, model, ratio, max_downsample, stride_x, stride_y, destinations, seed, metric, merge,
              start_percent, end_percent):
        check_power_of_two(self.NODE_ID, max_downsample)
        window = self.window(model, start_percent, end_percent)
        return (tm.with_tome(model, self.NODE_ID, ratio, max_downsample, stride_x, stride_y,
                             destinations == "random", seed, metric, merge != "queries only", window),)


class TokenDownsampling(_SpeedNode):
    NODE_ID = "PatchLab_TokenDownsampling"
    DISPLAY_NAME = "Token Downsampling (PatchLab)"
    DESCRIPTION = (
        "Token Downsampling (ToDo, Smith et al. 2024, arXiv 2402.13573): every query of a high-resolution "
        "self-attention is kept, but keys and values come from a grid downsampled by downsample_factor, so the "
        "attention shrinks by about factor^2 with no similarity search. Faster than ToMe at the same quality on "
        "large images. Handles any latent size and aspect ratio. UNet models (SD1.x, SD2.x, SDXL)."
    )
    WHAT = "token downsampling"
    OPTIONS = {
        "downsample_factor": float_input(2.0, 1.0, 8.0, 0.25, (
            "How much coarser the key/value grid is. 1 disables it; 2 is the paper's default (4x fewer keys); 3-4 "
            "for very large images.")),
        "max_downsample": max_downsample_input(1),
        "method": combo_input(DOWNSAMPLE_METHODS, "nearest-exact", (
            "How keys/values are downsampled: nearest-exact (the paper's, fastest), area (average), bilinear, "
            "max.")),
    }

    def patch(self, model, downsample_factor, max_downsample, method, start_percent, end_percent):
        check_power_of_two(self.NODE_ID, max_downsample)
        if method not in DOWNSAMPLE_METHODS:
            raise ValueError(f"{self.NODE_ID}: method must be one of {', '.join(DOWNSAMPLE_METHODS)}, got {method!r}")
        window = self.window(model, start_percent, end_percent)
        return (tm.with_todo(model, self.NODE_ID, downsample_factor, max_downsample, method, window),)


NODES = [TokenMerging, TokenDownsampling]
