"""SAG, PAG, SEG and SLG on tiny SD1.5/SDXL models: parity with core, batching, chunking, composition."""

import comfy.sample
import pytest
import torch

from devtools import checks
from devtools.sampling import sample
from devtools.testkit import tiny_models
from patchlab.nodes import attention_guidance as nodes
from patchlab.nodes import cfg as cfg_nodes
from patchlab.patches import attention_guidance as ag
from patchlab.patches.window import SigmaWindow

FULL = {"start_percent": 0.0, "end_percent": 1.0}
NEVER = {"start_percent": 1.0, "end_percent": 1.0}
SAG = {"scale": 0.5, "blur_sigma": 2.0, "threshold": 1.0, "block": "middle.0.0"}
PAG = {"scale": 3.0, "blocks": "middle", "rescale": 0.0}
SEG = {"scale": 3.0, "blur_sigma": 10.0, "blocks": "middle"}
SLG = {"scale": 3.0, "blocks": "middle", "rescaling_scale": 0.0}
TPG = {"scale": 3.0, "blocks": "auto", "seed": 0}
OURS = {"SAG": (nodes.SelfAttentionGuidance, SAG), "PAG": (nodes.PerturbedAttentionGuidance, PAG),
        "SEG": (nodes.SmoothedEnergyGuidance, SEG), "SLG": (nodes.SkipLayerGuidance, SLG),
        "TPG": (nodes.TokenPerturbationGuidance, TPG)}


def close(actual, expected, rel=1e-4):
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * float(expected.abs().max()))


def apply(model, name, window=FULL, **overrides):
    node, inputs = OURS[name]
    (patched,) = checks.run_node(node, model=model, **{**inputs, **overrides}, **window)
    return patched


def prompts(layout):
    return {"positive": tiny_models.conditioning(layout, seed=1), "negative": tiny_models.conditioning(layout, seed=2)}


@pytest.fixture(scope="module")
def sd15(tiny_model):
    return tiny_model("sd15")


@pytest.fixture(scope="module")
def plain(sd15):
    return sample(sd15, "sd15", steps=3)


# --- parity with core at batch 1, unchunked ------------------------------------------------

@pytest.mark.parametrize("layout", ["sd15", "sdxl"])
def test_sag_matches_core(core_nodes, tiny_model, layout):
    model = tiny_model(layout)
    (core,) = checks.run_node(core_nodes["SelfAttentionGuidance"], model=model, scale=0.5, blur_sigma=2.0)
    close(sample(apply(model, "SAG"), layout, steps=3), sample(core, layout, steps=3), rel=1e-5)


@pytest.mark.parametrize("layout", ["sd15", "sdxl"])
def test_pag_matches_core(core_nodes, tiny_model, layout):
    model = tiny_model(layout)
    (core,) = checks.run_node(core_nodes["PerturbedAttentionGuidance"], model=model, scale=3.0)
    close(sample(apply(model, "PAG"), layout, steps=3), sample(core, layout, steps=3), rel=1e-5)


