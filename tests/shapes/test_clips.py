"""The procedural clip set the video reference model is trained on, and the oracle that judges clips."""

from __future__ import annotations

import functools

import pytest
import torch

from devtools.testkit.shapes import data, oracle


def clips(count=512, seed=3):
    return data.draw_clips(count, torch.Generator().manual_seed(seed))


@functools.cache
def every_prompt():
    """One clip of each of the 72 prompts."""
    c, s, d = torch.meshgrid(torch.arange(len(data.COLOURS)), torch.arange(len(data.SHAPES)),
                             torch.arange(len(data.DIRECTIONS)), indexing="ij")
    return data.draw_clips(c.numel(), torch.Generator().manual_seed(11), colour=c.flatten(), shape=s.flatten(),
                           direction=d.flatten())


def test_a_clip_is_four_frames_of_16x16_pictures():
    b = clips(8)
    assert b.frames.shape == (8, data.FRAMES, 3, 16, 16) and data.FRAMES == 4
    assert b.centre.shape == (8, 4, 2)


def test_the_prompts_name_colour_shape_and_direction_and_all_72_occur():
    b = clips(2000)
    for prompt, colour, shape, direction in zip(b.prompts, b.colour, b.shape, b.direction):
        assert prompt == f"{data.COLOUR_NAMES[colour]} {data.SHAPES[shape]} moving {data.DIRECTIONS[direction]}"
    assert len(set(b.prompts)) == 72
    assert len(set(every_prompt().prompts)) == 72


def test_the_object_moves_in_a_straight_line_at_constant_speed_in_its_direction():
    b = clips()
    travel = b.centre[:, -1] - b.centre[:, 0]
    expected = data.STEPS[b.direction]  # (x, y); y points down the picture
    along = (travel * expected).sum(-1)
    assert torch.allclose(travel, along[:, None] * expected, atol=1e-6)  # nothing across the direction
    steps = b.centre[:, 1:] - b.centre[:, :-1]
    assert torch.allclose(steps, steps[:, :1].expand_as(steps), atol=1e-6)
    for name, (dx, dy) in zip(data.DIRECTIONS, ((-1, 0), (1, 0), (0, -1), (0, 1))):
        picked = b.direction == data.DIRECTIONS.index(name)
        assert picked.any()
        assert (torch.sign(travel[picked]) == torch.tensor([dx, dy], dtype=torch.float32)).all()


def test_the_centre_travels_a_quarter_to_a_half_of_the_side():
    along = (clips().centre[:, -1] - clips().centre[:, 0]).abs().amax(-1)
    assert along.min() >= data.TRAVEL_RANGE[0] - 1e-6 and along.max() <= data.TRAVEL_RANGE[1] + 1e-6
    assert along.min() >= 0.25


def test_the_object_stays_whole_inside_every_frame():
    b = clips()
    f = b.frames
    border = torch.cat([f[..., 0, :], f[..., -1, :], f[..., :, 0], f[..., :, -1]], -1)
    assert border.max() <= data.BACKGROUND_MAX
    first_cover = b.coverage[:, :1]
    assert torch.allclose(b.coverage, first_cover.expand_as(b.coverage), atol=0.02)  # nothing cut off


def test_sizes_are_the_pictures_as_far_as_the_travel_allows():
    b = clips(2000)
    assert b.area.min() >= data.AREA_RANGE[0] and b.area.max() <= data.AREA_RANGE[1]
    assert (b.area <= data.max_clip_area(b.shape) + 1e-6).all()
    assert b.coverage.min() >= 0.10 and b.coverage.max() <= 0.40
    assert b.area[b.shape == data.SHAPES.index("square")].max() > 0.33  # squares keep the pictures' range


def test_the_background_stays_still():
    b = clips(64)
    near = torch.nn.functional.max_pool2d(oracle.foreground(b.frames).amax(1, keepdim=True), 3, 1, 1)
    far = near[:, 0] == 0  # never next to the object in any frame
    change = (b.frames[:, 1:] - b.frames[:, :-1]).abs().amax((1, 2))
    assert change[far].max() == 0


def test_labels_can_be_fixed():
    b = every_prompt()
    assert b.prompts[0] == "red circle moving left" and b.prompts[-1] == "white triangle moving down"


def test_the_same_seed_draws_the_same_clips_and_another_seed_others():
    assert torch.equal(clips(seed=5).frames, clips(seed=5).frames)
    assert not torch.equal(clips(seed=5).frames, clips(seed=6).frames)
    first = [b.frames for _, b in zip(range(2), data.clip_stream(4, seed=1))]
    again = [b.frames for _, b in zip(range(2), data.clip_stream(4, seed=1))]
    assert all(torch.equal(a, b) for a, b in zip(first, again)) and not torch.equal(first[0], first[1])


# -- the clip oracle --------------------------------------------------------------------------------

@functools.cache
def classifier():
    return oracle.load()


def test_the_oracle_reads_colour_shape_and_direction_of_every_prompt_right():
    b = every_prompt()
    accuracy = oracle.clip_accuracy(classifier(), b.frames, b.colour, b.shape, b.direction)
    assert accuracy == {"colour": 1.0, "shape": 1.0, "direction": 1.0, "all": 1.0}


def test_the_oracle_reads_288_random_clips_right():
    b = clips(288, seed=21)
    accuracy = oracle.clip_accuracy(classifier(), b.frames, b.colour, b.shape, b.direction)
    assert accuracy["colour"] == 1.0 and accuracy["direction"] == 1.0 and accuracy["shape"] >= 0.99, accuracy


def test_a_clip_played_backwards_reads_the_opposite_direction_and_a_still_one_none():
    b = every_prompt()
    backwards = oracle.directions(b.frames.flip(1))
    opposite = torch.tensor([1, 0, 3, 2])[b.direction]
    assert torch.equal(backwards, opposite)
    still = b.frames[:, :1].expand_as(b.frames)
    assert (oracle.directions(still) == -1).all()
    assert (oracle.directions(torch.zeros_like(b.frames)) == -1).all()  # no object at all


def test_the_centroid_is_the_objects_centre():
    b = clips(64)
    squares = b.shape != data.SHAPES.index("triangle")  # a triangle's centroid sits below its box's centre
    found = oracle.centroids(b.frames)
    assert (found[squares] - b.centre[squares]).abs().max() < 0.5 / 16  # within half a pixel


def test_the_frames_majority_decides_colour_and_shape():
    b = every_prompt()
    frames = b.frames.clone()
    frames[:, 0] = frames[torch.roll(torch.arange(len(frames)), 1), 0]  # one frame of four from another clip
    read = oracle.read_clips(classifier(), frames)
    assert torch.equal(read["colour"], b.colour) and torch.equal(read["shape"], b.shape)


def test_flicker_is_zero_on_real_clips_and_measures_a_changing_background():
    b = clips(64)
    assert oracle.flicker(b.frames).max() < 1e-6
    flickering = b.frames.clone()
    flickering[:, 1::2] = (flickering[:, 1::2] + 0.05).clamp(max=1)  # every other frame 0.05 brighter
    values = oracle.flicker(flickering)
    assert values.min() > 0.045 and values.max() < 0.055
    assert oracle.flicker(torch.ones(2, 4, 3, 16, 16)).isnan().all()  # no background to measure


@pytest.mark.parametrize("prompt,expected", [("red circle moving left", (0, 0, 0)),
                                             ("white triangle moving down", (5, 2, 3))])
def test_clip_labels_parse_the_prompt(prompt, expected):
    colour, shape, direction = oracle.clip_labels([prompt])
    assert (int(colour), int(shape), int(direction)) == expected
