"""Token Perturbation Guidance: seeded shuffles, the blocks it picks, nothing left behind."""

import pytest
import torch

from devtools import checks
from devtools.sampling import sample
from patchlab.kernels import attention as ka
from patchlab.nodes import attention_guidance as nodes
from patchlab.patches import attention_guidance as ag
from patchlab.patches import families
from patchlab.patches.attention_guidance import core as ag_core
from patchlab.patches.attention_guidance import dit as dit_attention

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


@pytest.mark.parametrize("layout, blocks", [("sd15", {7, 8}), ("sdxl", {7, 8})])
def test_auto_on_unets_is_the_last_two_input_blocks_with_transformers(tiny_model, layout, blocks):
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


def tpg_blocks(model, blocks="auto"):
    return apply(model, blocks=blocks).model_options["transformer_options"][ag.SPECS_KEY][-1].blocks


@pytest.mark.parametrize("layout, kwargs, blocks", [
    ("flux", {}, {("single", 0)}),                                                     # 1 + 2 blocks
    ("flux", {"depth": 19, "depth_single_blocks": 38}, {("single", i) for i in range(10)}),  # Flux.1's 19 + 38
    ("sd3", {}, {("joint", 1)}),
    ("qwen_image", {"num_layers": 60}, {("double", i) for i in range(20, 30)}),
])
def test_auto_on_dits_is_the_blocks_from_a_third_to_half_the_depth(tiny_model, layout, kwargs, blocks):
    assert tpg_blocks(tiny_model(layout, **kwargs)) == blocks


def shuffled_block(model, rope, original_block, tokens=12):
    """A Flux model's double.0 replace holding TPG's rows only, run on [1, tokens, 8] image tokens: (input,
    output, the permutation the block saw)."""
    spec = apply(model, blocks="double.0").model_options["transformer_options"][ag.SPECS_KEY][-1]
    stack = families.of_network(model.model.diffusion_model).stacks["double"]
    replace = dit_attention.make_block_replace(("double", 0), None, stack, (1, 2, 2), rope=rope)
    img, txt = torch.randn(1, tokens, 8, generator=torch.Generator().manual_seed(0)), torch.zeros(1, 3, 8)
    options = {ag.PASS_KEY: (spec,), ag.STEP_KEY: 5, "cond_or_uncond": [0]}
    out = replace({"img": img, "txt": txt, "transformer_options": options}, {"original_block": original_block})
    order = ka.token_permutation(tokens, ag_core.shuffle_seed(spec, 5, ("double", 0), 0, 0))
    return img, out["img"], order


def per_token(args):
    return {"img": args["img"] + torch.tanh(args["img"]), "txt": args["txt"]}


POSITION = torch.linspace(-1, 1, 12 * 8).reshape(1, 12, 8)


def per_position(args):
    return {"img": args["img"] + POSITION, "txt": args["txt"]}


def test_with_rotary_positions_each_token_gets_its_own_update_back(tiny_model):
    img, out, _ = shuffled_block(tiny_model("flux"), True, per_token)
    torch.testing.assert_close(out, img + torch.tanh(img))


def test_with_rotary_positions_the_perturbation_is_the_place_each_token_attends_from(tiny_model):
    img, out, order = shuffled_block(tiny_model("flux"), True, per_position)
    torch.testing.assert_close(out, img + ka.unshuffle_tokens(POSITION, 0, 12, order))
    assert not torch.allclose(out, img + POSITION)


def test_without_rotary_positions_the_update_lands_on_the_token_whose_place_it_took(tiny_model):
    """SD3 (positions added once, at the input), like the UNets: attention cannot tell the order, so the
    perturbation is the update computed for one token added to another."""
    img, out, order = shuffled_block(tiny_model("flux"), False, per_token)
    torch.testing.assert_close(out, img + torch.tanh(img[:, order]))


def test_the_families_without_rotary_positions_are_sd3_and_auraflow():
    assert {f.key for f in families.FAMILIES if not f.rope} == {"mmdit", "auraflow"}
