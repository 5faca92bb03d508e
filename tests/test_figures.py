"""Charts match their tables and their text: each published chart is drawn from the JSON its table comes from,
and the figures written beside a chart are in that JSON.

A chart is ``bench/figures/X.png`` with its data ``X.json``; ``X.md`` is its table. Pictures of samples (grids)
have no JSON and are listed in PICTURES.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
FIGURES = BENCH / "figures"
PICTURES = {"shapes_grid.png", "shapes_grid_flux.png", "wan_clips.png"}
# The bench that draws each chart (its module's ``redraw(data, name, out)``).
DRAWN_BY = {"run": "run", "caches": "run", "quality_sd15": "quality", "quality_flux": "quality",
            "speed": "speed_summary", "front_flux": "front",
            "front_sd15": "front"}
DOCUMENTS = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "web" / "docs").glob("*.md")])
IMAGE = re.compile(r"!\[[^\]]*\]\(([^)\s]+\.png)\)")
# A figure in a chart's caption: a number with its unit (speed-ups, shares, decibels).
FIGURE = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)\s?(x|%|dB)(?!\w)")

CHARTS = sorted(p.stem for p in FIGURES.glob("*.png") if p.name not in PICTURES)


def bench_module(name: str):
    """A bench script imported as ``bench_<name>`` (its own imports find bench/_common.py)."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    key = f"bench_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


def numbers(data) -> list:
    """Every number in parsed JSON."""
    if isinstance(data, dict):
        return [n for value in data.values() for n in numbers(value)]
    if isinstance(data, list):
        return [n for value in data for n in numbers(value)]
    if isinstance(data, (int, float)) and not isinstance(data, bool):
        return [float(data)]
    return []


def holds(values: list, quoted: str, unit: str) -> bool:
    """Whether a figure quoted with ``len(decimals)`` decimals is one of ``values``, rounded as quoted (a share
    in % may be stored as a fraction)."""
    decimals = len(quoted.partition(".")[2])
    target = float(quoted)
    scales = (1.0, 100.0) if unit == "%" else (1.0,)
    return any(abs(round(v * scale, decimals) - target) < 1e-9 for v in values for scale in scales)


def captions(document: Path):
    """(chart stem, caption) for each chart image in a Markdown file: the caption is the paragraph under it."""
    lines = document.read_text().splitlines()
    for i, line in enumerate(lines):
        for target in IMAGE.findall(line):
            path = (document.parent / target).resolve()
            if path.parent != FIGURES or path.name in PICTURES:
                continue
            caption = []
            for following in lines[i + 1:]:
                if not following.strip() and caption:
                    break
                if following.startswith(("#", "|")) or IMAGE.search(following):
                    break  # a heading, a table (the chart's table is checked whole above) or the next image
                caption.append(following)
            yield path.stem, " ".join(caption)


def test_every_chart_has_the_json_it_is_drawn_from():
    assert CHARTS
    for stem in CHARTS:
        assert (FIGURES / f"{stem}.json").is_file(), f"{stem}.png has no {stem}.json"


@pytest.mark.parametrize("stem", CHARTS)
def test_the_chart_and_its_table_redraw_from_the_json(stem, tmp_path):
    data = json.loads((FIGURES / f"{stem}.json").read_text())
    bench_module(DRAWN_BY[stem]).redraw(data, stem, tmp_path)
    assert (tmp_path / f"{stem}.md").read_text() == (FIGURES / f"{stem}.md").read_text()
    assert (tmp_path / f"{stem}.png").read_bytes() == (FIGURES / f"{stem}.png").read_bytes(), \
        f"bench/figures/{stem}.png was not drawn from {stem}.json: redraw it (bench/README.md)"


def test_the_speed_summary_holds_what_its_sources_hold():
    speed = bench_module("speed_summary")
    assert speed.collect() == json.loads((FIGURES / "speed.json").read_text())


def test_the_withdrawn_768_px_figures_are_in_no_chart():
    run = json.loads((FIGURES / "run.json").read_text())
    assert "sd15 768px" not in run["results"]


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_figures_under_a_chart_are_in_its_json(document):
    for stem, caption in captions(document):
        values = numbers(json.loads((FIGURES / f"{stem}.json").read_text()))
        for quoted, unit in FIGURE.findall(caption):
            assert holds(values, quoted, unit), \
                f"{document.name}: {quoted}{unit} under {stem}.png is not in {stem}.json"


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_chart_a_document_shows_exists(document):
    for target in IMAGE.findall(document.read_text()):
        if not target.startswith("http"):
            assert (document.parent / target).is_file(), f"{document.name} shows {target}, which is missing"


def test_every_help_page_picture_is_shown_by_its_page():
    for picture in (ROOT / "web" / "docs" / "pictures").glob("*.png"):
        page = ROOT / "web" / "docs" / f"{picture.stem}.md"
        assert f"](pictures/{picture.name})" in page.read_text(), f"{page.name} does not show {picture.name}"
