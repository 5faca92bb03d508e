"""PAG, SEG and SLG on tiny DiTs (Flux, Flux.2, Chroma, SD3/MMDiT, Qwen-Image, Wan 2.1/2.2, HunyuanVideo, Z-Image,
Lumina 2): exactness, locality, batching, parity with core SLG."""

import contextlib

import comfy.sample
import pytest
import torch

from devtools import checks
from devtools.sampling import sample
from devtools.testkit import tiny_models
from devtools.testkit.counting import count_rows
from patchlab.nodes import attention_guidance as nodes
from patchlab.patches.attention_guidance import dit as dit_attention

FULL = {"start_percent": 0.0, "end_percent": 1.0}
NEVER = {"start_percent": 1.0, "end_percent": 1.0}
PAG = {"scale": 3.0, "blocks": "auto", "rescale": 0.0}
SEG = {"scale": 3.0, "blur_sigma": 10.0, "blocks": "auto"}
SLG = {"scale": 3.0, "blocks": "auto", "rescaling_scale": 0.0}
TPG = {"scale": 3.0, "blocks": "auto", "seed": 0}
OURS = {"PAG": (nodes.PerturbedAttentionGuidance, PAG), "SEG": (nodes.SmoothedEnergyGuidance, SEG),
        "SLG": (nodes.SkipLayerGuidance, SLG), "TPG": (nodes.TokenPerturbationGuidance, TPG)}
FAMILIES = ["flux", "sd3", "qwen_image", "flux2", "chroma", "wan21", "wan22", "hunyuan_video", "zimage", "lumina2"]
# Flux, Flux.2, HunyuanVideo: guidance-distilled, and Z-Image Turbo: sampled at cfg 1 (no negative pass);
# the others with real CFG.
CFG = {"flux": 1.0, "sd3": 4.0, "qwen_image": 4.0, "flux2": 1.0, "chroma": 4.0, "wan21": 4.0, "wan22": 4.0,
       "hunyuan_video": 1.0, "zimage": 1.0, "lumina2": 4.0}
UNSUPPORTED = ["auraflow"]  # a DiT whose blocks no node addresses: refused before the run


def close(actual, expected, rel=1e-4):
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * float(expected.abs().max()))


def apply(model, name, window=FULL, **overrides):
    node, inputs = OURS[name]
    (patched,) = checks.run_node(node, model=model, **{**inputs, **overrides}, **window)
    return patched


def run(model, layout, **kwargs):
    return sample(model, layout, steps=3, cfg=CFG[layout], **kwargs)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tiny_model):
    return request.param, tiny_model(request.param)


@pytest.fixture(scope="module")
def plain(family):
    layout, model = family
    return run(model, layout)


