"""The procedural image set the reference models are trained on."""

from __future__ import annotations

import torch

from devtools.testkit.shapes import data


def pictures(count=512, seed=3):
    return data.draw(count, torch.Generator().manual_seed(seed))


def test_prompts_name_the_colour_and_the_shape():
    b = pictures(64)
    for prompt, colour, shape in zip(b.prompts, b.colour, b.shape):
        assert prompt == f"{data.COLOUR_NAMES[colour]} {data.SHAPES[shape]}"


def test_the_background_is_dark_in_every_channel():
    b = pictures()
    border = torch.cat([b.images[..., 0, :], b.images[..., -1, :], b.images[..., :, 0], b.images[..., :, -1]], -1)
    assert border.max() <= data.BACKGROUND_MAX


def test_the_object_covers_ten_to_forty_percent_of_the_picture():
    b = pictures()
    assert b.coverage.min() >= 0.10 and b.coverage.max() <= 0.40


def test_the_object_has_the_colour_its_prompt_names():
    n = len(data.COLOURS)
    images, mask = data.render(colour=torch.arange(n), shape=torch.full((n,), data.SHAPES.index("square")),
                               area=torch.full((n,), 0.3), centre=torch.full((n, 2), 0.5),
                               background=torch.full((n, 3), 0.1), gradient=torch.zeros(n, 2),
                               jitter=torch.zeros(n, 3))
    for i, name in enumerate(data.COLOUR_NAMES):
        assert mask[i, 0, 8, 8] == 1
        assert torch.allclose(images[i, :, 8, 8], torch.tensor(data.COLOURS[name]))


def test_every_colour_and_shape_occurs():
    b = pictures(2000)
    assert set(b.colour.tolist()) == set(range(len(data.COLOURS)))
    assert set(b.shape.tolist()) == set(range(len(data.SHAPES)))


def test_the_same_seed_draws_the_same_pictures_and_another_seed_others():
    assert torch.equal(pictures(seed=5).images, pictures(seed=5).images)
    assert not torch.equal(pictures(seed=5).images, pictures(seed=6).images)


def test_the_stream_is_endless_and_seeded():
    first = [b.images for _, b in zip(range(3), data.stream(8, seed=1))]
    again = [b.images for _, b in zip(range(3), data.stream(8, seed=1))]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], first[1])


def test_pictures_can_be_drawn_at_other_sizes():
    b = data.draw(4, torch.Generator().manual_seed(0), size=32)
    assert b.images.shape == (4, 3, 32, 32)
    assert b.coverage.min() >= 0.10 and b.coverage.max() <= 0.40
