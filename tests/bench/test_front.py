"""bench/front.py without the trained models: its catalogue, each setting's patch on tiny random-weight models,
the verdict, table and chart from hand-made results, and one short run on seeded random weights."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

from devtools import checks

BENCH = Path(__file__).resolve().parent.parent.parent / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))
import front  # noqa: E402  (bench/ on the path: the bench scripts import each other as top-level modules)
from peers import binding  # noqa: E402

UNET, DIT, VIDEO = front.MODELS
# Each model's settings per method, as issue 37 item 2 lists them: the peers' thresholds are 0.5x, 1x, 2x and 3x
# the family's published default (TeaCache 0.4 / 0.4 / 0.08, FBCache 0.2 / 0.12 / 0.1, MagCache 0.06 / 0.24 / 0.12).
EVERYWHERE = {"full": [None], "stepcache": [0.1, 0.2, 0.3, 0.5, 0.8], "stepcache_target": [1.5, 2, 3, 4],
              "stepcache_target_mc2": [1.5, 2, 3, 4], "stepcache_taylor2": [1.5, 2, 3, 4],
              "stepcache_chebyshev": [1.5, 2, 3, 4],
              "easycache": [0.1, 0.2, 0.4, 0.6], "lazycache": [0.1, 0.2, 0.4, 0.6],
              "taylorseer_o1": [2, 3, 4, 6], "taylorseer_o2": [2, 3, 4, 6]}
SETTINGS = {
    UNET: {**EVERYWHERE, "teacache": [0.2, 0.4, 0.8, 1.2], "fbcache": [0.1, 0.2, 0.4, 0.6],
           "magcache": [0.03, 0.06, 0.12, 0.18]},
    DIT: {**EVERYWHERE, "teacache": [0.2, 0.4, 0.8, 1.2], "fbcache": [0.06, 0.12, 0.24, 0.36],
          "magcache": [0.12, 0.24, 0.48, 0.72]},
    VIDEO: {**EVERYWHERE, "teacache": [0.04, 0.08, 0.16, 0.24], "fbcache": [0.05, 0.1, 0.2, 0.3],
            "magcache": [0.06, 0.12, 0.24, 0.36]},
}
LAYOUT = {UNET: "sd15", DIT: "flux", VIDEO: "wan21"}  # the tiny random-weight model of each family


def of(model):
    return [v for v in front.VARIANTS if model in v.models]


@pytest.mark.parametrize("model", front.MODELS)
def test_the_catalogue_has_every_method_at_the_listed_settings(model):
    variants = of(model)
    keys = [v.key for v in variants]
    assert keys[0] == "full" and len(keys) == len(set(keys)) == 50
    settings = {}
    for v in variants:
        settings.setdefault(v.method, []).append(v.value)
    assert settings == SETTINGS[model]
    kinds = {v.method: v.kind for v in variants}
    assert kinds["stepcache"] == kinds["stepcache_target"] == kinds["stepcache_taylor2"] == "ours"
    assert kinds["easycache"] == "core"
    assert kinds["teacache"] == kinds["magcache"] == kinds["taylorseer_o2"] == "peer"


def test_keys_name_the_method_and_the_setting():
    keys = {v.key for v in front.VARIANTS}
    assert {"stepcache_t0.3", "stepcache_x2", "stepcache_x1.5", "easycache_0.2", "lazycache_0.6", "teacache_0.4",
            "teacache_0.08", "fbcache_0.12", "magcache_0.12", "taylorseer_o1_i2", "taylorseer_o2_i4"} <= keys
    by_key = {v.key: v for v in front.VARIANTS}
    assert by_key["magcache_0.12"].models == (UNET, DIT, VIDEO)  # 2x the UNet's, 0.5x Flux's, 1x Wan's default
    assert by_key["fbcache_0.1"].models == (UNET, VIDEO) and by_key["teacache_0.4"].models == (UNET, DIT)


def test_a_selection_names_keys_or_whole_methods_and_always_full():
    assert front.selected(["magcache", "stepcache_x2"], front.VARIANTS) == {
        "full", "stepcache_x2", *(v.key for v in front.VARIANTS if v.method == "magcache")}
    assert front.selected(None, front.VARIANTS) == {v.key for v in front.VARIANTS}
    with pytest.raises(SystemExit, match="teacache_9"):
        front.selected(["teacache_9"], front.VARIANTS)


@pytest.mark.parametrize("model", front.MODELS)
def test_every_setting_patches_a_clone_and_leaves_the_input_model_alone(tiny_model, core_nodes, model):
    calibrated = []

    def calibrate_with(network_model, name):
        calibrated.append(name)
        return {0: [1.0] * 20, 1: [1.0] * 20}

    tiny = tiny_model(LAYOUT[model])
    before = checks.snapshot(tiny)
    wrappers = {kind: {key: list(fns) for key, fns in by_key.items()} for kind, by_key in tiny.wrappers.items()}
    for v in front.catalogue(calibrate_with):
        if model not in v.models or v.key == "full":
            continue
        patched = v.make(tiny, model)
        assert patched is not tiny, v.key
        if v.kind == "peer":
            assert binding.KEY in patched.wrappers.get("diffusion_model", {}), v.key
    checks.assert_unchanged(tiny, before)
    assert {kind: {key: list(fns) for key, fns in by_key.items()} for kind, by_key in tiny.wrappers.items()} \
        == wrappers
    assert calibrated == [model]  # once per model, whatever the number of MagCache thresholds


# --- the verdict, the table and the chart from hand-made results -----------------------------------------------

# A hand-made front (share saved, PSNR dB). StepCache's line: 36 dB at 30 %, 29 at 50 %, 23.3 at 67 %, 22 at 70 %.
# TeaCache: (0.3, 30) is beaten by its own (0.5, 30), so its line is 30 dB up to 50 %, then 27.5 at 55 %, 20 at 70 %.
# MagCache reaches only 45 % (25 dB).
FRONT = {"stepcache": [(0.2, 40.0), (0.4, 32.0), (0.6, 26.0), (0.8, 18.0)],
         "teacache": [(0.3, 30.0), (0.5, 30.0), (0.7, 20.0)],
         "magcache": [(0.45, 25.0)]}


def test_each_line_is_the_methods_own_front_read_linearly():
    assert front.own_front(FRONT["teacache"]) == [(0.5, 30.0), (0.7, 20.0)]
    assert front.psnr_at(FRONT["teacache"], 0.3) == 30.0           # its 50 % setting saves more for as much
    assert front.psnr_at(FRONT["teacache"], 0.6) == pytest.approx(25.0)
    assert front.psnr_at(FRONT["magcache"], 0.5) is None            # it does not reach 50 %
    assert front.psnr_at(FRONT["stepcache"], 2 / 3) == pytest.approx(26 - 8 / 3)


def test_the_verdict_finds_where_a_peer_wins():
    # StepCache minus the best peer (TeaCache everywhere; MagCache's 25 dB is below it): 30 %: 36 - 30 = 6;
    # 35 %: 4; 40 %: 2; 45 %: 30.5 - 30 = 0.5 (ahead: the tolerance); 50 %: 29 - 30 = -1 (behind);
    # 55 %: 27.5 - 27.5 = 0 (on); 60 %: 26 - 25 = 1; 65 %: 24 - 22.5 = 1.5; 70 %: 22 - 20 = 2
    verdict = front.front_verdict(FRONT)
    assert [b["saved"] for b in verdict["bins"]] == [0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7]
    assert [b["margin_db"] for b in verdict["bins"]] == pytest.approx([6, 4, 2, 0.5, -1, 0, 1, 1.5, 2])
    assert [b["position"] for b in verdict["bins"]] == ["ahead"] * 4 + ["behind", "on"] + ["ahead"] * 3
    assert {b["peer"] for b in verdict["bins"]} == {"teacache"}
    assert not verdict["holds"]
    assert verdict["peer_wins"] == [{"from": 0.5, "to": 0.5, "peers": ["teacache"], "by_db": 1.0,
                                     "unreached_from": None}]
    assert verdict["text"].endswith("50%: TeaCache wins (behind by up to 1.0 dB).")
    lenient = front.front_verdict(FRONT, tolerance_db=1.0)
    assert lenient["holds"] and lenient["text"].startswith("StepCache is on or ahead of the best other method")


def test_the_verdict_counts_a_share_stepcache_does_not_reach_against_it():
    # StepCache only at 50 % (28 dB); FBCache 31 dB up to 55 %; TaylorSeer 27 dB at 50 %; nobody beyond 55 %
    verdict = front.front_verdict({"stepcache_target": [(0.5, 28.0)], "fbcache": [(0.55, 31.0)],
                                   "taylorseer_o1": [(0.5, 27.0)]}, low=0.4, high=0.7, step=0.1)
    assert [b["position"] for b in verdict["bins"]] == ["behind", "behind", "not reached", "not reached"]
    assert verdict["peer_wins"] == [{"from": 0.4, "to": 0.7, "peers": ["fbcache"], "by_db": 3.0,
                                     "unreached_from": 0.6}]
    assert "40%-70%: FBCache wins (behind by up to 3.0 dB; no StepCache setting saves 60% or more)" in \
        verdict["text"]


def result(key, evaluations, psnr, accuracy, video=False, flicker=None):
    """One setting's result as front.run leaves it (quality.judged's fields with the catalogue's method)."""
    v = {v.key: v for v in front.VARIANTS}[key]
    r = {"label": v.label, "kind": v.kind, "group": "speed", "rows": int(round(evaluations * 100)),
         "evaluations": evaluations, "wall_s": round(10 * evaluations, 2), "cfg": 5.0, "psnr_db": psnr,
         "samples": 6, "method": v.method, "knob": v.knob, "value": v.value}
    if video:
        r.update(accuracy_colour=1.0, accuracy_shape=1.0, accuracy_direction=accuracy, accuracy_all=accuracy,
                 flicker=flicker)
    else:
        r.update(accuracy_colour=1.0, accuracy_shape=accuracy, accuracy_both=accuracy)
    return r


