"""Token Perturbation Guidance: seeded shuffles, the blocks it picks, nothing left behind."""

import pytest
import torch

from devtools import checks
from devtools.sampling import sample
from patchlab.nodes import attention_guidance as nodes
from patchlab.patches import attention_guidance as ag

FULL = {"start_percent": 0.0, "end_percent": 1.0}
CFG = {"sd15": 4.0, "sdxl": 4.0, "flux": 1.0, "wan21": 4.0, "zimage": 1.0}


def apply(model, **overrides):
    inputs = {"scale": 3.0, "blocks": "auto", "seed": 0, **FULL, **overrides}
    return checks.run_node(nodes.TokenPerturbationGuidance, model=model, **inputs)[0]


def run(model, layout):
    return sample(model, layout, steps=3, cfg=CFG[layout])


@pytest.mark.parametrize("layout", list(CFG))
def test_the_same_seed_gives_the_same_result(tiny_model, layout):
    model = tiny_model(layout)
    assert torch.equal(run(apply(model), layout), run(apply(model), layout))


@pytest.mark.parametrize("layout", list(CFG))
def test_another_seed_gives_other_shuffles(tiny_model, layout):
    model = tiny_model(layout)
    assert not torch.allclose(run(apply(model, seed=1), layout), run(apply(model), layout), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("layout", ["sd15", "flux"])
def test_the_global_rng_is_not_drawn_from(tiny_model, layout):
    model = tiny_model(layout)
    torch.manual_seed(11)
    run(model, layout)
    expected = torch.rand(4)
    torch.manual_seed(11)
    run(apply(model), layout)
    assert torch.equal(torch.rand(4), expected)


@pytest.mark.parametrize("layout, blocks", [("sd15", {4, 5}), ("sdxl", {7, 8})])
def test_auto_on_unets_is_the_third_and_fourth_input_blocks_with_transformers(tiny_model, layout, blocks):
    spec = apply(tiny_model(layout)).model_options["transformer_options"][ag.SPECS_KEY][-1]
    assert {block_id for _, block_id, _ in spec.blocks} == blocks
    assert {stage for stage, _, _ in spec.blocks} == {"input"}


def test_no_transformer_block_keeps_a_wrapped_forward_after_a_run(tiny_model):
    model = tiny_model("sdxl")
    run(apply(model, blocks="all"), "sdxl")
    net = model.model.diffusion_model
    assert not [name for name, module in net.named_modules() if "forward" in module.__dict__]


def test_the_shuffle_reaches_only_the_extra_pass(tiny_model):
    """The normal passes run the unshuffled network: the first step's positive prediction is the plain one."""
    model = tiny_model("sd15")
    seen = []

    def spy(args):
        seen.append(args["cond_denoised"].clone())
        return args["denoised"]

    plain, guided = model.clone(), apply(model).clone()
    for patched in (plain, guided):
        patched.set_model_sampler_post_cfg_function(spy)
    run(plain, "sd15")
    run(guided, "sd15")
    first, second = seen[:3], seen[3:]
    torch.testing.assert_close(second[0], first[0])
