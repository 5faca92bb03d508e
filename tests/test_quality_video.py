"""bench/quality_video.py without a diffusion model: its catalogue, and its judging, table and chart on a
hand-made result (real clips from the generator, read by the oracle)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from devtools.testkit.shapes import data, evaluate, oracle

BENCH = Path(__file__).resolve().parent.parent / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))
import quality  # noqa: E402  (bench/ on the path: the bench scripts import each other as top-level modules)
import quality_video as qv  # noqa: E402

# What issue 36 item 4 asks the bench to measure.
ASKED = {"full", "cfg1", "stepcache", "stepcache_forecast_0.1", "stepcache_forecast_0.2", "stepcache_forecast_0.5",
         "stepcache_forecast_0.8", "stepcache_plain_0.3", "core_easycache", "core_lazycache", "guidance_interval",
         "nag_cfg1", "nag_static_cfg1", "pag", "pag_cfg1", "seg", "seg_cfg1", "slg", "slg_cfg1", "tpg", "tpg_cfg1",
         "rescale_cfg", "cfg_norm", "apg", "tcfg", "mahiro", "cfg_zero_star"}


def test_the_catalogue_is_the_asked_variants_on_wan_shapes_with_quality_pys_labels():
    keys = [v.key for v in qv.VARIANTS]
    assert len(keys) == len(set(keys)) and set(keys) == ASKED and keys[0] == "full"
    assert all(v.models == (qv.MODEL,) for v in qv.VARIANTS)
    shared = {v.key: v for v in quality.VARIANTS}
    for v in qv.VARIANTS:
        if v.key in shared:
            assert (v.label, v.kind, v.group, v.cfg, v.make) == (shared[v.key].label, shared[v.key].kind,
                                                                  shared[v.key].group, shared[v.key].cfg,
                                                                  shared[v.key].make)
    by_key = {v.key: v for v in qv.VARIANTS}
    assert by_key["nag_static_cfg1"].negative == "static" and by_key["nag_static_cfg1"].cfg == 1.0
    assert by_key["nag_cfg1"].negative == "" and by_key["pag"].cfg is None and by_key["pag_cfg1"].cfg == 1.0


def test_only_the_committed_weights_are_published():
    with pytest.raises(SystemExit):
        qv.parse_args(["--untrained", "--publish"])
    args = qv.parse_args(["--untrained", "--seeds", "1"])
    assert "untrained" in qv.weights_label(args) and args.steps == 20 and args.name == "quality_video"


def clips(prompts):
    """Real clips [N, 4, 3, 16, 16] drawn with the labels of ``prompts`` ("<colour> <shape> moving <direction>")."""
    colour, shape, direction = oracle.clip_labels(prompts)
    drawn = data.draw_clips(len(prompts), torch.Generator().manual_seed(5), colour=colour, shape=shape,
                            direction=direction)
    return evaluate.Samples(drawn.frames, list(prompts), torch.zeros(len(prompts), 16, 4, 16, 16))


@pytest.fixture(scope="module")
def payload():
    """Three variants judged as the bench judges them: full compute (real clips), a cache that evaluated 60 % of
    the rows and played every clip backwards (colour and shape right, every direction wrong), and NAG with the
    negative "static", which wan_shapes does not know."""
    prompts = [evaluate.ALL_CLIP_PROMPTS[i] for i in (0, 13, 30, 47, 58, 71)]
    full = clips(prompts)
    backwards = evaluate.Samples(full.pictures.flip(1), full.prompts, full.latents)
    by_key = {v.key: v for v in qv.VARIANTS}
    classifier = oracle.load()
    results = {
        "nag_static_cfg1": quality.judged(by_key["nag_static_cfg1"], qv.MODEL, full, {"rows": 120, "wall_s": 1.0},
                                          240, classifier, full=full),
        "full": quality.judged(by_key["full"], qv.MODEL, full, {"rows": 240, "wall_s": 2.0}, 240, classifier,
                               full=full),
        "stepcache": quality.judged(by_key["stepcache"], qv.MODEL, backwards, {"rows": 144, "wall_s": 1.25}, 240,
                                    classifier, full=full),
        "tpg": {"label": "TPG (PatchLab)", "error": "RuntimeError: not this model"},
    }
    return {"model": qv.MODEL, "weights": "hand-made", "seeds": 1, "samples_per_variant": 6, "steps": 20,
            "device": "cpu", "results": {qv.MODEL: results}}


def test_judging_reads_colour_shape_direction_flicker_and_psnr(payload):
    results = payload["results"][qv.MODEL]
    full, cache, nag = results["full"], results["stepcache"], results["nag_static_cfg1"]
    assert full["accuracy_colour"] == full["accuracy_shape"] == full["accuracy_direction"] == 1.0
    assert full["flicker"] == 0.0 and full["flicker_clips"] == 6 and full["psnr_db"] == 100.0
    assert full["evaluations"] == 1.0 and full["cfg"] == 5.0 and "negative" not in full
    assert cache["accuracy_colour"] == cache["accuracy_shape"] == 1.0
    assert cache["accuracy_direction"] == cache["accuracy_all"] == 0.0
    assert cache["evaluations"] == 0.6 and cache["psnr_db"] < 30 and cache["group"] == "speed"
    assert nag["cfg"] == 1.0 and nag["negative"] == "static" and nag["negative_words"] == []


def test_the_table_lists_the_variants_in_the_catalogues_order(payload):
    lines = qv.table(payload, "quality_video").splitlines()
    rows = [line for line in lines if line.startswith("| ") and not line.startswith("| variant")]
    assert [row.split(" | ")[0][2:] for row in rows] == [
        "full compute", "StepCache defaults (PatchLab)", 'NAG at CFG 1 (PatchLab; negative: "static")',
        "TPG (PatchLab)"]
    assert rows[0] == "| full compute | 5 |  | 100% | 2.0 | 100.0% | 100.0% | 100.0% | 100.0% | 0.0000 | 100.0 |"
    assert "| 60% | 1.2 | 100.0% | 100.0% | 0.0% | 0.0% |" in rows[1]
    assert '| 1 | "static" (unknown: as "") | 50% |' in rows[2]
    assert "refused: RuntimeError: not this model" in rows[3]
    assert "6 clips per variant (72 prompts x 1 seeds) of wan_shapes (hand-made)" in lines[2]


def test_redraw_writes_the_table_and_a_chart_of_the_speed_variants(payload, tmp_path):
    assert [p[2]["label"] for p in quality.speed_points(payload["results"][qv.MODEL])] == [
        "StepCache defaults (PatchLab)"]  # neither full compute nor the guidance nodes, nor the refused
    qv.redraw(payload, "quality_video", tmp_path)
    assert (tmp_path / "quality_video.md").read_text() == qv.table(payload, "quality_video")
    first = (tmp_path / "quality_video.png").read_bytes()
    qv.redraw(payload, "quality_video", tmp_path)
    assert (tmp_path / "quality_video.png").read_bytes() == first  # drawn from the JSON alone
    guidance_only = {**payload, "results": {qv.MODEL: {"full": payload["results"][qv.MODEL]["full"]}}}
    qv.redraw(guidance_only, "quality_video", tmp_path)
    assert not (tmp_path / "quality_video.png").exists()
