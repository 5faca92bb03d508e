"""example_workflows/*.jpg: the thumbnails ComfyUI's template browser shows (scripts/build_thumbnails.py)."""

import importlib.util
import json
from pathlib import Path

import pytest
from PIL import Image

from devtools import workflows

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


def build_thumbnails():
    path = EXAMPLE_DIR.parent / "scripts" / "build_thumbnails.py"
    spec = importlib.util.spec_from_file_location("build_thumbnails", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_wan21_video_workflow_shows_the_demos_frames_once_wan_shapes_is_trained(tmp_path, monkeypatch):
    thumbnails = build_thumbnails()
    workflow = json.loads((EXAMPLE_DIR / "step_cache_wan21.json").read_text())
    monkeypatch.setattr(workflows, "TRAINED_WEIGHTS", tmp_path)
    assert thumbnails.trained_model(workflow) is None  # until then: its graph
    (tmp_path / "wan_shapes.safetensors").write_bytes(b"")
    assert thumbnails.trained_model(workflow) == "wan_shapes"
    folder = tmp_path / "demo" / "step_cache_wan21"
    folder.mkdir(parents=True)
    colours = [(230, 40, 40), (40, 190, 50), (50, 80, 240), (240, 240, 240)]
    frames = [Image.new("RGB", (128, 128), colour) for colour in colours]
    frames[0].save(folder / "clip.webp", save_all=True, append_images=frames[1:], duration=62, lossless=True)
    images = thumbnails.demo_images(tmp_path / "demo", "step_cache_wan21")
    picture = thumbnails.demo_thumbnail("step_cache_wan21", images, "wan_shapes")
    assert set(colours) <= {colour for _, colour in picture.getcolors(1 << 20)}  # every frame is a tile
