"""The outline oracle (``oracle.mask_shapes``): the shape read from the object's overlap with ideal masks, which
reads corners where the classifier forgives a round blob asked to be a square (issue 36, item 7)."""

from __future__ import annotations

import pytest
import torch

from devtools.testkit.shapes import data, oracle

CIRCLE, SQUARE, TRIANGLE = (data.SHAPES.index(s) for s in ("circle", "square", "triangle"))


def pictures_of(shape: int, count: int = 64, seed: int = 5):
    return data.draw(count, torch.Generator().manual_seed(seed), shape=torch.full((count,), shape))


def test_the_ideal_masks_cover_the_area_they_are_drawn_for():
    area = torch.tensor([0.12, 0.2, 0.35])
    for index in range(len(data.SHAPES)):
        half = data._extent(torch.full((3,), index), area)
        covered = data.coverage(half, torch.full((3, 2), 0.5), 64)[:, index].mean((-2, -1))
        assert torch.allclose(covered, area, atol=0.01), (data.SHAPES[index], covered)


def test_held_out_pictures_read_as_their_shape():
    pictures = data.held_out(1000)
    assert (oracle.mask_shapes(pictures.images) == pictures.shape).float().mean() >= 0.99


def test_held_out_clips_read_as_their_shape_in_every_frame():
    clips = data.held_out_clips(100)
    assert oracle.mask_shape_accuracy(clips.frames, clips.shape) >= 0.99


def test_a_square_with_its_corners_cut_off_reads_as_a_circle():
    squares = pictures_of(SQUARE)
    half = data._extent(torch.full((len(squares.area),), SQUARE), squares.area)
    disc = data.coverage(half * 1.1, oracle.centroids(squares.images), 16)[:, CIRCLE]  # misses the corners
    background = squares.images.amin((-2, -1), keepdim=True)
    blob = torch.where(disc[:, None] > 0.5, squares.images, background)  # a round blob, no corners
    assert (oracle.mask_shapes(squares.images) == SQUARE).all()
    assert (oracle.mask_shapes(blob) == CIRCLE).float().mean() >= 0.9


def test_the_accuracy_compares_with_the_asked_shape():
    triangles = pictures_of(TRIANGLE, 8)
    assert oracle.mask_shape_accuracy(triangles.images, torch.full((8,), TRIANGLE)) == 1.0
    assert oracle.mask_shape_accuracy(triangles.images, torch.full((8,), SQUARE)) == 0.0


def test_the_evaluation_reports_the_outline_accuracy_per_asked_shape():
    from devtools.testkit.shapes import evaluate

    pictures = data.held_out(60)
    samples = evaluate.Samples(pictures.images, pictures.prompts, latents=None)
    assert evaluate.outline_by_shape(samples) == {"circle": 1.0, "square": 1.0, "triangle": 1.0}
    asked_circle = pictures.shape != TRIANGLE  # the circles, and the squares now asked to be circles
    wrong = evaluate.Samples(pictures.images, [p.replace("square", "circle") for p in pictures.prompts], None)
    expected = (pictures.shape[asked_circle] == CIRCLE).float().mean().item()
    assert evaluate.outline_by_shape(wrong) == {"circle": pytest.approx(expected, abs=1e-4), "triangle": 1.0}