@pytest.fixture
def payload():
    """sd15_shapes with FRONT's points (TeaCache's 0.2 and 0.4 swapped in order, a refused FBCache), and
    wan_shapes with the second verdict's."""
    image = {
        "teacache_0.4": result("teacache_0.4", 0.5, 30.0, 0.82),
        "full": result("full", 1.0, 100.0, 0.9),
        "stepcache_t0.1": result("stepcache_t0.1", 0.8, 40.0, 0.9),
        "stepcache_t0.3": result("stepcache_t0.3", 0.6, 32.0, 0.85),
        "stepcache_t0.5": result("stepcache_t0.5", 0.4, 26.0, 0.8),
        "stepcache_t0.8": result("stepcache_t0.8", 0.2, 18.0, 0.6),
        "teacache_0.2": result("teacache_0.2", 0.7, 30.0, 0.8),
        "teacache_0.8": result("teacache_0.8", 0.3, 20.0, 0.5),
        "magcache_0.06": result("magcache_0.06", 0.55, 25.0, 0.7),
        "fbcache_0.2": {"label": "FBCache 0.2", "error": "RuntimeError: not this model", "method": "fbcache",
                        "knob": "threshold", "value": 0.2},
    }
    clips = {
        "full": result("full", 1.0, 100.0, 0.75, video=True, flicker=0.002),
        "stepcache_x2": result("stepcache_x2", 0.5, 28.0, 0.7, video=True, flicker=0.01),
        "fbcache_0.1": result("fbcache_0.1", 0.45, 31.0, 0.72, video=True, flicker=0.004),
        "taylorseer_o1_i2": result("taylorseer_o1_i2", 0.5, 27.0, 0.6, video=True, flicker=None),
    }
    return {"benchmark": "front", "device": "cpu (hand-made)", "weights": "the committed weights", "steps": 20,
            "seeds": {UNET: 1, VIDEO: 1}, "samples_per_variant": {UNET: 18, VIDEO: 72},
            "results": {UNET: image, VIDEO: clips}}


