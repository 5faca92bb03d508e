"""PatchLab_StepCache's higher-order forecasts (reuse "taylor 2" and "chebyshev"): they run on every family's
tiny model, count rows as the log says, keep a bounded history, and give each batch item what it gets alone."""

import logging

import pytest
import torch

from devtools import checks
from devtools.sampling import sample
from devtools.testkit import tiny_models
from devtools.testkit.counting import count_rows
from patchlab.kernels import step_cache as kc
from patchlab.nodes import step_cache as nodes
from patchlab.patches.step_cache import state

LOGGER = "patchlab.patches.step_cache"
METHODS = ("taylor 2", "chebyshev")
BASE = {"indicator": "input", "threshold": 0.3, "max_consecutive": 2, "reuse": "forecast", "start_percent": 0.0,
        "end_percent": 1.0}
runs = checks.step_cache_runs


def cache(model, **overrides):
    return checks.run_node(nodes.StepCache, model=model, **{**BASE, **overrides})[0]


@pytest.fixture(autouse=True)
def info_logs(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)


@pytest.mark.parametrize("method", METHODS)
def test_the_node_turns_the_reuse_choice_into_the_forecast_method(tiny_model, method):
    spec = nodes.StepCache.spec(tiny_model("sd15"), **{**BASE, "reuse": method})
    assert spec.forecast and spec.method == method and spec.keeps == kc.HISTORY[method]


@pytest.mark.parametrize("layout", ["sd15", "flux", "wan21"])
@pytest.mark.parametrize("method", METHODS)
def test_higher_order_forecasts_reuse_and_count_the_rows_logged(tiny_model, caplog, layout, method):
    model = tiny_model(layout)
    with count_rows(model) as counted:
        out = sample(cache(model, threshold=0.5, max_consecutive=3, reuse=method), layout, steps=10)
    logged = caplog.text
    (run,) = runs(caplog)
    assert torch.isfinite(out).all()
    assert run["reused_steps"] > 0 and counted.rows == run["full_rows"]
    assert f"{method} forecast" in logged


@pytest.mark.parametrize("method", METHODS)
def test_a_chunk_keeps_at_most_its_methods_history(tiny_model, monkeypatch, method):
    kept = []
    original = state._Call.store

    def store(self, *args, **kwargs):
        original(self, *args, **kwargs)
        for entry in self.state.get(self.keys):
            if entry is not None:
                kept.append(1 + (entry.d_prev is not None) + len(entry.older))

    monkeypatch.setattr(state._Call, "store", store)
    model = tiny_model("sd15")
    sample(cache(model, threshold=0.2, max_consecutive=2, reuse=method), "sd15", steps=12)
    assert max(kept) == kc.HISTORY[method]


@pytest.mark.parametrize("method", METHODS)
def test_with_a_higher_order_forecast_each_batch_item_gets_what_it_gets_alone(tiny_model, method):
    model = tiny_model("sdxl")
    prompts = {"positive": tiny_models.conditioning("sdxl", 1, batch=2),
               "negative": tiny_models.conditioning("sdxl", 2, batch=2)}
    alone, together, rows_alone, rows_together = checks.alone_and_together(
        lambda: cache(model, threshold=0.4, max_consecutive=2, reuse=method), model, "sdxl", prompts, True)
    assert rows_alone[0] != rows_alone[1] and rows_together == sum(rows_alone)
    for i in range(2):
        torch.testing.assert_close(together[i:i + 1], alone[i], rtol=1e-4, atol=1e-4 * float(alone[i].abs().max()))


def test_plain_and_first_order_keep_no_more_than_before(tiny_model):
    model = tiny_model("sd15")
    assert nodes.StepCache.spec(model, **{**BASE, "reuse": "plain"}).keeps == 1
    assert nodes.StepCache.spec(model, **{**BASE, "reuse": "forecast"}).keeps == 2


def test_every_reuse_choice_is_documented_in_the_tooltip():
    tooltip = nodes.StepCache.INPUT_TYPES()["required"]["reuse"][1]["tooltip"]
    assert all(mode in tooltip for mode in state.REUSE_MODES)
