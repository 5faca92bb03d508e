"""One patched MODEL reused run after run, and after interrupted runs, gives what a fresh patch gives.

Table-driven over ``devtools.lifecycle.CASES``: a new node is covered by one ``Case`` there.
"""

import gc
import weakref

import comfy.model_management
import pytest
import torch

from devtools import lifecycle as lc
from devtools.testkit import counting

CASES = lc.CASES
IDS = lc.case_ids(CASES)


@pytest.fixture(autouse=True)
def _no_pending_interrupt():
    yield
    comfy.model_management.interrupt_current_processing(False)


def reused_runs(case, works):
    """Sample ``works`` one after the other with ONE patched model."""
    model = lc.patch(case)
    results = []
    for work in works:
        results.append(lc.sample(model, case.layout, work))
    lc.remember(case, works[0], results[0])
    return results


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_a_reused_patched_model_gives_what_a_fresh_one_gives_as_the_work_changes(case):
    works = lc.SEQUENCE
    for index, (work, result) in enumerate(zip(works, reused_runs(case, works))):
        if index:
            lc.assert_same(result, lc.fresh(case, work), f"{case.name}, run {index + 1} ({work})")


INTERRUPTIONS = {
    # an exception from another node's post-CFG function on step 2
    "post_cfg_raises": lambda model: (lc.raising_post_cfg(model, on_call=2), None),
    # an exception after the third network call: in chunked runs half a step is done
    "model_call_raises": lambda model: (lc.raising_model_call(model, on_call=2), None),
    # what POST /interrupt does: the flag, raised from inside the next op of step 2
    "interrupt_flag": lambda model: (model, lc.interrupting_callback(on_step=1)),
}


@pytest.mark.parametrize("how", sorted(INTERRUPTIONS))
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_a_run_interrupted_mid_sampling_leaves_nothing_behind(case, how):
    model = lc.patch(case)
    stopped, callback = INTERRUPTIONS[how](model)
    interrupted = lc.Work(height=13, width=21, batch=2, steps=4, seed=7)
    with pytest.raises((lc.Interrupted, comfy.model_management.InterruptProcessingException)):
        lc.sample(stopped, case.layout, interrupted, callback=callback)
    work = lc.SEQUENCE[0]
    lc.assert_same(lc.sample(model, case.layout, work), lc.fresh(case, work), f"{case.name} after {how}")


# --- nothing kept -------------------------------------------------------------------------------

def live_tensors():
    gc.collect()
    return sum(1 for obj in gc.get_objects() if torch.is_tensor(obj))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_runs_of_a_patched_model_keep_no_tensor_alive(case):
    model = lc.patch(case)
    lc.sample(model, case.layout, lc.SEQUENCE[0])  # warm-up: lazily made buffers, kernels, caches of the kit
    before = live_tensors()
    inputs = []
    hook = counting.network(model).get_submodule(counting.first_layer_name(model)).register_forward_pre_hook(
        lambda module, args: inputs.append(weakref.ref(args[0])))
    try:
        for work in lc.SEQUENCE[1:]:
            lc.sample(model, case.layout, work)
    finally:
        hook.remove()
    assert inputs and live_tensors() <= before
    assert all(ref() is None for ref in inputs), "a network input outlived its run"


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_a_dropped_patched_model_is_freed(case):
    model = lc.patch(case)
    lc.sample(model, case.layout, lc.SEQUENCE[0])
    dropped = weakref.ref(model)
    del model
    gc.collect()
    assert dropped() is None, "something still holds the patched ModelPatcher after its run"