def rows_of(md: str, heading: str):
    lines = md.splitlines()
    start = lines.index(heading)
    rows = []
    for line in lines[start + 1:]:
        if line.startswith("#"):
            break
        if line.startswith("| ") and not line.startswith(("| setting", "| method")):
            rows.append(line)
    return rows


def test_the_table_lists_every_setting_in_the_catalogues_order(payload):
    md = front.table(payload, "front")
    rows = rows_of(md, f"## {UNET}")
    assert [row.split(" | ")[0][2:] for row in rows] == [
        "full compute", "StepCache threshold 0.1 (PatchLab)", "StepCache threshold 0.3 (PatchLab)",
        "StepCache threshold 0.5 (PatchLab)", "StepCache threshold 0.8 (PatchLab)", "TeaCache 0.2", "TeaCache 0.4",
        "TeaCache 0.8", "FBCache 0.2", "MagCache 0.06"]
    assert rows[2] == ("| StepCache threshold 0.3 (PatchLab) | StepCache threshold | threshold 0.3 (default) | 60% "
                       "| 40% | 6.0 | 85.0% | 32.0 |")
    assert rows[0] == "| full compute | full compute |  | 100% | 0% | 10.0 | 90.0% | 100.0 |"
    assert "| FBCache 0.2 | FBCache | | refused: RuntimeError: not this model |" in rows[8]
    clip_rows = rows_of(md, f"## {VIDEO}")
    assert clip_rows[1] == ("| StepCache target_speedup 2 (PatchLab) | StepCache target_speedup | target_speedup 2 "
                            "| 50% | 50% | 5.0 | 70.0% | 0.0100 | 28.0 |")
    assert "| n/a | 27.0 |" in clip_rows[3]  # no clip showed background