# --- every node ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(OURS))
def test_guidance_changes_the_result(sd15, plain, name):
    assert not torch.allclose(sample(apply(sd15, name), "sd15", steps=3), plain, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("name", list(OURS))
def test_scale_zero_is_plain_cfg_exactly(sd15, plain, name):
    assert torch.equal(sample(apply(sd15, name, scale=0.0), "sd15", steps=3), plain)


@pytest.mark.parametrize("name", list(OURS))
def test_outside_the_window_is_plain_cfg_exactly(sd15, plain, name):
    assert torch.equal(sample(apply(sd15, name, NEVER), "sd15", steps=3), plain)


@pytest.mark.parametrize("layout", ["sd15", "sdxl"])
@pytest.mark.parametrize("name", list(OURS))
def test_batch_items_and_chunked_calls_match_batch_one_unchunked(tiny_model, layout, name):
    noise = comfy.sample.prepare_noise(torch.zeros(2, 4, 16, 16), 7)
    alone = [sample(apply(tiny_model(layout), name), layout, steps=3, noise=noise[i:i + 1], **prompts(layout))
             for i in range(2)]
    for model in (tiny_model(layout), tiny_model(layout, chunked=True)):
        both = sample(apply(model, name), layout, steps=3, batch=2, noise=noise, **prompts(layout))
        for i in range(2):
            close(both[i:i + 1], alone[i])


@pytest.mark.parametrize("name", list(OURS))
def test_odd_non_square_latents_work(sd15, name):
    result = sample(apply(sd15, name), "sd15", steps=2, height=13, width=22)
    assert torch.isfinite(result).all()
    assert not torch.allclose(result, sample(sd15, "sd15", steps=2, height=13, width=22), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("name", list(OURS))
def test_the_input_model_is_left_unchanged(sd15, name):
    before = checks.snapshot(sd15)
    apply(sd15, name)
    checks.assert_unchanged(sd15, before)


def test_sag_skips_tiny_latents_cleanly(sd15):
    assert torch.equal(sample(apply(sd15, "SAG"), "sd15", steps=2, height=4, width=4),
                       sample(sd15, "sd15", steps=2, height=4, width=4))


# --- what core gets wrong ------------------------------------------------------------------------

def test_core_sag_changes_under_chunking_and_ours_does_not(core_nodes, tiny_model):
    """A negative made of two conditionings: split into two uncond calls, core keeps only the last one's attention."""
    negative = tiny_models.conditioning("sd15", seed=2) + tiny_models.conditioning("sd15", seed=3)
    positive = tiny_models.conditioning("sd15", seed=1)

    def run(model, patched_by_core):
        if patched_by_core:
            (model,) = checks.run_node(core_nodes["SelfAttentionGuidance"], model=model, scale=0.5, blur_sigma=2.0)
        else:
            model = apply(model, "SAG")
        return sample(model, "sd15", steps=3, positive=positive, negative=negative)

    core_plain, core_chunked = run(tiny_model("sd15"), True), run(tiny_model("sd15", chunked=True), True)
    assert not torch.allclose(core_chunked, core_plain, rtol=1e-3, atol=1e-3 * float(core_plain.abs().max()))
    close(run(tiny_model("sd15", chunked=True), False), run(tiny_model("sd15"), False))


def test_pag_keeps_its_effect_next_to_sag_where_core_loses_it(core_nodes, sd15):
    (core_sag,) = checks.run_node(core_nodes["SelfAttentionGuidance"], model=sd15, scale=0.5, blur_sigma=2.0)
    (core_both,) = checks.run_node(core_nodes["PerturbedAttentionGuidance"], model=core_sag, scale=3.0)
    close(sample(core_both, "sd15", steps=3), sample(core_sag, "sd15", steps=3), rel=1e-5)
    ours_sag = apply(sd15, "SAG")
    ours_both = apply(ours_sag, "PAG")
    assert not torch.allclose(sample(ours_both, "sd15", steps=3), sample(ours_sag, "sd15", steps=3),
                              rtol=1e-3, atol=1e-3)


def test_sag_pag_and_seg_each_keep_their_effect_in_any_order(sd15):
    results = {}
    for order in (("SAG", "PAG", "SEG"), ("SEG", "SAG", "PAG")):
        model = sd15
        for name in order:
            model = apply(model, name)
        results[order] = sample(model, "sd15", steps=3)
    first, second = results.values()
    close(second, first)
    for dropped in ("SAG", "PAG", "SEG"):
        model = sd15
        for name in ("SAG", "PAG", "SEG"):
            if name != dropped:
                model = apply(model, name)
        assert not torch.allclose(sample(model, "sd15", steps=3), first, rtol=1e-3, atol=1e-3), dropped


def count_model_calls(model):
    calls = []

    def wrapper(apply_model, args):
        calls.append(list(args["cond_or_uncond"]))
        return apply_model(args["input"], args["timestep"], **args["c"])

    counted = model.clone()
    counted.set_model_unet_function_wrapper(wrapper)
    return counted, calls


def test_pag_seg_slg_and_tpg_share_one_extra_model_call(sd15):
    stack, calls = count_model_calls(apply(apply(apply(apply(sd15, "PAG"), "SEG"), "SLG"), "TPG"))
    sample(stack, "sd15", steps=3)
    assert len(calls) == 3 * 2


def test_slg_removes_the_attention_of_its_transformers_in_its_rows_only():
    window = SigmaWindow.always()
    slg = ag.GuidanceSpec(kind="slg", scale=3.0, blocks=frozenset({("middle", 0, 0)}), window=window)
    pag = ag.GuidanceSpec(kind="pag", scale=3.0, blocks=frozenset({("middle", 0, 0)}), window=window)
    extra = {ag.PASS_KEY: (pag, slg), "block": ("middle", 0), "block_index": 0, "cond_or_uncond": [0, 0]}
    out = torch.ones(4, 6, 8)
    skipped = ag.skip_attention_output(out, extra)
    assert [bool(skipped[i].any()) for i in range(4)] == [True, False, True, False]
    assert torch.equal(ag.skip_attention_output(out, {**extra, "block": ("input", 1)}), out)
    assert ag.skip_attention_output(out, {"block": ("middle", 0), "cond_or_uncond": [0]}) is out


def test_sags_extra_pass_is_evaluated_as_uncond(sd15):
    seen = []

    def probe(n, context, value, extra_options):
        if extra_options.get(ag.PASS_KEY) is not None:
            seen.append(list(extra_options["cond_or_uncond"]))
        return n, context, value

    probed = sd15.clone()
    probed.set_model_attn1_patch(probe)
    sample(apply(probed, "SAG"), "sd15", steps=2)
    assert seen and all(tags == [1] for tags in seen)


def recording(monkeypatch):
    """Every AttentionRun made while the test runs, and the shapes of what SAG records in them."""
    runs, shapes = [], []
    original_init, original_add = ag.AttentionRun.__init__, ag.AttentionRun.add

    def init(self):
        original_init(self)
        runs.append(self)

    def add(self, spec, mass, grid):
        shapes.append(tuple(mass.shape))
        original_add(self, spec, mass, grid)

    monkeypatch.setattr(ag.AttentionRun, "__init__", init)
    monkeypatch.setattr(ag.AttentionRun, "add", add)
    return runs, shapes


def test_no_attention_record_survives_the_run(sd15, monkeypatch):
    runs, shapes = recording(monkeypatch)
    sample(apply(sd15, "SAG"), "sd15", steps=3)
    assert len(runs) == 1 and shapes
    assert runs[0].records == {}


def test_a_record_left_by_an_interrupted_run_dies_with_the_run(sd15, monkeypatch):
    runs, shapes = recording(monkeypatch)

    def stop(args):  # a post-CFG function ahead of SAG's runner: the step's record is made, never taken
        raise KeyboardInterrupt

    interrupted = sd15.clone()
    interrupted.set_model_sampler_post_cfg_function(stop)
    model = apply(interrupted, "SAG")
    with pytest.raises(KeyboardInterrupt):
        sample(model, "sd15", steps=3)
    assert shapes and len(runs) == 1 and runs[0].records == {}
    assert ag.RUN_KEY not in model.model_options.get("transformer_options", {})


def test_sag_record_holds_one_value_per_token_not_the_attention_matrix(sd15, monkeypatch):
    _, shapes = recording(monkeypatch)
    sample(apply(sd15, "SAG", block="input.1"), "sd15", steps=1, height=16, width=24)
    assert shapes and all(shape == (1, 16 * 24) for shape in shapes)


# --- composition and chaining ---------------------------------------------------------------------

def test_composes_with_cfg_space_nodes(core_nodes, sd15):
    stack = apply(apply(sd15, "SAG"), "PAG")
    (stack,) = checks.run_node(cfg_nodes.RescaleCFG, model=stack, multiplier=0.7, **FULL)
    (stack,) = checks.run_node(core_nodes["CFGZeroStar"], model=stack)
    result = sample(stack, "sd15", steps=3)
    (without_pag,) = checks.run_node(cfg_nodes.RescaleCFG, model=apply(sd15, "SAG"), multiplier=0.7, **FULL)
    (without_pag,) = checks.run_node(core_nodes["CFGZeroStar"], model=without_pag)
    assert torch.isfinite(result).all()
    assert not torch.allclose(result, sample(without_pag, "sd15", steps=3), rtol=1e-3, atol=1e-3)


def test_another_packs_attention_replace_is_chained_not_shadowed(sd15):
    calls = []

    def other_pack(q, k, v, extra_options):
        calls.append(extra_options["block"])
        from comfy.ldm.modules.attention import optimized_attention
        return optimized_attention(q, k, v, extra_options["n_heads"])

    other = sd15.clone()
    other.set_model_attn1_replace(other_pack, "middle", 0)
    sample(apply(other, "PAG"), "sd15", steps=1)
    assert calls and all(block == ("middle", 0) for block in calls)


# --- bad input ------------------------------------------------------------------------------------

def test_unknown_block_syntax_is_flagged_before_the_run():
    message = nodes.PerturbedAttentionGuidance.VALIDATE_INPUTS(blocks="mid block 3")
    assert "cannot read block" in message
    assert nodes.PerturbedAttentionGuidance.VALIDATE_INPUTS(blocks="input.4, output.1.0") is True
    assert "cannot read block" in nodes.SelfAttentionGuidance.VALIDATE_INPUTS(block="middle.x")


def test_a_block_without_self_attention_is_a_clear_error(tiny_model):
    with pytest.raises(ValueError, match="'input.1' has no self-attention in this model; blocks with transformers: "
                                         "input.4, input.5"):
        apply(tiny_model("sdxl"), "PAG", blocks="input.1")


def test_sag_on_a_dit_model_gets_a_clear_error(tiny_model):
    with pytest.raises(RuntimeError, match="supports UNet models"):
        apply(tiny_model("flux"), "SAG")


def test_several_blocks_can_be_perturbed(sd15, plain):
    middle_only = sample(apply(sd15, "PAG"), "sd15", steps=3)
    several = sample(apply(sd15, "PAG", blocks="middle, output.3, input.1.0"), "sd15", steps=3)
    assert not torch.allclose(several, middle_only, rtol=1e-3, atol=1e-3)
