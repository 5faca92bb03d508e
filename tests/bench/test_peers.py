"""The bench peers (bench/peers/): each rule against a small case worked by hand, then each bound to a tiny
random-weight model of every family it supports and sampled through ComfyUI's sampler."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from devtools.sampling import sample
from devtools.testkit.counting import count_rows

BENCH = Path(__file__).resolve().parent.parent.parent / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))
from peers import binding, fbcache, magcache, make, taylorseer, teacache  # noqa: E402  (bench/ on the path)

LAYOUTS = ["sd15", "flux", "wan21"]
# A module inside each family's skipped block stack: it runs only on evaluated calls.
INSIDE = {"sd15": "middle_block.0", "flux": "single_blocks.1", "wan21": "blocks.1"}


def constant(value: float, shape=(1, 4, 8)) -> torch.Tensor:
    return torch.full(shape, value)


def decisions(rule, features, steps):
    """Run ``rule`` over one feature per step, storing a residual (the step's number) after every evaluation;
    returns the steps it reused."""
    reused = []
    for step, feature in enumerate(features):
        if rule.decide(step, steps, feature):
            reused.append(step)
        else:
            rule.store(step, constant(float(step)))
    return reused


# --- TeaCache -------------------------------------------------------------------------------------------------

def test_teacache_rescales_each_step_change_with_the_flux_polynomial():
    # poly(0.1) = 498.651651e-4 - 283.781631e-3 + 55.8554382e-2 - 3.82021401e-1 + 0.264230861
    #           = 0.0498651651 - 0.283781631 + 0.558554382 - 0.382021401 + 0.264230861 = 0.2068473761
    assert teacache.rescale(teacache.FLUX, 0.1) == pytest.approx(0.2068473761)
    assert teacache.rescale(None, 0.1) == 0.1


def test_teacache_accumulates_until_the_threshold_then_evaluates():
    # modulated inputs 1, 1.1, 1.21, 1.331, 1.4641, 1.61051: every step changes by 0.1 relative to the previous
    # call (rescaled: 0.2068). Step 0 is forced; step 1: acc 0.2068 < 0.4 -> reuse; step 2: acc 0.4137 -> evaluate,
    # acc 0; step 3: 0.2068 -> reuse; step 4: 0.4137 -> evaluate; step 5 is the last step: forced.
    rule = teacache.TeaCache(threshold=0.4, coefficients=teacache.FLUX)
    features = [constant(1.1 ** step) for step in range(6)]
    assert decisions(rule, features, steps=6) == [1, 3]


def test_teacache_compares_each_call_with_the_previous_call_not_the_last_evaluation():
    # identity rescale, threshold 0.25: changes 0.1 per call accumulate 0.1, 0.2 (reused), 0.3 (evaluated)
    rule = teacache.TeaCache(threshold=0.25, coefficients=None, last_steps=0)
    features = [constant(1.1 ** step) for step in range(5)]
    assert decisions(rule, features, steps=5) == [1, 2, 4]
    assert rule.accumulated == pytest.approx(0.1)


def test_teacache_reuses_the_last_evaluations_residual_unchanged():
    rule = teacache.TeaCache(threshold=1.0, coefficients=None)
    rule.decide(0, 4, constant(1.0))
    rule.store(0, constant(7.0))
    assert rule.decide(1, 4, constant(1.05))
    assert torch.equal(rule.reuse(1), constant(7.0))


# --- MagCache -------------------------------------------------------------------------------------------------

def test_magcache_accumulates_the_error_of_the_calibrated_ratios():
    # ratios [1, 1, 0.98, 0.95, 1.02, 0.9], threshold 0.06, K 3, retention 0.2 of 6 steps -> from step int(1.2) = 1.
    # step 0: evaluated (no cache). step 1: ratio 1, err |1-1| = 0 -> reuse. step 2: ratio 0.98, err 0.02 -> reuse.
    # step 3: ratio 0.98 * 0.95 = 0.931, err 0.02 + 0.069 = 0.089 >= 0.06 -> evaluate, reset.
    # step 4: ratio 1.02, err 0.02 -> reuse. step 5: ratio 1.02 * 0.9 = 0.918, err 0.02 + 0.082 = 0.102 -> evaluate.
    rule = magcache.MagCache([1.0, 1.0, 0.98, 0.95, 1.02, 0.9], threshold=0.06, retention_ratio=0.2, max_skips=3)
    assert decisions(rule, [None] * 6, steps=6) == [1, 2, 4]


def test_magcache_evaluates_after_k_consecutive_reuses():
    rule = magcache.MagCache([1.0] * 6, threshold=0.06, retention_ratio=0.0, max_skips=2)
    assert decisions(rule, [None] * 6, steps=6) == [1, 2, 4, 5]


def test_magcache_evaluates_the_retention_steps():
    rule = magcache.MagCache([1.0] * 10, threshold=1.0, retention_ratio=0.3, max_skips=10)
    assert decisions(rule, [None] * 10, steps=10) == list(range(3, 10))


def test_magcache_calibration_records_the_mean_ratio_of_token_norms():
    # residuals [1 batch, 2 tokens, 2 channels]: token norms (1, 2), then (1.1, 1.8), then (2.2, 0.9)
    # gamma_1 = mean(1.1 / 1, 1.8 / 2) = mean(1.1, 0.9) = 1.0; gamma_2 = mean(2.2 / 1.1, 0.9 / 1.8) = 1.25
    tables = magcache.Calibration()
    recorder = tables.recorder(0)
    for step, residual in enumerate([[[1.0, 0.0], [0.0, 2.0]], [[1.1, 0.0], [0.0, 1.8]], [[0.0, 2.2], [0.9, 0.0]]]):
        assert not recorder.decide(step, 3)
        recorder.store(step, torch.tensor([residual]))
    assert tables.ratios() == {0: [1.0, pytest.approx(1.0), pytest.approx(1.25)]}


def test_magcache_resamples_a_table_of_another_length_by_nearest_index():
    # 5 entries to 3 steps: indices round(i * 4 / 2) = 0, 2, 4
    assert magcache.nearest_interp([1.0, 1.1, 1.2, 1.3, 1.4], 3) == [1.0, 1.2, 1.4]


# --- FBCache --------------------------------------------------------------------------------------------------

def test_fbcache_measures_the_change_since_the_last_evaluation():
    # threshold 0.12. step 0: no reference -> evaluate, reference 1. step 1: |1.1 - 1| / 1 = 0.1 -> reuse (the
    # reference stays 1). step 2: |1.15 - 1| / 1 = 0.15 -> evaluate, reference 1.15. step 3: |1.2 - 1.15| / 1.15
    # = 0.043 -> reuse.
    rule = fbcache.FBCache(threshold=0.12)
    assert decisions(rule, [constant(v) for v in (1.0, 1.1, 1.15, 1.2)], steps=4) == [1, 3]
    assert rule.last_change == pytest.approx(0.05 / 1.15, rel=1e-5)  # float32 tensors


def test_fbcache_limits_consecutive_hits():
    rule = fbcache.FBCache(threshold=0.5, max_consecutive_hits=1)
    assert decisions(rule, [constant(1.0)] * 5, steps=5) == [1, 3]


# --- TaylorSeer -----------------------------------------------------------------------------------------------

def quadratic_run(order: int):
    """f(s) = s^2 at full steps, interval 2, first_enhance 1: full at 0, 2, 4; forecasts at 1, 3, 5."""
    rule = taylorseer.TaylorSeer(interval=2, order=order, first_enhance=1)
    forecasts = {}
    for step in range(6):
        if rule.decide(step, 6):
            forecasts[step] = float(rule.reuse(step)[0, 0, 0])
        else:
            rule.store(step, constant(float(step ** 2)))
    return forecasts


def test_taylorseer_order_1_extrapolates_the_last_finite_difference():
    # full 0 (f 0): F = {0}; step 1 forecast 0. full 2 (f 4): F1 = (4 - 0) / 2 = 2; step 3: 4 + 2 * 1 = 6.
    # full 4 (f 16): F1 = (16 - 4) / 2 = 6; step 5: 16 + 6 = 22 (true 25)
    assert quadratic_run(order=1) == {1: 0.0, 3: 6.0, 5: 22.0}


def test_taylorseer_order_2_adds_the_difference_of_the_differences():
    # as order 1 until full 4: F1 = 6 and F2 = (6 - 2) / 2 = 2; step 5: 16 + 6 * 1 + 2 * 1^2 / 2 = 23 (true 25:
    # backward differences around the last full step, as the reference)
    assert quadratic_run(order=2) == {1: 0.0, 3: 6.0, 5: 23.0}


def test_taylorseer_flux_schedule_evaluates_three_steps_then_every_sixth():
    rule = taylorseer.TaylorSeer(**taylorseer.DEFAULTS["flux"])
    reused = decisions(rule, [None] * 28, steps=28)
    assert [step for step in range(28) if step not in reused] == [0, 1, 2, 8, 14, 20, 26]
    assert sorted(rule.factors) == [0, 1]


# --- bound to ComfyUI models ----------------------------------------------------------------------------------

def peer_run(peer, model, layout, steps=10):
    """Sample with the peer bound to ``model``; the finished PeerRun, the samples, and the rows that reached a
    module inside the block stack."""
    finished = []
    patched = peer(model, on_finish=finished.append)
    with count_rows(model, INSIDE[layout]) as inside:
        out = sample(patched, layout, steps=steps)
    (state,) = finished
    return state, out, inside.rows, patched


def rows(state, reused: bool) -> int:
    return sum(r for _, hit, r in state.calls if hit == reused)


def assert_skipped_some_and_left_nothing(state, inside_rows, patched):
    assert rows(state, True) > 0 and rows(state, False) > 0
    assert inside_rows == rows(state, False)            # the stack ran exactly on the evaluated calls
    assert state.rules == {}                            # every rule and cached tensor dropped at the end
    options = patched.model_options.get("transformer_options", {})
    assert binding.KEY not in options and binding.CALL_KEY not in options


def with_listener(factory, **params):
    return lambda model, on_finish: factory(on_finish=on_finish, **params)(model, "tiny")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_teacache_skips_some_evaluations_and_leaves_no_state(tiny_model, layout):
    # identity rescale: a random tiny Wan's time embedding changes by 0.7-1.2 a step, where the published Wan
    # polynomial gives hundreds
    peer = with_listener(make.teacache, threshold=5.0, coefficients=None)
    state, _, inside, patched = peer_run(peer, tiny_model(layout), layout)
    assert_skipped_some_and_left_nothing(state, inside, patched)


def test_teacache_ret_mode_on_wan_reads_the_time_projection(tiny_model, monkeypatch):
    seen = []
    peer = with_listener(make.teacache, ret_mode=True, threshold=5.0, coefficients=None, first_steps=1)
    original = teacache.TeaCache.decide

    def spy(rule, step, steps, feature=None):
        seen.append(tuple(feature.shape))
        return original(rule, step, steps, feature)

    monkeypatch.setattr(teacache.TeaCache, "decide", spy)
    state, _, inside, patched = peer_run(peer, tiny_model("wan21"), "wan21")
    assert_skipped_some_and_left_nothing(state, inside, patched)
    assert set(seen) == {(1, 1, 6, 64)}  # e0 of one chunk: [rows, 1, 6, dim]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_magcache_calibrates_then_skips_some_evaluations_and_leaves_no_state(tiny_model, layout):
    model = tiny_model(layout)
    ratios = make.calibrate(model, lambda patched: sample(patched, layout, steps=10))
    assert sorted(ratios) == [0, 1] and all(len(table) == 10 and table[0] == 1.0 for table in ratios.values())
    peer = with_listener(make.magcache, ratios=ratios, threshold=5.0, max_skips=3)
    state, _, inside, patched = peer_run(peer, model, layout)
    assert_skipped_some_and_left_nothing(state, inside, patched)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_fbcache_skips_some_evaluations_and_leaves_no_state(tiny_model, layout):
    state, _, inside, patched = peer_run(with_listener(make.fbcache, threshold=5.0), tiny_model(layout),
                                         layout)
    assert_skipped_some_and_left_nothing(state, inside, patched)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_taylorseer_skips_some_evaluations_and_leaves_no_state(tiny_model, layout):
    peer = with_listener(make.taylorseer, interval=3, order=2, first_enhance=1)
    state, _, inside, patched = peer_run(peer, tiny_model(layout), layout)
    assert_skipped_some_and_left_nothing(state, inside, patched)
    assert sorted({step for step, hit, _ in state.calls if not hit}) == [0, 3, 6, 9]


class Replay:
    """A test rule: records every step's residual in a first run, reuses each step's own in a second."""

    def __init__(self, key, tape, replaying):
        self.key = key[1:]  # (cond/uncond, shape): a cond's uuid is new in every run
        self.tape, self.replaying, self.cached = tape, replaying, None

    def decide(self, step, steps, feature=None):
        self.cached = self.tape.get((self.key, step)) if self.replaying else None
        return self.cached is not None

    def store(self, step, residual):
        self.tape[(self.key, step)] = residual

    def reuse(self, step):
        return self.cached


@pytest.mark.parametrize("start", ["embed", "first block"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_reusing_each_steps_own_residual_reproduces_the_unpatched_samples(tiny_model, layout, start):
    """The binding's plumbing (where the stack starts and ends, the residual added back, the head run after it)
    is exact: a reuse of the residual the same step produced gives the same samples."""
    model, tape, runs = tiny_model(layout), {}, []
    expected = sample(model, layout, steps=6)
    for replaying in (False, True):
        spec = binding.PeerSpec("replay", lambda key, replaying=replaying: Replay(key, tape, replaying), start,
                                on_finish=runs.append)
        out = sample(binding.bind(model, spec), layout, steps=6)
    assert runs[1].calls and all(reused for _, reused, _ in runs[1].calls)
    assert torch.allclose(out, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_second_run_of_the_patched_model_repeats_the_first(tiny_model, layout):
    model = tiny_model(layout)
    runs = []
    patched = make.fbcache(on_finish=runs.append, threshold=5.0)(model, "tiny")
    first, second = sample(patched, layout, steps=8), sample(patched, layout, steps=8)
    assert torch.equal(first, second) and runs[0].calls == runs[1].calls


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_peer_that_never_reuses_samples_exactly_as_the_unpatched_model(tiny_model, layout):
    model = tiny_model(layout)
    expected = sample(model, layout, steps=6)
    assert torch.equal(sample(make.fbcache(threshold=0.0)(model, "tiny"), layout, steps=6), expected)


def test_a_family_without_a_binding_is_refused(tiny_model):
    with pytest.raises(RuntimeError, match="not one of the families"):
        make.teacache()(tiny_model("sd3"), "tiny")