def test_the_table_reads_each_method_at_2x_and_3x(payload):
    md = front.table(payload, "front")
    assert rows_of(md, f"### {UNET} at 2x (50% saved)") == [
        # the settings nearest 50 %: StepCache's 40 % and 60 % are as near, the higher PSNR is shown
        "| StepCache threshold | threshold 0.3 (default) | 40% | 85.0% | 32.0 | (ours) |",
        "| TeaCache | threshold 0.4 (default) | 50% | 82.0% | 30.0 | behind by 1.0 dB |",   # 29 - 30 at 50 %
        "| MagCache | threshold 0.06 (default) | 45% | 70.0% | 25.0 | ahead (the method does not reach 50%) |"]
    assert rows_of(md, f"### {UNET} at 3x (67% saved)")[1] == (
        "| TeaCache | threshold 0.8 | 70% | 50.0% | 20.0 | ahead by 1.7 dB |")  # 23.33 - 21.67 at 2/3
    assert "StepCache's best (StepCache threshold, 29.0 dB)" in md
    assert "50%: TeaCache wins (behind by up to 1.0 dB)." in md
    assert rows_of(md, f"### {VIDEO} at 3x (67% saved)")[0] == (
        "| StepCache target_speedup | target_speedup 2 | 50% | 70.0% | 0.0100 | 28.0 | (ours) |")
    assert "18 (sd15_shapes), 72 (wan_shapes) samples (1 (sd15_shapes), 1 (wan_shapes) seeds" in md


def test_the_chart_and_table_redraw_byte_identically_from_the_json(payload, tmp_path):
    import json

    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    front.redraw(payload, "front", first)
    front.redraw(json.loads(json.dumps(payload)), "front", second)  # as --replot reads it back
    assert (first / "front.md").read_text() == front.table(payload, "front")
    assert (second / "front.md").read_text() == (first / "front.md").read_text()
    assert (second / "front.png").read_bytes() == (first / "front.png").read_bytes()
    only_full = {**payload, "results": {UNET: {"full": payload["results"][UNET]["full"]}}}
    front.redraw(only_full, "front", first)
    assert not (first / "front.png").exists()


# --- one short run ----------------------------------------------------------------------------------------------

def test_a_short_run_on_random_weights_counts_the_rows_inside_the_block_stack():
    """18 pictures, 3 steps, on sd15_shapes with seeded random weights (MagCache calibrated on them first): the
    peers save rows only inside the stack, where the run counts them."""
    args = argparse.Namespace(models=[UNET], variants=["taylorseer_o1_i2", "magcache_0.18"], seeds=1, steps=3,
                              threads=None, untrained=True)
    saves = []
    results = front.run(args, saves.append)[UNET]
    assert list(results) == ["full", "magcache_0.18", "taylorseer_o1_i2"]
    assert results["full"]["evaluations"] == 1.0 and results["full"]["samples"] == 18
    # TaylorSeer on the UNet: steps 0 and 1 evaluated (first_enhance 2), step 2 forecast
    assert results["taylorseer_o1_i2"]["evaluations"] == pytest.approx(2 / 3, abs=1e-4)
    assert results["taylorseer_o1_i2"]["psnr_db"] < 100
    assert results["magcache_0.18"]["method"] == "magcache" and results["magcache_0.18"]["value"] == 0.18
    assert len(saves) == 3
