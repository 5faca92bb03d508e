"""NAG on tiny SD1.5, SDXL, Wan, Flux and HunyuanVideo models: exactness, the negative, cost, batching."""

import comfy.sample
import comfy.samplers
import pytest
import torch

from devtools import checks
from devtools.sampling import sample
from devtools.testkit import tiny_models
from devtools.testkit.counting import count_rows
from patchlab.kernels import attention as ka
from patchlab.nodes import attention_guidance as ag_nodes
from patchlab.nodes import guidance_skip as skip_nodes
from patchlab.nodes import nag as nodes
from patchlab.nodes import step_cache as sc_nodes
from patchlab.patches import nag
from patchlab.patches.window import SigmaWindow

FULL = {"start_percent": 0.0, "end_percent": 1.0}
NEVER = {"start_percent": 1.0, "end_percent": 1.0}
NAG = {"scale": 5.0, "tau": 2.5, "alpha": 0.5}
LAYOUTS = ["sd15", "sdxl", "wan21", "wan21_i2v", "wan22", "flux", "flux2", "chroma", "hunyuan_video", "sd3",
           "qwen_image", "zimage", "lumina2"]


def close(actual, expected, rel=1e-4):
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * float(expected.abs().max()))


def apply(model, window=FULL, **overrides):
    (patched,) = checks.run_node(nodes.NormalizedAttentionGuidance, model=model, **{**NAG, **overrides}, **window)
    return patched


def run(model, layout, cfg=1.0, **kwargs):
    return sample(model, layout, steps=3, cfg=cfg, **kwargs)


def prompt(layout, seed, batch=1):
    return tiny_models.conditioning(layout, seed=seed, batch=batch)


@pytest.fixture(scope="module", params=LAYOUTS)
def family(request, tiny_model):
    return request.param, tiny_model(request.param)


@pytest.fixture(scope="module")
def plain(family):
    layout, model = family
    return run(model, layout)


# --- what it changes and what it leaves alone --------------------------------------------------------

