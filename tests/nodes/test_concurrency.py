"""Two sampling runs of ONE patched model in two threads at once each give their single-thread result.

Table-driven over ``devtools.lifecycle.CASES`` (stateful nodes first). The threads meet at a
barrier in the sampler callback after every step, so their steps really overlap.
"""

import threading

import pytest

from devtools import lifecycle as lc

# Same step count (the barrier pairs the steps); other sizes, batches and seeds.
WORKS = (lc.Work(height=16, width=16, batch=1, steps=3, seed=3),
         lc.Work(height=13, width=21, batch=2, steps=3, seed=4))
STATEFUL = [case for case in lc.CASES if case.node_id in {
    "PatchLab_AdaptiveProjectedGuidance", "PatchLab_CFGZeroStar", "PatchLab_SelfAttentionGuidance",
    "PatchLab_PerturbedAttentionGuidance", "PatchLab_SmoothedEnergyGuidance", "PatchLab_TokenMerging",
    "PatchLab_TokenDownsampling", "PatchLab_RescaleCFG", "PatchLab_AdaptiveGuidance", "PatchLab_GuidanceInterval",
    "PatchLab_DeepCache", "PatchLab_SkipLayerGuidance", "PatchLab_StepCache"}]


def run_in_two_threads(model, layout):
    barrier = threading.Barrier(len(WORKS), timeout=120)
    results, errors = {}, []

    def step(step, x0, x, total_steps):
        barrier.wait()

    def worker(index, work):
        try:
            results[index] = lc.sample(model, layout, work, callback=step)
        except BaseException as error:  # reported below, with the other thread released
            errors.append(error)
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(i, work)) for i, work in enumerate(WORKS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not any(thread.is_alive() for thread in threads), "a sampling thread hung"
    if errors:
        raise errors[0]
    return [results[i] for i in range(len(WORKS))]


def test_the_unpatched_model_gives_its_single_thread_results_in_two_threads():
    model = lc.model_for(lc.Case("none"))
    alone = [lc.sample(model, "sd15", work) for work in WORKS]
    for work, together, single in zip(WORKS, run_in_two_threads(model, "sd15"), alone):
        lc.assert_same(together, single, f"unpatched, {work}")


@pytest.mark.parametrize("case", STATEFUL, ids=lc.case_ids(STATEFUL))
def test_two_threads_on_one_patched_model_each_get_their_single_thread_result(case):
    alone = [lc.fresh(case, work) for work in WORKS]
    for work, together, single in zip(WORKS, run_in_two_threads(lc.patch(case), case.layout), alone):
        lc.assert_same(together, single, f"{case.name} in a thread, {work}")
