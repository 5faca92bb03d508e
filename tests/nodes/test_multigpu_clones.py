"""Every stateful node on a model split over two devices by ComfyUI's multi-GPU CFG split (0.23+).

``MultiGPU_WorkUnits`` deep-clones the model for each extra device
(``ModelPatcher.deepclone_multigpu``: a fresh network from the loader's factory, the patches
and wrappers copied), and each step then runs the positive and the negative on different
devices in parallel threads, each with its own copy of ``transformer_options``. This
machine has one CPU and no GPU, so the tests drive the same path with two CPU devices
(``cpu`` and ``cpu:0``; ComfyUI copies tensors between them as between GPUs). The models
are built chunked (positive and negative in separate calls), as the split runs them, so a
split run must equal the single-device run exactly, whether the node was applied before
or after the split, and again on the second run.
"""

import functools

import comfy.model_management
import pytest
import torch

from devtools import bootstrap
from devtools import lifecycle as lc
from devtools.testkit import tiny_models
from devtools.testkit.counting import count_rows

VERSION = bootstrap.comfyui_version(bootstrap.comfyui_root())
DEVICES = (torch.device("cpu"), torch.device("cpu", 0))
WORK = lc.Work(steps=3, batch=2)
CASES = list({(c.node_id, repr(sorted(c.inputs.items())), c.layout): c for c in lc.CASES}.values())


@pytest.fixture(scope="module")
def split_node(core_nodes):
    if "MultiGPU_WorkUnits" not in core_nodes:
        pytest.skip(f"ComfyUI {VERSION} has no multi-GPU CFG split (MultiGPU_WorkUnits, added in ComfyUI 0.23)")
    return core_nodes["MultiGPU_WorkUnits"]


@pytest.fixture
def two_devices(monkeypatch):
    monkeypatch.setattr(comfy.model_management, "get_all_torch_devices",
                        lambda exclude_current=False: list(DEVICES))


@functools.cache
def base(layout: str):
    """A chunked tiny model whose loader factory builds it again (what deepclone_multigpu calls)."""
    model = tiny_models.build_model(layout, chunked=True)
    model.cached_patcher_init = (functools.partial(tiny_models.build_model, layout, chunked=True), ())
    return model


def split(split_node, model):
    """What MultiGPU_WorkUnits(max_gpus=2) does, without its search for an already loaded clone to reuse:
    on 0.24.1 that search fails on a loaded-model entry whose patcher was garbage-collected (``None.model``),
    which the many short-lived test models here leave behind."""
    import comfy.multigpu

    return comfy.multigpu.create_multigpu_deepclones(model, 2, reuse_loaded=False)


def clone_on_second_device(model):
    (clone,) = model.get_additional_models_with_key("multigpu")
    assert clone.load_device == DEVICES[1] and clone.model is not model.model
    return clone


@pytest.mark.parametrize("order", ["node then split", "split then node"])
@pytest.mark.parametrize("case", CASES, ids=lc.case_ids(CASES))
def test_a_split_run_equals_the_single_device_run(split_node, two_devices, case, order):
    model = base(case.layout)
    single = lc.sample(lc.patch(case, model), case.layout, WORK)
    patched = split(split_node, lc.patch(case, model)) if order == "node then split" else \
        lc.patch(case, split(split_node, model))
    second = clone_on_second_device(patched)
    with count_rows(model) as here, count_rows(second) as there:
        first_run = lc.sample(patched, case.layout, WORK)
    assert here.rows > 0 and there.rows > 0, "the work was not split over the two devices"
    lc.assert_same(first_run, single, f"{case.name}, {order}, first run")
    lc.assert_same(lc.sample(patched, case.layout, WORK), single, f"{case.name}, {order}, second run")
