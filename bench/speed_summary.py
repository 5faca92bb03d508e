"""The speed chart of the README: each speed node's current speed-up on real-size models, beside core's.

Reads the published results of the other benches (``figures/server_speed.json``,
``caches.json``, ``flux1024.json``, ``sdxl1024.json``, ``wan.json``) and writes
``figures/speed.json`` (every bar with its value, the file it comes from and where in
that file), then ``speed.md`` and ``speed.png``, the table and the chart, both drawn
from ``speed.json`` alone. Nothing is timed here: rerun the source benches to renew a
figure, then this script.

    .venv/bin/python bench/speed_summary.py            # collect from the sources, then draw
    .venv/bin/python bench/speed_summary.py --replot   # draw speed.md and speed.png from speed.json only
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

FIGURES = Path(__file__).resolve().parent / "figures"
NAME = "speed"

STEP = "one CFG step"
SAMPLE = "20-step sample"
# (node, case, what is timed, "ours" or "core", source file, path to the value in it). A path item "k=v" picks
# the element of a list whose field k is v ("k^=v": whose field k starts with v).
BARS: Tuple[Tuple[str, str, str, str, str, Tuple[str, ...]], ...] = (
    ("ToMe 0.5", "SD1.5 768 px (server)", STEP, "ours", "server_speed.json",
     ("results", "variant=patchlab_tome", "speedup")),
    ("ToDo 2x", "SD1.5 768 px (server)", STEP, "ours", "server_speed.json",
     ("results", "variant=patchlab_todo", "speedup")),
    ("core TomePatchModel 0.5", "SD1.5 768 px (server)", STEP, "core", "server_speed.json",
     ("results", "variant=core_tome", "speedup")),
    ("ToMe 0.5", "SDXL 1024 px", STEP, "ours", "sdxl1024.json",
     ("results", "sdxl 1024px", "patchlab_tome", "one_step", "speedup")),
    ("ToDo 2x", "SDXL 1024 px", STEP, "ours", "sdxl1024.json",
     ("results", "sdxl 1024px", "patchlab_todo", "one_step", "speedup")),
    *[(node, f"{model} 512 px", SAMPLE, kind, "caches.json", ("results", case, key, "sample", "speedup"))
      for model, case, keys in (("SD1.5", "sd15 512px", ("stepcache", "deepcache", "easycache", "lazycache")),
                                ("SDXL", "sdxl 512px", ("stepcache", "deepcache", "easycache", "lazycache")),
                                ("Flux-width", "flux 512px", ("stepcache", "easycache", "lazycache")))
      for node, kind, key in (("StepCache", "ours", "patchlab_stepcache"),
                              ("DeepCache 3", "ours", "patchlab_deepcache"),
                              ("core EasyCache", "core", "core_easycache"),
                              ("core LazyCache", "core", "core_lazycache"))
      if key.split("_")[1] in keys],
    ("StepCache", "Flux-width 1024 px", SAMPLE, "ours", "flux1024.json",
     ("results", "flux 1024px", "patchlab_stepcache", "sample", "speedup")),
    ("core EasyCache", "Flux-width 1024 px", SAMPLE, "core", "flux1024.json",
     ("results", "flux 1024px", "core_easycache", "sample", "speedup")),
    ("StepCache", "Wan 2.1 480p x 17 frames", SAMPLE, "ours", "wan.json",
     ("results", "caches", "variant^=StepCache defaults", "speedup")),
    ("core EasyCache", "Wan 2.1 480p x 17 frames", SAMPLE, "core", "wan.json",
     ("results", "caches", "variant=core EasyCache (defaults)", "speedup")),
    ("core LazyCache", "Wan 2.1 480p x 17 frames", SAMPLE, "core", "wan.json",
     ("results", "caches", "variant=core LazyCache (defaults)", "speedup")),
)


def lookup(data: Any, path: Sequence[str]) -> Any:
    """The value at ``path`` in parsed JSON (dict keys, or ``k=v`` / ``k^=v`` to pick a list element)."""
    for key in path:
        if isinstance(data, list):
            field, prefix, value = _split(key)
            data = next(item for item in data
                        if (str(item.get(field, "")).startswith(value) if prefix else item.get(field) == value))
        else:
            data = data[key]
    return data


def _split(key: str) -> Tuple[str, bool, str]:
    """``"k^=v"`` -> (k, True, v): a prefix match; ``"k=v"`` -> (k, False, v): an exact one."""
    if "^=" in key:
        field, value = key.split("^=", 1)
        return field, True, value
    field, value = key.split("=", 1)
    return field, False, value


def collect(figures: Path = FIGURES) -> Dict:
    """speed.json's content, read from the source benches' published JSON."""
    sources: Dict[str, Dict] = {}
    bars: List[Dict] = []
    for node, case, what, kind, source, path in BARS:
        if source not in sources:
            sources[source] = json.loads((figures / source).read_text())
        data = sources[source]
        bars.append({"node": node, "case": case, "timed": what, "kind": kind,
                     "speedup": round(float(lookup(data, path)), 3), "source": source, "path": list(path)})
    return {
        "benchmark": NAME,
        "what": "speed-up over the same model without the node (1.0 = no change); real-size ComfyUI models with "
                "random weights, fp32; PatchLab's nodes at their defaults beside ComfyUI's own at theirs",
        "sources": {name: {"created": data.get("created"), "device": data.get("device")}
                    for name, data in sources.items()},
        "bars": bars,
    }


def markdown(data: Dict) -> str:
    lines = [f"# {NAME}", "", data["what"] + ".", "",
             "| node | model and size | timed | speed-up | source (created, machine) |", "|---|---|---|---|---|"]
    for bar in data["bars"]:
        source = data["sources"][bar["source"]]
        lines.append(f"| {bar['node']} | {bar['case']} | {bar['timed']} | {bar['speedup']:.2f}x | "
                     f"[{bar['source']}]({bar['source']}) ({source['created']}, {source['device']}) |")
    return "\n".join(lines) + "\n"


def chart(data: Dict, path: Path) -> None:
    """Horizontal bars, one a (node, case), PatchLab's in colour and core's in grey, grouped by case."""
    from PIL import Image, ImageDraw

    bars = data["bars"]
    cases = list(dict.fromkeys(bar["case"] for bar in bars))
    row, gap, left, right, top = 18, 14, 330, 70, 40
    height = top + len(bars) * row + len(cases) * gap + 40
    width = 860
    image = Image.new("RGB", (width, height), "white")
    pen = ImageDraw.Draw(image)
    most = max(bar["speedup"] for bar in bars)
    scale = (width - left - right) / (most * 1.05)
    colours = {"StepCache": (66, 133, 244), "DeepCache 3": (52, 168, 83), "ToMe 0.5": (251, 140, 0),
               "ToDo 2x": (171, 71, 188)}
    pen.text((10, 8), "Speed-up over the same model without the node (real-size models, random weights, fp32, "
                      "2-core CPU)", fill="black")
    pen.text((10, 22), "coloured: PatchLab at its defaults; grey: ComfyUI's own node at its defaults",
             fill=(90, 90, 90))
    y = top
    for case in cases:
        y += gap
        for bar in (b for b in bars if b["case"] == case):
            colour = colours.get(bar["node"], (120, 120, 120)) if bar["kind"] == "ours" else (175, 175, 175)
            pen.text((10, y + 3), f"{case}: {bar['node']} ({bar['timed']})", fill="black")
            end = left + bar["speedup"] * scale
            pen.rectangle([left, y + 2, end, y + row - 2], fill=colour)
            pen.text((end + 4, y + 3), f"{bar['speedup']:.2f}x", fill="black")
            y += row
    one = left + scale
    pen.line([(one, top), (one, y + 4)], fill=(60, 60, 60))
    pen.text((one - 12, y + 8), "1.0x", fill="black")
    image.save(path)


def redraw(data: Dict, name: str = NAME, out: Path = FIGURES) -> None:
    """NAME.md and NAME.png in ``out`` from speed.json's content."""
    (out / f"{name}.md").write_text(markdown(data))
    chart(data, out / f"{name}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replot", action="store_true", help="only redraw speed.md and speed.png from speed.json")
    args = parser.parse_args()
    path = FIGURES / f"{NAME}.json"
    if not args.replot:
        path.write_text(json.dumps(collect(), indent=1) + "\n")
    redraw(json.loads(path.read_text()))
    print(f"{path}, {NAME}.md and {NAME}.png in {FIGURES}")


if __name__ == "__main__":
    main()
