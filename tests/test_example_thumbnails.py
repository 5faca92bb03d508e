"""example_workflows/*.jpg: the thumbnails ComfyUI's template browser shows (scripts/build_thumbnails.py)."""

from pathlib import Path

import pytest
from PIL import Image

EXAMPLE_DIR = Path(__file__).resolve().parent.parent / "example_workflows"
WORKFLOWS = sorted(EXAMPLE_DIR.glob("*.json"))
THUMBNAILS = sorted(EXAMPLE_DIR.glob("*.jpg"))
REBUILD = "run .venv/bin/python scripts/build_thumbnails.py"


def test_every_example_workflow_has_a_same_name_jpg():
    missing = [p.name for p in WORKFLOWS if not p.with_suffix(".jpg").is_file()]
    assert not missing, f"{missing}: {REBUILD}"


def test_no_jpg_without_its_workflow():
    orphans = [p.name for p in THUMBNAILS if not p.with_suffix(".json").is_file()]
    assert not orphans, f"{orphans}: remove them or {REBUILD}"


@pytest.mark.parametrize("path", THUMBNAILS, ids=lambda p: p.stem)
def test_thumbnail_is_a_jpeg_at_most_512x384_and_at_least_128_wide(path):
    with Image.open(path) as image:
        assert image.format == "JPEG"
        image.load()  # decodes the whole file: a truncated one fails here
        width, height = image.size
    assert 128 <= width <= 512 and height <= 384, f"{path.name} is {width}x{height}"


@pytest.mark.parametrize("path", THUMBNAILS, ids=lambda p: p.stem)
def test_thumbnail_is_under_60_kb(path):
    assert path.stat().st_size < 60 * 1024, f"{path.name} is {path.stat().st_size} bytes"