@pytest.mark.parametrize("name", list(OURS))
def test_guidance_changes_the_result(family, plain, name):
    layout, model = family
    assert not torch.allclose(run(apply(model, name), layout), plain, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("name", list(OURS))
def test_scale_zero_is_the_unpatched_result_exactly(family, plain, name):
    layout, model = family
    assert torch.equal(run(apply(model, name, scale=0.0), layout), plain)


@pytest.mark.parametrize("name", list(OURS))
def test_outside_the_window_is_the_unpatched_result_exactly(family, plain, name):
    layout, model = family
    assert torch.equal(run(apply(model, name, NEVER), layout), plain)


@pytest.mark.parametrize("name", list(OURS))
def test_batch_items_and_chunked_calls_match_batch_one_unchunked(tiny_model, family, name):
    layout, model = family
    latent = comfy.sample.fix_empty_latent_channels(model, tiny_models.empty_latent(layout, batch=2))
    noise = comfy.sample.prepare_noise(latent, 7)  # Qwen-Image's latent has a frame axis
    prompts = {"positive": tiny_models.conditioning(layout, seed=1),
               "negative": tiny_models.conditioning(layout, seed=2)}
    alone = [run(apply(tiny_model(layout), name), layout, noise=noise[i:i + 1], **prompts) for i in range(2)]
    for model in (tiny_model(layout), tiny_model(layout, chunked=True)):
        both = run(apply(model, name), layout, batch=2, noise=noise, **prompts)
        for i in range(2):
            close(both[i:i + 1], alone[i])


@pytest.mark.parametrize("name", list(OURS))
def test_odd_non_square_latents_work(family, name):
    layout, model = family
    # HunyuanVideo does not pad to whole patches (ComfyUI's own model fails on odd sizes): even, non-square
    size = {"height": 12, "width": 22} if layout == "hunyuan_video" else {"height": 13, "width": 22}
    result = run(apply(model, name), layout, **size)
    assert torch.isfinite(result).all()
    assert not torch.allclose(result, run(model, layout, **size), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", list(OURS))
def test_half_precision_models_work(tiny_model, name, dtype):
    model = tiny_model("flux", dtype=dtype)
    result = run(apply(model, name), "flux")
    assert torch.isfinite(result).all()
    assert not torch.allclose(result, run(model, "flux"), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("name", list(OURS))
def test_the_input_model_is_left_unchanged(family, name):
    _, model = family
    before = checks.snapshot(model)
    apply(model, name)
    checks.assert_unchanged(model, before)


# --- only the chosen blocks, only the extra pass's own rows ------------------------------------------

@contextlib.contextmanager
def attention_log(model):
    """Record every attention call as (block name, perturbed by PatchLab, in an extra pass)."""
    net = model.model.diffusion_model
    current, calls, handles = [None], [], []
    handles.append(net.register_forward_pre_hook(lambda _m, _a: current.__setitem__(0, "outside a block")))
    for attr in ("double_blocks", "single_blocks", "joint_blocks", "transformer_blocks", "blocks", "layers",
                 "context_refiner", "noise_refiner"):
        for i, block in enumerate(getattr(net, attr, ())):
            name = f"{attr}.{i}"
            handles.append(block.register_forward_pre_hook(lambda _m, _a, name=name: current.__setitem__(0, name)))

    def recorder(func, *args, **kwargs):
        options = kwargs.get("transformer_options", {})
        override = options.get("optimized_attention_override")
        calls.append((current[0], getattr(override, "patchlab_attention", False),
                      options.get(dit_attention.PASS_KEY) is not None))
        return func(*args, **kwargs)

    logged = model.clone()
    logged.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = recorder
    try:
        yield logged, calls
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("name", ["PAG", "SEG"])
@pytest.mark.parametrize("layout,blocks,chosen", [("flux", "single.1", {"single_blocks.1"}),
                                                  ("flux", "double.0", {"double_blocks.0"}),
                                                  ("sd3", "joint.0, joint.2", {"joint_blocks.0", "joint_blocks.2"}),
                                                  ("qwen_image", "double.0, double.2",
                                                   {"transformer_blocks.0", "transformer_blocks.2"}),
                                                  ("wan21", "double.1", {"blocks.1"}),
                                                  ("hunyuan_video", "single.1", {"single_blocks.1"}),
                                                  ("hunyuan_video", "double.0", {"double_blocks.0"}),
                                                  ("zimage", "single.1", {"layers.1"})])
def test_only_the_chosen_blocks_see_perturbed_attention(tiny_model, name, layout, blocks, chosen):
    with attention_log(tiny_model(layout)) as (logged, calls):
        run(apply(logged, name, blocks=blocks), layout)
    every_block = {block for block, _, _ in calls}
    assert {block for block, ours, _ in calls if ours} == chosen
    assert all(extra for _, ours, extra in calls if ours)  # never in the cond/uncond passes
    assert {block for block, ours, extra in calls if extra and not ours} == every_block - chosen


def test_pag_changes_only_the_image_rows_of_its_own_batch_rows(tiny_model):
    """In a batched pass with SLG rows beside it, PAG's perturbation lands in PAG's rows only."""
    model = tiny_model("flux")
    stack = apply(apply(model, "SLG", blocks="single.0"), "PAG", blocks="double.0")
    outputs = []
    net = model.model.diffusion_model
    handle = net.double_blocks[0].register_forward_hook(lambda _m, _a, out: outputs.append([o.clone() for o in out]))
    try:
        run(stack, "flux")
    finally:
        handle.remove()
    # Two calls per step: the cond pass (1 row) and the extra pass (SLG row, PAG row).
    cond, extra = outputs[0], outputs[1]
    assert extra[0].shape[0] == 2
    close(extra[0][0:1], cond[0], rel=1e-5)  # SLG row: double.0 untouched
    assert not torch.allclose(extra[0][1:2], cond[0], rtol=1e-3, atol=1e-3)  # PAG row perturbed


def test_pag_on_qwen_image_perturbs_the_image_tokens_and_leaves_the_text_tokens(tiny_model):
    """Qwen-Image's joint attention runs over [text; image]: PAG changes only the image part of its output."""
    model = tiny_model("qwen_image")
    attn = model.model.diffusion_model.transformer_blocks[0].attn
    seen = {"text": [], "image": []}
    handles = [attn.to_add_out.register_forward_pre_hook(lambda _m, a: seen["text"].append(a[0].clone())),
               attn.to_out[0].register_forward_pre_hook(lambda _m, a: seen["image"].append(a[0].clone()))]
    try:
        sample(apply(model, "PAG", blocks="double.0"), "qwen_image", steps=1, cfg=1.0)
    finally:
        for handle in handles:
            handle.remove()
    # One step at CFG 1: the cond pass, then PAG's extra pass on the same input.
    assert [len(seen["text"]), len(seen["image"])] == [2, 2]
    close(seen["text"][1], seen["text"][0], rel=1e-5)
    assert not torch.allclose(seen["image"][1], seen["image"][0], rtol=1e-3, atol=1e-3)


def test_pag_on_wan_makes_self_attention_the_identity_and_leaves_cross_attention(tiny_model):
    """Wan's self-attention is its own call: PAG turns it into its values (the identity map over tokens); the
    cross-attention that follows in the same block reads the text as in the unperturbed pass."""
    model = tiny_model("wan21")
    block = model.model.diffusion_model.blocks[1]
    seen = {"self": [], "cross": []}

    def record(kind):
        return lambda module, args, kwargs, out: seen[kind].append((module, args[0].clone(), args[1], out.clone()))

    handles = [block.self_attn.register_forward_hook(record("self"), with_kwargs=True),
               block.cross_attn.register_forward_hook(record("cross"), with_kwargs=True)]
    try:
        sample(apply(model, "PAG", blocks="double.1"), "wan21", steps=1, cfg=1.0)
    finally:
        for handle in handles:
            handle.remove()
    # One step at CFG 1: the cond pass, then PAG's extra pass.
    attn, x, _freqs, out = seen["self"][1]
    with torch.no_grad():
        close(out, attn.o(attn.v(x)), rel=1e-5)
        attn, x, context, out = seen["cross"][1]
        close(out, attn(x, context), rel=1e-5)
    assert not torch.allclose(seen["self"][1][3], seen["self"][0][3], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("layout,module,image_first", [
    ("hunyuan_video", lambda net: net.single_blocks[1].linear2, True),   # [image; text], attention then MLP
    ("zimage", lambda net: net.layers[1].attention.out, False),          # [text (padded to 32); image (padded)]
    ("lumina2", lambda net: net.layers[1].attention.out, False),
])
def test_pag_in_a_single_stream_block_perturbs_the_image_tokens_and_leaves_the_text_tokens(
        tiny_model, layout, module, image_first):
    model = tiny_model(layout)
    net = model.model.diffusion_model
    seen = []
    handle = module(net).register_forward_pre_hook(lambda _m, a: seen.append(a[0].clone()))
    try:
        sample(apply(model, "PAG", blocks="single.1"), layout, steps=1, cfg=1.0)
    finally:
        handle.remove()
    cond, extra = seen  # one step at CFG 1: the cond pass, then PAG's extra pass
    width = getattr(net, "hidden_size", None) or net.dim
    cond, extra = cond[..., :width], extra[..., :width]  # HunyuanVideo: the attention part of [attention; MLP]
    image = 3 * 8 * 8 if layout == "hunyuan_video" else 8 * 8  # the latent's patch grid
    text = cond.shape[1] - image - (-image % 32 if layout == "zimage" else 0)
    image_rows, text_rows = (slice(0, image), slice(image, None)) if image_first else (
        slice(text, text + image), slice(0, text))
    close(extra[:, text_rows], cond[:, text_rows], rel=1e-5)
    assert not torch.allclose(extra[:, image_rows], cond[:, image_rows], rtol=1e-3, atol=1e-3)


def test_slg_on_z_image_passes_the_skipped_layers_input_through(tiny_model):
    """Z-Image's NextDiT has no block replace: the layer's forward is wrapped in the extra pass only."""
    model = tiny_model("zimage")
    layer = model.model.diffusion_model.layers[1]
    seen = []
    handle = layer.register_forward_hook(lambda _m, args, out: seen.append((args[0].clone(), out.clone())))
    try:
        sample(apply(model, "SLG", blocks="single.1"), "zimage", steps=1, cfg=1.0)
    finally:
        handle.remove()
    (cond_in, cond_out), (extra_in, extra_out) = seen
    assert torch.equal(extra_out, extra_in)
    assert not torch.allclose(cond_out, cond_in, rtol=1e-3, atol=1e-3)


def test_z_image_layers_keep_their_own_forward_after_the_run(tiny_model):
    model = tiny_model("zimage")
    run(apply(apply(model, "PAG", blocks="single.0"), "SLG", blocks="single.1"), "zimage")
    assert not any("forward" in vars(layer) for layer in model.model.diffusion_model.layers)


@pytest.mark.parametrize("layout,blocks,core_layers", [
    ("qwen_image", "double.1", {"double_layers": "1", "single_layers": ""}),
    ("wan21", "double.1", {"double_layers": "1", "single_layers": ""}),
    ("hunyuan_video", "double.0, single.1", {"double_layers": "0", "single_layers": "1"}),
])
def test_slg_matches_core_skip_layer_guidance_dit(core_nodes, tiny_model, layout, blocks, core_layers):
    model = tiny_model(layout)
    window = {"start_percent": 0.0, "end_percent": 0.6}
    (core,) = checks.run_node(core_nodes["SkipLayerGuidanceDiT"], model=model, scale=3.0, rescaling_scale=0.0,
                              **core_layers, **window)
    ours = apply(model, "SLG", window, blocks=blocks)
    result = sample(ours, layout, steps=6, cfg=CFG[layout])
    close(result, sample(core, layout, steps=6, cfg=CFG[layout]), rel=1e-5)
    assert not torch.allclose(result, sample(model, layout, steps=6, cfg=CFG[layout]), rtol=1e-3, atol=1e-3)


# --- Skip-Layer Guidance: parity with core ---------------------------------------------------------------

@pytest.mark.parametrize("rescaling_scale", [0.0, 0.7])
def test_slg_matches_core_skip_layer_guidance_dit_on_flux(core_nodes, tiny_model, rescaling_scale):
    model = tiny_model("flux")
    window = {"start_percent": 0.0, "end_percent": 0.5}
    (core,) = checks.run_node(core_nodes["SkipLayerGuidanceDiT"], model=model, double_layers="0", single_layers="1",
                              scale=3.0, rescaling_scale=rescaling_scale, **window)
    ours = apply(model, "SLG", window, blocks="double.0, single.1", rescaling_scale=rescaling_scale)
    close(sample(ours, "flux", steps=6, cfg=1.0), sample(core, "flux", steps=6, cfg=1.0), rel=1e-5)


def test_slg_matches_core_skip_layer_guidance_sd3(core_nodes, tiny_model):
    model = tiny_model("sd3")
    window = {"start_percent": 0.0, "end_percent": 0.6}
    (core,) = checks.run_node(core_nodes["SkipLayerGuidanceSD3"], model=model, layers="1", scale=3.0, **window)
    ours = apply(model, "SLG", window, blocks="joint.1")
    result = sample(ours, "sd3", steps=6, cfg=4.0)
    close(result, sample(core, "sd3", steps=6, cfg=4.0), rel=1e-5)
    assert not torch.allclose(result, sample(model, "sd3", steps=6, cfg=4.0), rtol=1e-3, atol=1e-3)


def test_slg_rescaling_is_per_image_where_core_pools_the_batch(core_nodes, tiny_model):
    model = tiny_model("flux")
    noise = comfy.sample.prepare_noise(tiny_models.empty_latent("flux", batch=2), 3)
    noise = torch.cat([noise[:1], noise[1:] * 3])
    inputs = {"scale": 3.0, "rescaling_scale": 0.7}
    (core,) = checks.run_node(core_nodes["SkipLayerGuidanceDiT"], model=model, double_layers="0", single_layers="",
                              **inputs, **FULL)
    ours = apply(model, "SLG", blocks="double.0", **inputs)
    alone = run(ours, "flux", noise=noise[:1], positive=tiny_models.conditioning("flux", seed=1))
    prompt = tiny_models.conditioning("flux", seed=1)
    close(run(ours, "flux", batch=2, noise=noise, positive=prompt)[:1], alone)
    core_alone = run(core, "flux", noise=noise[:1], positive=prompt)
    assert not torch.allclose(run(core, "flux", batch=2, noise=noise, positive=prompt)[:1], core_alone,
                              rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layout", UNSUPPORTED)
@pytest.mark.parametrize("name", list(OURS))
def test_a_family_without_block_addresses_is_refused_naming_the_supported_ones(tiny_model, layout, name):
    supported = (r"supports UNet models .* Flux, Flux.2, Chroma, SD3/SD3.5, Qwen-Image, Wan 2.1/2.2, HunyuanVideo, "
                 r"Z-Image, Lumina 2 \(untested: Wan VACE / camera / HuMo\); this model is AuraFlow with a MMDiT "
                 r"network")
    with pytest.raises(RuntimeError, match=supported):
        apply(tiny_model(layout), name)


# --- one batched extra call ---------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", FAMILIES)
def test_pag_seg_slg_and_tpg_share_one_batched_extra_call_per_step(tiny_model, layout):
    model = tiny_model(layout)
    stack = apply(apply(apply(apply(model, "PAG"), "SEG"), "SLG"), "TPG")
    with count_rows(model) as count:
        run(stack, layout)
    per_step = [1, 4] if CFG[layout] == 1.0 else [2, 4]
    assert count.calls == per_step * 3


def test_every_extra_pass_carries_the_guidance_pass_tag(tiny_model):
    model = tiny_model("flux")
    tags = []

    def wrapper(apply_model, args):
        tags.append(args["c"]["transformer_options"].get(dit_attention.PASS_KEY) is not None)
        return apply_model(args["input"], args["timestep"], **args["c"])

    counted = model.clone()
    counted.set_model_unet_function_wrapper(wrapper)
    run(apply(apply(counted, "PAG"), "SLG"), "flux")
    assert tags == [False, True] * 3


# --- chaining ---------------------------------------------------------------------------------------------

def test_another_packs_block_replace_and_attention_override_are_chained(tiny_model):
    calls = []

    def other_block(args, extra):
        calls.append("block")
        return extra["original_block"](args)

    def other_override(func, *args, **kwargs):
        calls.append("attention")
        return func(*args, **kwargs)

    other = tiny_model("flux").clone()
    other.set_model_patch_replace(other_block, "dit", "double_block", 0)
    other.model_options["transformer_options"]["optimized_attention_override"] = other_override
    result = run(apply(other, "PAG", blocks="double.0"), "flux")
    assert calls.count("block") == 6 and calls.count("attention") > 6
    assert not torch.allclose(result, run(other, "flux"), rtol=1e-3, atol=1e-3)


# --- addresses and errors ---------------------------------------------------------------------------------

def test_auto_picks_the_families_recommended_blocks(tiny_model):
    resolve = nodes.ag.resolve_blocks
    assert resolve(tiny_model("flux"), "auto", "X") == {("double", 0)}
    assert resolve(tiny_model("sd3"), "auto", "X") == {("joint", 1)}
    assert resolve(tiny_model("sd15"), "auto", "X") == resolve(tiny_model("sd15"), "middle", "X")
    assert resolve(tiny_model("flux"), "all", "X") == {("double", 0), ("single", 0), ("single", 1)}
    assert resolve(tiny_model("flux"), "single.0-1", "X") == {("single", 0), ("single", 1)}
    assert resolve(tiny_model("qwen_image"), "auto", "X") == {("double", 1)}
    assert resolve(tiny_model("qwen_image"), "all", "X") == {("double", 0), ("double", 1), ("double", 2)}


def test_auto_on_a_60_block_qwen_image_is_the_relative_depth_of_fluxs_blocks(tiny_model):
    model = tiny_model("qwen_image", num_layers=60)
    assert nodes.ag.resolve_blocks(model, "auto", "X") == {("double", i) for i in range(22, 29)}


@pytest.mark.parametrize("layout,blocks,message", [
    ("flux", "double.5", "'double.5' does not exist in this model; it has double.0, single.0-1"),
    ("flux", "joint.0", "no 'joint' blocks; it has double.0, single.0-1"),
    ("sd3", "single.0-3", "no 'single' blocks; it has joint.0-2"),
    ("qwen_image", "double.3", "'double.3' does not exist in this model; it has double.0-2"),
    ("qwen_image", "joint.0", "no 'joint' blocks; it has double.0-2"),
    ("qwen_image", "input.4", "'input.4' is a UNet address; this model is a DiT with blocks double.0-2"),
    ("flux", "middle", "'middle' is a UNet address; this model is a DiT with blocks double.0, single.0-1"),
    ("sd15", "double.0", "'double.0' is a DiT address; this model is a UNet"),
])
def test_a_block_the_model_lacks_is_an_error_listing_its_blocks(tiny_model, layout, blocks, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        apply(tiny_model(layout), "PAG", blocks=blocks)


def test_dit_addresses_pass_the_syntax_check():
    assert nodes.SkipLayerGuidance.VALIDATE_INPUTS(blocks="double.7-9, single.0, joint.10, auto, all") is True
    assert "cannot read block" in nodes.SkipLayerGuidance.VALIDATE_INPUTS(blocks="double.x")


def test_sag_keeps_its_clear_error_on_dits(tiny_model):
    with pytest.raises(RuntimeError, match="supports UNet models"):
        checks.run_node(nodes.SelfAttentionGuidance, model=tiny_model("flux"), scale=0.5, blur_sigma=2.0,
                        threshold=1.0, block="middle.0.0", **FULL)


def test_an_unsupported_dit_gets_a_clear_error(tiny_model):
    with pytest.raises(RuntimeError, match="supports UNet models .* Flux, .*SD3.* Qwen-Image"):
        apply(tiny_model("auraflow"), "PAG")


def test_the_seg_grid_follows_the_padded_patch_grid():
    options = {dit_attention.LATENT_KEY: (1, 16, 13, 22)}
    assert dit_attention._grid(options, (1, 2, 2), 7 * 11) == (7, 11)
    assert dit_attention._grid(options, (1, 2, 2), 7 * 11 + 4) == (7, 11)  # reference tokens after the grid
    qwen_image = {dit_attention.LATENT_KEY: (1, 16, 1, 13, 22)}
    assert dit_attention._grid(qwen_image, (1, 2, 2), 7 * 11) == (7, 11)
    video = {dit_attention.LATENT_KEY: (1, 16, 3, 13, 22)}  # Wan, HunyuanVideo: (1, 2, 2) patches
    assert dit_attention._grid(video, (1, 2, 2), 3 * 7 * 11) == (3, 7, 11)
