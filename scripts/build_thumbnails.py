"""Write example_workflows/<name>.jpg beside every example workflow, for ComfyUI's template browser.

A workflow the demo (scripts/demo.py) runs on a trained reference model (sd15_shapes,
flux_shapes, or wan_shapes once trained) gets the demo's own output: the images in
``demo_output/<name>/`` (an animation's frames), up to 4, tiled and upscaled with
nearest-neighbour. Every other workflow runs on random-weight stand-ins whose pictures
are noise, so it gets a drawing of its graph instead, made from the workflow file: nodes
at their editor positions, PatchLab nodes in the accent colour.

Run with the project's venv, after the demo (scripts/demo.sh) for the pictures:
    .venv/bin/python scripts/build_thumbnails.py [--demo demo_output] [--require-demo]

Pillow only; the same inputs give byte-identical files. The captions assume the demo ran
on the test kit (the default), not on your own --checkpoint.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from PIL import Image, ImageDraw, ImageFont, ImageSequence

sys.path.append(str(Path(__file__).resolve().parent.parent))  # appended: never ahead of ComfyUI (its nodes.py)

# Only json/pathlib at import time: no ComfyUI or torch needed.
from devtools import workflows  # noqa: E402

WIDTH, HEIGHT = 512, 384
BAND = 30  # caption band at the bottom
QUALITY = 85
MAX_TILES = 4
GAP = 4

BACKGROUND = (24, 26, 34)  # web/icon.png's background
BAND_COLOUR = (12, 13, 18)
CAPTION_TEXT = (240, 240, 240)
CAPTION_NOTE = (160, 166, 184)
NODE_FILL = (58, 62, 76)
NODE_TITLE = (44, 47, 58)
NODE_BORDER = (90, 96, 120)  # web/icon.png's frame
NODE_TEXT = (214, 218, 228)
ACCENT = (51, 77, 242)  # web/icon.png's blue square: PatchLab nodes
ACCENT_TITLE = (36, 56, 190)
ACCENT_TEXT = (255, 255, 255)
LINK = (128, 134, 152)

SUPERSAMPLE = 2  # the graph is drawn at twice the size and reduced, which smooths lines and text
TITLE_HEIGHT = 30  # LiteGraph draws a node's title bar above its ``pos``
SLOT_HEIGHT = 20  # and its slots 20 px apart, the first centred 10 px below ``pos``
MAX_STRETCH = 1.5  # at most this much taller than the editor's proportions
PACK_PREFIX = "PatchLab_"


# --- which workflows show the demo's pictures ---------------------------------------

def trained_model(workflow: Dict) -> Optional[str]:
    """The trained reference model the demo runs ``workflow`` on, or None for random-weight stand-ins.

    The rule of ``workflows.use_testkit(prompt, trained=True)``, read from the editor file:
    a CheckpointLoaderSimple or UNETLoader (not a note, not muted: ``ui_to_api`` drops those)
    whose file name ``workflows.trained_stand_in`` maps to a trained model (the video model
    only once its weights are committed). The file name is the loader's first widget, so
    ``widgets_values[0]``.
    """
    for node in workflow["nodes"]:
        if node["type"] not in ("CheckpointLoaderSimple", "UNETLoader") or node.get("mode", 0) == 2:
            continue
        values = node.get("widgets_values") or []
        if values and isinstance(values[0], str) and workflows.trained_stand_in(node["type"], values[0]):
            return workflows.trained_stand_in(node["type"], values[0])
    return None


def demo_images(demo: Path, stem: str) -> List[Path]:
    """The images the demo saved for workflow ``stem``, at most MAX_TILES.

    Those its last run lists in summary.json (an older run's files may share the folder),
    else, for a workflow that run left out (``--workflows``), the folder's PNGs and WEBPs.
    """
    folder = demo / stem
    summary_path = demo / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    if stem in summary:
        # Absolute paths on the machine that ran the demo: keep the file names.
        listed = [folder / Path(name).name for name in summary[stem].get("images", [])]
        return [path for path in listed if path.is_file()][:MAX_TILES]
    return sorted([*folder.glob("*.png"), *folder.glob("*.webp")])[:MAX_TILES]


# --- drawing ---------------------------------------------------------------------------

def font(size: int) -> ImageFont.ImageFont:
    """Pillow's bundled font (the same glyphs on every machine with the same Pillow)."""
    return ImageFont.load_default(size)


def text_width(draw: ImageDraw.ImageDraw, text: str, face: ImageFont.ImageFont) -> float:
    return draw.textlength(text, font=face)


def fit_text(draw: ImageDraw.ImageDraw, text: str, face: ImageFont.ImageFont, width: float) -> str:
    """``text``, cut short with an ellipsis if it is wider than ``width``."""
    if text_width(draw, text, face) <= width:
        return text
    while text and text_width(draw, text + "…", face) > width:
        text = text[:-1]
    return text + "…"


def caption(canvas: Image.Image, name: str, note: str) -> None:
    """The band along the bottom: the workflow's name, then what the picture shows."""
    draw = ImageDraw.Draw(canvas)
    top = HEIGHT - BAND
    draw.rectangle((0, top, WIDTH, HEIGHT), fill=BAND_COLOUR)
    title_face, note_face = font(15), font(11)
    name = fit_text(draw, name, title_face, WIDTH - 16)
    draw.text((8, top + BAND / 2), name, font=title_face, fill=CAPTION_TEXT, anchor="lm")
    used = 8 + text_width(draw, name, title_face) + 12
    room = WIDTH - 8 - used
    if room > 40:
        note = fit_text(draw, note, note_face, room)
        draw.text((WIDTH - 8, top + BAND / 2 + 1), note, font=note_face, fill=CAPTION_NOTE, anchor="rm")


def tile_grid(sizes: List[Tuple[int, int]], width: int, height: int) -> Tuple[int, int, float]:
    """(columns, rows, covered area) of the grid that shows ``sizes`` largest in ``width`` x ``height``."""
    best = (1, len(sizes), -1.0)
    for columns in range(1, len(sizes) + 1):
        rows = math.ceil(len(sizes) / columns)
        cell_w, cell_h = (width - GAP * (columns - 1)) / columns, (height - GAP * (rows - 1)) / rows
        area = sum(min(cell_w / w, cell_h / h) ** 2 * w * h for w, h in sizes)
        if area > best[2]:
            best = (columns, rows, area)
    return best


def scaled(image: Image.Image, width: float, height: float) -> Image.Image:
    """``image`` as large as fits in ``width`` x ``height``: nearest-neighbour up (crisp pixels), Lanczos down."""
    factor = min(width / image.width, height / image.height)
    size = (max(1, int(image.width * factor)), max(1, int(image.height * factor)))
    return image.resize(size, Image.NEAREST if factor >= 1 else Image.LANCZOS)


def demo_thumbnail(name: str, images: List[Path], model: str) -> Image.Image:
    canvas = Image.new("RGB", (WIDTH, HEIGHT), BACKGROUND)
    pictures = []
    for path in images:  # an animation (SaveAnimatedWEBP) shows its frames side by side
        with Image.open(path) as opened:
            pictures += [frame.convert("RGB") for frame in ImageSequence.Iterator(opened)]
    pictures = pictures[:MAX_TILES]
    area_h = HEIGHT - BAND
    columns, rows, _ = tile_grid([p.size for p in pictures], WIDTH, area_h)
    cell_w, cell_h = (WIDTH - GAP * (columns - 1)) / columns, (area_h - GAP * (rows - 1)) / rows
    for index, picture in enumerate(pictures):
        row, column = divmod(index, columns)
        in_row = min(columns, len(pictures) - row * columns)
        left = (WIDTH - in_row * cell_w - (in_row - 1) * GAP) / 2  # centre a short last row
        tile = scaled(picture, cell_w, cell_h)
        x = left + column * (cell_w + GAP) + (cell_w - tile.width) / 2
        y = (area_h - rows * cell_h - (rows - 1) * GAP) / 2 + row * (cell_h + GAP) + (cell_h - tile.height) / 2
        canvas.paste(tile, (int(x), int(y)))
    caption(canvas, name, f"trained {model} model, demo output")
    return canvas


def label_lines(draw: ImageDraw.ImageDraw, label: str, face: ImageFont.ImageFont, width: float) -> List[str]:
    """``label`` broken between words, CamelCase parts or after underscores into lines at most ``width`` wide."""
    pieces = []  # (text, separator before it)
    for word in label.split():
        parts = re.findall(r"[A-Z]+[0-9]*(?![a-z])_?|[A-Z]?[a-z0-9]+_?|[^A-Za-z0-9]+", word) or [word]
        pieces += [(part, " " if index == 0 else "") for index, part in enumerate(parts)]
    lines: List[str] = []
    for text, separator in pieces:
        if lines and text_width(draw, lines[-1] + separator + text, face) <= width:
            lines[-1] += separator + text
        else:
            lines.append(text)
    return lines or [""]


def node_label(node: Dict) -> str:
    """The node's title, else its type (the pack's prefix left out: the accent colour marks PatchLab nodes)."""
    if node.get("title"):
        return node["title"]
    kind = node["type"]
    return kind[len(PACK_PREFIX):] if kind.startswith(PACK_PREFIX) else kind


def draw_label(draw: ImageDraw.ImageDraw, box: Tuple[float, float, float, float], label: str, colour,
               size: int) -> None:
    """``label`` centred in ``box``, wrapped, at the largest font size from ``size`` down that fits."""
    x0, y0, x1, y1 = box
    width, height = x1 - x0 - 4 * SUPERSAMPLE, y1 - y0 - 2 * SUPERSAMPLE
    for face_size in range(size, 8 * SUPERSAMPLE - 1, -SUPERSAMPLE):
        face = font(face_size)
        lines = label_lines(draw, label, face, width)
        line_h = face_size * 1.15
        if len(lines) * line_h <= height and all(text_width(draw, line, face) <= width for line in lines):
            break
    else:  # the smallest size still does not fit: keep the lines there is room for, marking the cut
        kept = max(1, int(height // line_h))
        cut = len(lines) > kept
        lines = [fit_text(draw, line + ("…" if cut and index == kept - 1 else ""), face, width)
                 for index, line in enumerate(lines[:kept])]
    top = (y0 + y1) / 2 - line_h * (len(lines) - 1) / 2
    for index, line in enumerate(lines):
        draw.text(((x0 + x1) / 2, top + index * line_h), line, font=face, fill=colour, anchor="mm")


def graph_thumbnail(name: str, workflow: Dict) -> Image.Image:
    """The workflow's graph: node boxes at their editor places, links between their slots, notes left out."""
    s = SUPERSAMPLE
    width, height, area_h = WIDTH * s, HEIGHT * s, (HEIGHT - BAND) * s
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    nodes = {node["id"]: node for node in workflow["nodes"] if node["type"] not in workflows.FRONTEND_ONLY}
    if nodes:
        left = min(n["pos"][0] for n in nodes.values())
        top = min(n["pos"][1] - TITLE_HEIGHT for n in nodes.values())
        right = max(n["pos"][0] + n["size"][0] for n in nodes.values())
        bottom = max(n["pos"][1] + n["size"][1] for n in nodes.values())
        margin = 12 * s
        fit_x, fit_y = (width - 2 * margin) / (right - left), (area_h - 2 * margin) / (bottom - top)
        scale_x = min(fit_x, fit_y)
        # A long chain leaves the height empty: stretch it a little, so the boxes hold their labels.
        scale_y = min(fit_y, MAX_STRETCH * scale_x)
        offset_x = (width - (right - left) * scale_x) / 2 - left * scale_x
        offset_y = (area_h - (bottom - top) * scale_y) / 2 - top * scale_y

        def point(x: float, y: float) -> Tuple[float, float]:
            return offset_x + x * scale_x, offset_y + y * scale_y

        def slot(node: Dict, index: int, output: bool) -> Tuple[float, float]:
            x = node["pos"][0] + (node["size"][0] if output else 0)
            y = node["pos"][1] + SLOT_HEIGHT * (index + 0.5)
            return point(x, min(y, node["pos"][1] + node["size"][1]))

        for _link_id, origin, origin_slot, target, target_slot, *_ in workflow.get("links", []):
            if origin in nodes and target in nodes:
                start, end = slot(nodes[origin], origin_slot, True), slot(nodes[target], target_slot, False)
                pull = max(20 * s, abs(end[0] - start[0]) / 2)
                curve = [_bezier(start, (start[0] + pull, start[1]), (end[0] - pull, end[1]), end, t / 24)
                         for t in range(25)]
                draw.line(curve, fill=LINK, width=2 * s, joint="curve")
        for node in nodes.values():
            x, y = node["pos"]
            w, h = node["size"]
            ours = node["type"].startswith(PACK_PREFIX)
            box = (*point(x, y - TITLE_HEIGHT), *point(x + w, y + h))
            title_bottom = point(x, y)[1]
            draw.rounded_rectangle(box, radius=3 * s, fill=ACCENT if ours else NODE_FILL,
                                   outline=NODE_BORDER, width=s)
            draw.rectangle((box[0] + s, box[1] + s, box[2] - s, title_bottom), fill=ACCENT_TITLE if ours
                           else NODE_TITLE)
            draw_label(draw, box, node_label(node), ACCENT_TEXT if ours else NODE_TEXT, 12 * s)
    canvas = canvas.resize((WIDTH, HEIGHT), Image.LANCZOS)
    caption(canvas, name, "workflow graph, PatchLab nodes in blue")
    return canvas


def _bezier(p0, p1, p2, p3, t: float) -> Tuple[float, float]:
    u = 1 - t
    return tuple(u ** 3 * a + 3 * u * u * t * b + 3 * u * t * t * c + t ** 3 * d for a, b, c, d in zip(p0, p1, p2, p3))


def save(image: Image.Image, path: Path) -> None:
    """JPEG without metadata (no EXIF, no dates), full-resolution colour so coloured text stays sharp."""
    image.save(path, "JPEG", quality=QUALITY, optimize=True, subsampling=0)


# --- main ------------------------------------------------------------------------------

def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", type=Path, default=workflows.EXAMPLE_DIR.parent / "demo_output",
                        help="the demo's output folder (default: demo_output/)")
    parser.add_argument("--require-demo", action="store_true",
                        help="fail, writing nothing, if a trained-model workflow has no demo images "
                             "(default: draw its graph and warn)")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    paths = workflows.example_paths()
    plans = []
    missing = []
    for path in paths:
        workflow = workflows.load(path)
        model = trained_model(workflow)
        images = demo_images(args.demo, path.stem) if model else []
        if model and not images:
            missing.append(path.stem)
        plans.append((path, workflow, model, images))
    if missing and args.require_demo:
        print(f"error: no demo images in {args.demo} for {', '.join(missing)}; run scripts/demo.sh first",
              file=sys.stderr)
        return 1
    for stem in missing:
        print(f"warning: no demo images in {args.demo / stem}; drawing the graph of {stem} instead "
              "(run scripts/demo.sh for its pictures)", file=sys.stderr)

    shown = {"demo": [], "graph": []}
    for path, workflow, model, images in plans:
        if images:
            image = demo_thumbnail(path.stem, images, model)
            shown["demo"].append(path.stem)
        else:
            image = graph_thumbnail(path.stem, workflow)
            shown["graph"].append(path.stem)
        save(image, path.with_suffix(".jpg"))
    stems = {path.stem for path in paths}
    for orphan in sorted(workflows.EXAMPLE_DIR.glob("*.jpg")):
        if orphan.stem not in stems:
            orphan.unlink()
            print(f"removed {orphan.name}: its workflow is gone")
    total = sum(path.with_suffix(".jpg").stat().st_size for path in paths)
    print(f"wrote {len(paths)} thumbnails to {workflows.EXAMPLE_DIR} ({total / 1024:.0f} KB): "
          f"{len(shown['demo'])} demo output, {len(shown['graph'])} graph drawings")
    return 0


if __name__ == "__main__":
    sys.exit(main())
