"""Quality on the trained video model (``wan_shapes``): what StepCache does to a clip, judged by the oracle.

Small and deterministic (issue 36's tests): 24 clips, one per colour and direction with the shapes taken in turn
(every colour, shape and direction asked eight times or more), 20-step euler, CFG 5, through ComfyUI's own
sampler; the same initial noise for every variant. Skipped until ``wan_shapes`` is trained.
"""

from __future__ import annotations

import functools

import pytest

from devtools.testkit.shapes import data, evaluate, models, oracle
from patchlab.nodes import step_cache as sc_nodes

NAME = "wan_shapes"
pytestmark = pytest.mark.skipif(not models.weights_path(NAME).is_file(),
                                reason=f"{NAME} is not trained yet: python -m devtools.testkit.shapes.train {NAME}")

PROMPTS = [data.clip_prompt(c, (c + d) % len(data.SHAPES), d)
           for c in range(len(data.COLOURS)) for d in range(len(data.DIRECTIONS))]
# Issue 36's bar for the model itself (colour, shape, direction).
BAR = {"accuracy_colour": 0.90, "accuracy_shape": 0.75, "accuracy_direction": 0.85}
# Largest drop a speed node at its defaults may cost on each of colour, shape and direction.
ACCURACY_MARGIN = 0.05
# Largest frame-to-frame background change a speed node may add, as a multiple of full compute's.
FLICKER_FACTOR = 1.5


@functools.cache
def trained():
    return models.load(NAME)


@functools.cache
def classifier():
    return oracle.load()


@functools.cache
def full():
    return evaluate.sample(trained(), PROMPTS)


@functools.cache
def full_judged():
    return evaluate.judge(full(), classifier())


@functools.cache
def step_cache_judged():
    model = evaluate.with_defaults(sc_nodes.StepCache, trained().model)
    return evaluate.judge(evaluate.sample(trained(), PROMPTS, model=model), classifier(), full=full())


def test_the_clip_set_asks_every_colour_shape_and_direction():
    colours, shapes, directions = oracle.clip_labels(PROMPTS)
    assert len(PROMPTS) == 24
    assert set(colours.tolist()) == set(range(len(data.COLOURS)))
    assert set(shapes.tolist()) == set(range(len(data.SHAPES)))
    assert set(directions.tolist()) == set(range(len(data.DIRECTIONS)))


def test_uncached_clips_meet_the_bar_for_colour_shape_and_direction():
    result = full_judged()
    assert all(result[key] >= floor for key, floor in BAR.items()), result


@pytest.mark.parametrize("key", ["accuracy_colour", "accuracy_shape", "accuracy_direction"])
def test_step_cache_at_its_defaults_keeps_each_accuracy_within_5_points(key):
    base, cached = full_judged(), step_cache_judged()
    assert cached[key] >= base[key] - ACCURACY_MARGIN, (cached, base)


def test_step_cache_at_its_defaults_flickers_no_more_than_one_and_a_half_times_full_compute():
    base, cached = full_judged(), step_cache_judged()
    assert base["flicker"] is not None and cached["flicker"] is not None, (cached, base)
    assert cached["flicker"] <= FLICKER_FACTOR * base["flicker"], (cached, base)
