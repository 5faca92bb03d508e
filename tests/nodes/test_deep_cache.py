"""DeepCache on tiny SD1.5/SDXL models: exactness, the schedule by counted rows, robustness, composition."""

import copy
import logging
import re

import comfy.sample
import pytest
import torch

from devtools import checks
from devtools.sampling import sample
from devtools.testkit import tiny_models
from devtools.testkit.counting import count_rows
from patchlab.nodes import attention_guidance as guidance_nodes
from patchlab.nodes import blocks as block_nodes
from patchlab.nodes import deep_cache as nodes
from patchlab.nodes import token_merging as tome_nodes
from patchlab.patches import deep_cache as dc

FULL = {"start_percent": 0.0, "end_percent": 1.0}
DEEP = "middle_block.0"  # a ResBlock only full evaluations reach
STEPS = 7  # interval 3: steps 0, 3, 6 in full, 4 cached
SIZE = {"height": 16, "width": 24}
LOGGER = "patchlab.patches.deep_cache"


def deep_cache(model, interval=3, depth=0, window=FULL):
    return checks.run_node(nodes.DeepCache, model=model, interval=interval, depth=depth, **window)[0]


def close(actual, expected, rel=1e-4):
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * float(expected.abs().max()))


def logged_counts(caplog):
    lines = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(lines) == 1, lines
    full, cached = re.search(r"(\d+) full evaluations, (\d+) cached steps", lines[0]).groups()
    return int(full), int(cached), lines[0]


@pytest.fixture(scope="module")
def sd15(tiny_model):
    return tiny_model("sd15")


@pytest.fixture(scope="module")
def sdxl(tiny_model):
    return tiny_model("sdxl")