def test_a_negative_prompt_changes_the_result_at_cfg_1(family, plain):
    layout, model = family
    assert not torch.allclose(run(apply(model), layout), plain, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("off", [{"scale": 1.0}, {"alpha": 0.0}])
def test_scale_1_or_alpha_0_is_the_unpatched_result_exactly(family, plain, off):
    layout, model = family
    assert torch.equal(run(apply(model, **off), layout), plain)


def test_outside_the_window_is_the_unpatched_result_exactly(family, plain):
    layout, model = family
    assert torch.equal(run(apply(model, NEVER), layout), plain)


def test_a_window_over_the_last_steps_leaves_the_first_steps_alone(family):
    layout, model = family
    late = apply(model, {"start_percent": 0.6, "end_percent": 1.0})

    def keep(store):
        return lambda step, x0, x, total: store.setdefault(step, x0.clone())

    plain_steps, late_steps = {}, {}
    sample(model, layout, steps=3, cfg=1.0, callback=keep(plain_steps))
    sample(late, layout, steps=3, cfg=1.0, callback=keep(late_steps))
    assert torch.equal(late_steps[0], plain_steps[0])
    assert not torch.equal(late_steps[2], plain_steps[2])


def test_a_negative_equal_to_the_positive_changes_nothing(family, plain):
    layout, model = family
    same = run(apply(model), layout, negative=prompt(layout, 1))
    close(same, plain, rel=1e-4)


def test_at_cfg_above_1_the_positive_branch_is_guided(family):
    layout, model = family
    assert not torch.allclose(run(apply(model), layout, cfg=4.0), run(model, layout, cfg=4.0), rtol=1e-3, atol=1e-3)


def test_the_input_model_is_left_unchanged(family):
    _, model = family
    before = checks.snapshot(model)
    apply(model)
    checks.assert_unchanged(model, before)


# --- where the negative comes from -----------------------------------------------------------------------

def test_the_nodes_negative_input_replaces_the_samplers(family):
    layout, model = family
    own = apply(model, negative=prompt(layout, 3))
    expected = run(apply(model), layout, negative=prompt(layout, 3))
    assert torch.equal(run(own, layout, negative=prompt(layout, 2)), expected)


def test_a_sampler_without_a_negative_asks_for_the_nodes_input(tiny_model):
    model = apply(tiny_model("sd15"))
    guider = comfy.samplers.CFGGuider(model)
    guider.inner_set_conds({"positive": prompt("sd15", 1)})
    latent = tiny_models.empty_latent("sd15")
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", 2)
    with pytest.raises(RuntimeError, match="'negative' input"):
        guider.sample(torch.randn_like(latent), latent, comfy.samplers.sampler_object("euler"), sigmas)


def test_without_a_negative_the_nodes_own_one_is_used(tiny_model):
    model = tiny_model("sd15")
    guider = comfy.samplers.CFGGuider(apply(model, negative=prompt("sd15", 2)))
    guider.inner_set_conds({"positive": prompt("sd15", 1)})
    latent = tiny_models.empty_latent("sd15")
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", 3)
    noise = comfy.sample.prepare_noise(latent, 0)
    with torch.inference_mode():
        result = guider.sample(noise, latent, comfy.samplers.sampler_object("euler"), sigmas)
    close(result, run(apply(model), "sd15", negative=prompt("sd15", 2)), rel=1e-5)


def test_a_non_finite_negative_is_refused(tiny_model):
    bad = prompt("sd15", 2)
    bad[0][0][0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        run(apply(tiny_model("sd15")), "sd15", negative=bad)


def test_on_hunyuan_video_the_negatives_text_mask_is_applied(tiny_model):
    """A padded prompt with a text mask as positive and negative gives the unguided result (Z- = Z+ only if the
    negative's stream masks its padding as the model masks the positive's); without the mask it does not."""
    model = tiny_model("hunyuan_video")
    tensor, extras = prompt("hunyuan_video", 3)[0]
    junk = 10 * torch.randn(1, 4, tensor.shape[2], generator=torch.Generator().manual_seed(5))
    mask = torch.cat([torch.ones(1, tensor.shape[1]), torch.zeros(1, 4)], dim=1).long()
    padded = [[torch.cat([tensor, junk], dim=1), {**extras, "attention_mask": mask}]]
    plain = run(model, "hunyuan_video", positive=padded)
    close(run(apply(model), "hunyuan_video", positive=padded, negative=padded), plain, rel=1e-4)
    unmasked = [[padded[0][0], extras]]
    assert not torch.allclose(run(apply(model), "hunyuan_video", positive=padded, negative=unmasked), plain,
                              rtol=1e-3, atol=1e-3)


def test_a_family_without_nag_is_refused_with_the_supported_ones(tiny_model):
    with pytest.raises(RuntimeError, match="UNet models .*Wan.*Flux.*SD3.*Qwen-Image.*Z-Image"):
        apply(tiny_model("auraflow"))


# --- cost: the negative never runs as a pass of its own ------------------------------------------------------

def test_the_rows_at_the_first_layer_equal_a_cfg_1_run(family):
    layout, model = family
    with count_rows(model) as unpatched:
        run(model, layout)
    with count_rows(model) as guided:
        run(apply(model), layout)
    assert guided.rows == unpatched.rows == 3


def module_tokens(model, name):
    """Count the tokens (rows x tokens) entering a module of the network during a run."""
    return count_rows(model, name)


def first_block_projections(net, layout):
    """(image-side, text-side) input projection of the first joint block of a joint-attention layout."""
    if layout == "sd3":
        block = net.joint_blocks[0]
        return block.x_block.attn.qkv, block.context_block.attn.qkv
    if layout == "qwen_image":
        attn = net.transformer_blocks[0].attn
        return attn.to_q, attn.add_q_proj
    if layout in ("zimage", "lumina2"):  # one stream: the image's own refiner, the caption's own refiner
        return net.noise_refiner[0].attention.qkv, net.context_refiner[0].attention.qkv
    block = net.double_blocks[0]
    return block.img_attn.qkv, block.txt_attn.qkv


@pytest.mark.parametrize("layout", ["flux", "flux2", "chroma", "hunyuan_video", "sd3", "qwen_image", "zimage",
                                    "lumina2"])
def test_on_joint_attention_models_no_second_image_stream_runs(tiny_model, layout):
    """The image side of a block sees the rows of a CFG-1 run; only the text side gets the negative's tokens."""
    model = tiny_model(layout)
    seen = {}

    def counting(name):
        def hook(module, args):
            seen[name] = seen.get(name, 0) + args[0].shape[0] * args[0].shape[1]
        return hook

    image, text = first_block_projections(model.model.diffusion_model, layout)
    handles = [image.register_forward_pre_hook(counting("image")), text.register_forward_pre_hook(counting("text"))]
    try:
        run(model, layout)
        plain = dict(seen)
        seen.clear()
        run(apply(model), layout)
    finally:
        for handle in handles:
            handle.remove()
    assert seen["image"] == plain["image"]
    assert seen["text"] == 2 * plain["text"]  # the positive's text tokens and the negative's (same length here)


def test_with_pag_the_extra_pass_adds_one_row_per_step_only(tiny_model):
    model = tiny_model("sd15")
    (pag,) = checks.run_node(ag_nodes.PerturbedAttentionGuidance, model=apply(model), scale=2.0, blocks="middle",
                             rescale=0.0, **FULL)
    with count_rows(model) as count:
        run(pag, "sd15")
    assert count.rows == 3 * 2


def counting_guidance(monkeypatch):
    """Count the NAG kernel's calls (one per guided layer and chunk)."""
    calls = []
    kernel = ka.normalized_attention_guidance

    def counted(*args, **kwargs):
        calls.append(1)
        return kernel(*args, **kwargs)

    monkeypatch.setattr(ka, "normalized_attention_guidance", counted)
    return calls


def test_with_step_cache_a_reused_step_is_not_guided_again(tiny_model, monkeypatch):
    """A reused step runs no network, so no NAG: the guidance runs once per evaluated row, never more."""
    model = tiny_model("sd15")
    calls = counting_guidance(monkeypatch)
    run(apply(model), "sd15")
    per_row = len(calls) // 3
    calls.clear()
    (cached,) = checks.run_node(sc_nodes.StepCache, model=apply(model), indicator="input", threshold=0.9,
                                max_consecutive=4, reuse="plain", **FULL)
    with count_rows(model) as count:
        sample(cached, "sd15", steps=8, cfg=1.0)
    assert 0 < count.rows < 8
    assert len(calls) == per_row * count.rows


def test_with_guidance_interval_nag_adds_no_rows(tiny_model):
    """Outside its interval GuidanceInterval skips the negative pass; NAG still guides with the sampler's negative
    and adds no rows: the rows equal GuidanceInterval's alone."""
    model = tiny_model("sd15")

    def interval(base):
        return checks.run_node(skip_nodes.GuidanceInterval, model=base, start_percent=0.3, end_percent=0.7)[0]

    with count_rows(model) as alone:
        plain = run(interval(model), "sd15", cfg=4.0)
    with count_rows(model) as guided:
        result = run(interval(apply(model)), "sd15", cfg=4.0)
    assert guided.rows == alone.rows < 2 * 3
    assert not torch.allclose(result, plain, rtol=1e-3, atol=1e-3)


def test_with_tpg_the_shuffled_pass_adds_one_row_per_step_only(tiny_model):
    model = tiny_model("sd15")
    (tpg,) = checks.run_node(ag_nodes.TokenPerturbationGuidance, model=apply(model), scale=2.0, blocks="auto", seed=1,
                             **FULL)
    with count_rows(model) as count:
        result = run(tpg, "sd15")
    assert count.rows == 3 * 2
    assert not torch.allclose(result, run(apply(model), "sd15"), rtol=1e-3, atol=1e-3)


def test_on_zimage_nag_and_pag_wrap_the_same_layers_and_both_act(tiny_model):
    """Z-Image has no block replace: NAG and PAG both wrap layer forwards for a call; the wraps nest and
    are undone, so each guidance still acts with the other present and the layers are left as they were."""
    model = tiny_model("zimage")

    def pag(base):
        return checks.run_node(ag_nodes.PerturbedAttentionGuidance, model=base, scale=2.0, blocks="auto",
                               rescale=0.0, **FULL)[0]

    both, pag_only, nag_only = run(pag(apply(model)), "zimage"), run(pag(model), "zimage"), run(apply(model), "zimage")
    assert not torch.allclose(both, pag_only, rtol=1e-3, atol=1e-3)
    assert not torch.allclose(both, nag_only, rtol=1e-3, atol=1e-3)
    assert not any("forward" in vars(layer) for layer in model.model.diffusion_model.layers)


# --- batches, chunks, precision, sizes ----------------------------------------------------------------------

def item(conditioning, i):
    """Batch item ``i`` of a one-entry conditioning (its tensor and any per-item extras, the pooled output)."""
    tensor, extras = conditioning[0]
    return [[tensor[i:i + 1], {k: v[i:i + 1] if torch.is_tensor(v) else v for k, v in extras.items()}]]


def test_batch_items_and_chunked_calls_match_batch_one(tiny_model, family):
    layout, _ = family
    latent = comfy.sample.fix_empty_latent_channels(tiny_model(layout), tiny_models.empty_latent(layout, batch=2))
    noise = comfy.sample.prepare_noise(latent, 7)
    prompts = {"positive": prompt(layout, 1, batch=2), "negative": prompt(layout, 2, batch=2)}
    alone = [run(apply(tiny_model(layout)), layout, cfg=4.0, noise=noise[i:i + 1],
                 **{name: item(cond, i) for name, cond in prompts.items()}) for i in range(2)]
    for model in (tiny_model(layout), tiny_model(layout, chunked=True)):
        both = run(apply(model), layout, cfg=4.0, batch=2, noise=noise, **prompts)
        for i in range(2):
            close(both[i:i + 1], alone[i])


def test_odd_non_square_latents_work(family):
    layout, model = family
    # HunyuanVideo does not pad to whole patches (ComfyUI's own model fails on odd sizes): even, non-square
    size = {"height": 12, "width": 22} if layout == "hunyuan_video" else {"height": 13, "width": 22}
    result = run(apply(model), layout, **size)
    assert torch.isfinite(result).all()
    assert not torch.allclose(result, run(model, layout, **size), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("layout, dtype", [("sd15", torch.float16), ("flux", torch.float16), ("flux", torch.bfloat16),
                                           ("wan21", torch.bfloat16), ("sd3", torch.bfloat16),
                                           ("qwen_image", torch.float16)])
def test_half_precision_models_work(tiny_model, layout, dtype):
    model = tiny_model(layout, dtype=dtype)
    result = run(apply(model), layout)
    assert torch.isfinite(result).all()
    assert not torch.allclose(result, run(model, layout), rtol=1e-2, atol=1e-2)


def attention(q, k, v, heads):
    """Plain multi-head softmax attention [B, N, H*D] (the reference)."""
    b, n, _ = q.shape
    q, k, v = (t.reshape(b, t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))
    weights = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    return (weights @ v).transpose(1, 2).reshape(b, n, -1)


def replace_call(tiny_model, cond_or_uncond):
    net = tiny_model("sd15").model.diffusion_model
    extra = {"block": ("middle", 0), "block_index": 0, "cond_or_uncond": cond_or_uncond}
    attn2 = nag.unet.cross_attention(net, extra)
    generator = torch.Generator().manual_seed(0)
    rows = len(cond_or_uncond)
    x = torch.randn(rows, 12, attn2.to_q.in_features, generator=generator)
    positive, negative = (torch.randn(rows, 7, attn2.to_k.in_features, generator=generator) for _ in range(2))
    q, k, v = attn2.to_q(x), attn2.to_k(positive), attn2.to_v(positive)
    spec = nag.NagSpec(scale=5.0, tau=2.5, alpha=0.5, window=SigmaWindow.always())
    extra.update({"n_heads": attn2.heads, nag.core.CALL_KEY: nag.NagCall(spec, negative, net)})
    with torch.no_grad():
        out = nag.unet.make_replace()(q, k, v, extra)
        z_pos = attention(q, k, v, attn2.heads)
        z_neg = attention(q, attn2.to_k(negative), attn2.to_v(negative), attn2.heads)
    return out, z_pos, z_neg, spec


def test_the_cross_attention_is_guided_by_the_formula(tiny_model):
    out, z_pos, z_neg, spec = replace_call(tiny_model, [0])
    close(out, ka.normalized_attention_guidance(z_pos, z_neg, spec.scale, spec.tau, spec.alpha), rel=1e-5)


def test_the_negative_branch_rows_of_cfg_are_left_plain(tiny_model):
    out, z_pos, z_neg, spec = replace_call(tiny_model, [1, 0])
    close(out[:1], z_pos[:1], rel=1e-5)
    close(out[1:], ka.normalized_attention_guidance(z_pos[1:], z_neg[1:], spec.scale, spec.tau, spec.alpha), rel=1e-5)