@pytest.fixture
def info(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    return caplog


# --- the cached step's forward is the real forward -----------------------------------------------

def unet_inputs(layout, model, batch=2):
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(batch, 4, 16, 24, generator=generator)
    timesteps = torch.full((batch,), 500.0)
    context = torch.randn(batch, 16, 64, generator=generator)
    unet = model.model.diffusion_model
    adm = model.model.model_config.unet_config.get("adm_in_channels")
    y = torch.randn(batch, adm, generator=generator) if unet.num_classes is not None else None
    return x, timesteps, context, y


def control_residuals(unet, inputs):
    """ControlNet-style residuals for every input block (and the middle and output), shaped as the real features."""
    shapes = []
    options = {"patches": {"input_block_patch": [lambda h, to: shapes.append(h.shape) or h]}}
    with torch.no_grad():
        unet(*inputs, transformer_options=options)
    generator = torch.Generator().manual_seed(5)
    noise = [torch.randn(shape, generator=generator) * 0.1 for shape in shapes]
    middle = torch.randn(shapes[-1], generator=generator) * 0.1
    return {"input": noise[::-1], "middle": [middle], "output": noise[:]}


@pytest.mark.parametrize("layout", ["sd15", "sdxl"])
def test_shallow_forward_with_this_steps_deep_feature_is_the_full_forward(tiny_model, layout):
    model = tiny_model(layout)
    unet = model.model.diffusion_model
    inputs = unet_inputs(layout, model)
    control = control_residuals(unet, inputs)
    freeu = block_nodes.FreeU_V2().patch(model, 1.3, 1.4, 0.9, 0.2, 0.0, 1.0)[0]
    patches = freeu.model_options["transformer_options"]["patches"]

    def emb_patch(emb, channels, to):
        return emb * 1.1

    def input_patch(h, to):
        return h * 0.97 if to["block"][1] % 2 else h

    def attn1_patch(n, context, value, extra_options):
        return n, context * (1.0 + 0.01 * extra_options["transformer_index"]), value

    for depth in range(dc.max_depth(unet) + 1):
        entry = dc.entry_block(unet, depth)
        captured = {}

        def capture(h, hsp, to, entry=entry, captured=captured):
            if to["block"] == ("output", entry):
                captured["h"] = h.clone()
            return h, hsp

        def options(first=None):
            output = ([first] if first else []) + patches["output_block_patch"]
            return {"patches": {"output_block_patch": output, "emb_patch": [emb_patch],
                                "input_block_patch": [input_patch], "input_block_patch_after_skip": [input_patch],
                                "attn1_patch": [attn1_patch]}}

        with torch.no_grad():
            full = unet(*inputs, control=copy.deepcopy(control), transformer_options=options(capture))
            shallow = dc.shallow_forward(unet, depth, captured["h"], *inputs, control=copy.deepcopy(control),
                                         transformer_options=options())
        torch.testing.assert_close(shallow, full, rtol=1e-5, atol=1e-5, msg=f"depth {depth}")


# --- exactness and the schedule ----------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["sd15", "sdxl"])
def test_interval_one_equals_the_unpatched_model_exactly(tiny_model, layout):
    model = tiny_model(layout)
    assert torch.equal(sample(deep_cache(model, interval=1), layout, steps=STEPS, **SIZE),
                       sample(model, layout, steps=STEPS, **SIZE))


def test_the_input_model_is_left_unchanged(sd15):
    before = checks.snapshot(sd15)
    deep_cache(sd15)
    checks.assert_unchanged(sd15, before)


@pytest.mark.parametrize("layout", ["sd15", "sdxl"])
def test_rows_at_the_first_layer_and_a_deep_block_follow_the_schedule_and_the_log(tiny_model, layout, info):
    model = tiny_model(layout)
    with count_rows(model) as first, count_rows(model, module=DEEP) as deep:
        sample(deep_cache(model), layout, steps=STEPS, **SIZE)
    assert first.rows == 2 * STEPS  # cond + uncond reach the first layer on every step
    assert deep.rows == 2 * 3
    assert logged_counts(info)[:2] == (3, 4)


def test_cached_steps_change_the_result_but_stay_near_it(sd15):
    plain = sample(sd15, "sd15", steps=STEPS, **SIZE)
    cached = sample(deep_cache(sd15), "sd15", steps=STEPS, **SIZE)
    distance = float((cached - plain).norm() / plain.norm())
    assert 0.0 < distance < 0.5


def test_a_deeper_branch_lands_closer_to_the_uncached_result(sd15):
    plain = sample(sd15, "sd15", steps=STEPS, **SIZE)
    distances = [float((sample(deep_cache(sd15, depth=d), "sd15", steps=STEPS, **SIZE) - plain).norm())
                 for d in (0, 11)]
    assert distances[1] < distances[0]


def test_the_window_keeps_steps_outside_it_in_full(sd15, info):
    with count_rows(sd15, module=DEEP) as deep:
        sample(deep_cache(sd15, window={"start_percent": 0.5, "end_percent": 1.0}), "sd15", steps=STEPS, **SIZE)
    full, cached, _ = logged_counts(info)
    assert cached > 0 and full + cached < STEPS  # steps before the window are neither cached nor counted
    assert deep.rows == 2 * (STEPS - cached)


def test_flux_gets_an_error_naming_the_supported_families(tiny_model):
    with pytest.raises(RuntimeError, match="SD1.x, SD2.x and SDXL"):
        deep_cache(tiny_model("flux"))


def test_a_depth_beyond_the_models_branches_is_rejected(sdxl):
    with pytest.raises(ValueError, match="use 0 to 8"):
        deep_cache(sdxl, depth=9)


def test_validate_inputs_flags_a_reversed_window():
    assert nodes.DeepCache.VALIDATE_INPUTS(start_percent=0.8, end_percent=0.2) is not True


# --- robustness ------------------------------------------------------------------------------------------

def test_batch_two_item_zero_equals_batch_one(sd15):
    patched = deep_cache(sd15)
    one = sample(patched, "sd15", steps=STEPS, **SIZE)
    two = sample(patched, "sd15", steps=STEPS, batch=2, **SIZE)
    close(two[:1], one)


def test_chunked_cond_and_uncond_equal_one_batched_call(tiny_model):
    batched = sample(deep_cache(tiny_model("sd15")), "sd15", steps=STEPS, **SIZE)
    chunked_model = tiny_model("sd15", chunked=True)
    with count_rows(chunked_model, module=DEEP) as deep:
        chunked = sample(deep_cache(chunked_model), "sd15", steps=STEPS, **SIZE)
    close(chunked, batched)
    assert deep.calls == [1] * 6  # cond and uncond in separate calls, three full steps


def test_a_latent_size_change_between_runs_matches_a_fresh_model(sd15):
    patched = deep_cache(sd15)
    sample(patched, "sd15", steps=STEPS, height=16, width=16)
    assert torch.equal(sample(patched, "sd15", steps=STEPS, height=24, width=8),
                       sample(deep_cache(sd15), "sd15", steps=STEPS, height=24, width=8))


def test_steps_and_sampler_changed_between_runs_match_a_fresh_model(sd15):
    patched = deep_cache(sd15)
    sample(patched, "sd15", steps=STEPS, **SIZE)
    again = sample(patched, "sd15", steps=5, sampler="dpmpp_2m", scheduler="karras", **SIZE)
    assert torch.equal(again, sample(deep_cache(sd15), "sd15", steps=5, sampler="dpmpp_2m", scheduler="karras",
                                     **SIZE))


class Interrupt(Exception):
    pass


def test_an_interrupted_run_leaves_nothing_behind(sd15, info):
    patched = deep_cache(sd15)
    latent = tiny_models.empty_latent("sd15", 16, 16)
    noise = comfy.sample.prepare_noise(latent, 7)
    positive, negative = tiny_models.conditioning("sd15", seed=1), tiny_models.conditioning("sd15", seed=2)

    def stop(step, *args):
        if step == 4:
            raise Interrupt

    with pytest.raises(Interrupt):
        comfy.sample.sample(patched, noise, STEPS, 5.0, "euler", "normal", positive, negative, latent,
                            callback=stop, disable_pbar=True, seed=7)
    assert "interrupted" in logged_counts(info)[2]
    assert torch.equal(sample(patched, "sd15", steps=STEPS, **SIZE), sample(deep_cache(sd15), "sd15", steps=STEPS,
                                                                          **SIZE))


def test_fp16_model_follows_the_schedule(tiny_model, info):
    model = tiny_model("sd15", dtype=torch.float16)
    with count_rows(model, module=DEEP) as deep:
        out = sample(deep_cache(model), "sd15", steps=STEPS, **SIZE)
    assert torch.isfinite(out).all()
    assert deep.rows == 6 and logged_counts(info)[:2] == (3, 4)


def test_fp16_interval_one_is_exact(tiny_model):
    model = tiny_model("sd15", dtype=torch.float16)
    assert torch.equal(sample(deep_cache(model, interval=1), "sd15", steps=3, **SIZE),
                       sample(model, "sd15", steps=3, **SIZE))


def test_img2img_counts_only_the_steps_it_runs(sd15, info):
    latent = torch.randn(1, 4, 16, 24, generator=torch.Generator().manual_seed(9))
    with count_rows(sd15, module=DEEP) as deep:
        sample(deep_cache(sd15), "sd15", steps=8, latent=latent, denoise=0.5)
    full, cached, line = logged_counts(info)
    assert (full, cached) == (3, 5) and "of 8" in line  # 8 steps of a 16-step schedule run: 0, 3, 6 in full
    assert deep.rows == 6


def test_inpainting_keeps_the_unmasked_latent(sd15):
    latent = torch.randn(1, 4, 16, 24, generator=torch.Generator().manual_seed(9))
    mask = torch.zeros(1, 16 * 8, 24 * 8)
    mask[:, :, : 12 * 8] = 1.0
    out = sample(deep_cache(sd15), "sd15", steps=STEPS, latent=latent, noise_mask=mask)
    plain = sample(sd15, "sd15", steps=STEPS, latent=latent, noise_mask=mask)
    close(out[..., 12:], plain[..., 12:])
    assert not torch.allclose(out[..., :12], plain[..., :12])


@pytest.mark.parametrize("sampler,first_rows,deep_rows", [
    ("dpmpp_2m", 2 * STEPS, 6),             # multistep: one call per step
    ("dpmpp_2m_sde", 2 * STEPS, 6),         # SDE, one call per step
    ("dpmpp_sde", 2 * (2 * STEPS - 1), 10),  # two calls per step (the second between sigmas), the last step one
    ("heun", 2 * (2 * STEPS - 1), 10),       # the correction call sits on the next step's sigma
])
def test_sde_and_multistep_samplers_count_steps_by_sigma(sd15, info, sampler, first_rows, deep_rows):
    with count_rows(sd15) as first, count_rows(sd15, module=DEEP) as deep:
        out = sample(deep_cache(sd15), "sd15", steps=STEPS, sampler=sampler, **SIZE)
    assert torch.isfinite(out).all()
    assert first.rows == first_rows and deep.rows == deep_rows
    assert logged_counts(info)[:2] == (3, 4)


# --- composition -------------------------------------------------------------------------------------------

def tome(model):
    return checks.run_node(tome_nodes.TokenMerging, model=model, ratio=0.5, max_downsample=1, stride_x=2,
                           stride_y=2, destinations="random", seed=0, metric="input",
                           merge="queries, keys and values", **FULL)[0]


def freeu_v2(model):
    return checks.run_node(block_nodes.FreeU_V2, model=model, b1=1.3, b2=1.4, s1=0.9, s2=0.2, **FULL)[0]


def pag(model):
    return checks.run_node(guidance_nodes.PerturbedAttentionGuidance, model=model, scale=3.0, blocks="middle",
                           rescale=0.0, **FULL)[0]


@pytest.mark.parametrize("other", [tome, freeu_v2, pag])
@pytest.mark.parametrize("deep_cache_first", [False, True])
def test_interval_one_leaves_other_patches_exactly_as_they_are(sd15, other, deep_cache_first):
    stacked = other(deep_cache(sd15, interval=1)) if deep_cache_first else deep_cache(other(sd15), interval=1)
    assert torch.equal(sample(stacked, "sd15", steps=STEPS, **SIZE), sample(other(sd15), "sd15", steps=STEPS,
                                                                            **SIZE))


@pytest.mark.parametrize("other", [tome, freeu_v2])
def test_cached_steps_keep_other_patches_working(sd15, other, info):
    with count_rows(sd15, module=DEEP) as deep:
        with_other = sample(deep_cache(other(sd15)), "sd15", steps=STEPS, **SIZE)
    assert deep.rows == 6 and logged_counts(info)[:2] == (3, 4)
    assert not torch.allclose(with_other, sample(deep_cache(sd15), "sd15", steps=STEPS, **SIZE))


@pytest.mark.parametrize("deep_cache_first", [False, True])
def test_the_pag_pass_is_never_served_from_the_cache(sd15, info, deep_cache_first):
    stacked = pag(deep_cache(sd15)) if deep_cache_first else deep_cache(pag(sd15))
    with count_rows(sd15, module=DEEP) as deep:
        sample(stacked, "sd15", steps=STEPS, **SIZE)
    assert deep.rows == 2 * 3 + STEPS  # cond + uncond on full steps, the perturbed pass on every step
    full, cached, line = logged_counts(info)
    assert (full, cached) == (3, 4) and f"{STEPS} extra guidance passes" in line


def test_core_pag_pass_is_never_served_from_the_cache(sd15, core_nodes, info):
    (stacked,) = checks.run_node(core_nodes["PerturbedAttentionGuidance"], model=deep_cache(sd15), scale=3.0)
    with count_rows(sd15, module=DEEP) as deep:
        sample(stacked, "sd15", steps=STEPS, **SIZE)
    assert deep.rows == 2 * 3 + STEPS
