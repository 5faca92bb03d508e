"""Every test-kit layout of the families people run now samples through the real server.

The tiny checkpoint (Wan 2.1, Wan 2.2 5B, HunyuanVideo, Z-Image, Flux.2, Chroma) goes through the
family's own empty-latent node, ComfyUI's KSampler and the test-kit VAE into a preview; the video
layouts sample several latent frames, each previewed as a picture. PAG, SEG and SLG, stacked, sample
through the server on the families whose blocks they newly address.
"""

import pytest
from PIL import Image

pytestmark = pytest.mark.e2e

VIDEO = {"width": 64, "height": 64, "length": 9, "batch_size": 1}  # 9 frames -> 3 latent frames of 8x8
# layout -> (empty-latent node, its inputs, pictures the preview gets, picture size in pixels)
LATENTS = {
    "wan21": ("EmptyHunyuanLatentVideo", VIDEO, 3, 64),
    "wan22": ("Wan22ImageToVideoLatent", {**VIDEO, "width": 128, "height": 128}, 3, 128),
    "hunyuan_video": ("EmptyHunyuanLatentVideo", VIDEO, 3, 64),
    "zimage": ("EmptySD3LatentImage", {"width": 64, "height": 64, "batch_size": 1}, 1, 64),
    "flux2": ("EmptyFlux2LatentImage", {"width": 128, "height": 128, "batch_size": 1}, 1, 128),
    "chroma": ("EmptySD3LatentImage", {"width": 64, "height": 64, "batch_size": 1}, 1, 64),
}


def prompt(layout):
    node, inputs, _, _ = LATENTS[layout]
    latent_inputs = dict(inputs, vae=["1", 2]) if node == "Wan22ImageToVideoLatent" else dict(inputs)
    return {
        "1": {"class_type": "PatchLabTest_TinyCheckpoint", "inputs": {"layout": layout, "seed": 0}},
        "2": {"class_type": "PatchLabTest_TinyTextEncode", "inputs": {"text": "a lighthouse", "clip": ["1", 1]}},
        "3": {"class_type": "PatchLabTest_TinyTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
        "4": {"class_type": node, "inputs": latent_inputs},
        "5": {"class_type": "KSampler",
              "inputs": {"model": ["1", 0], "seed": 0, "steps": 2, "cfg": 4.0, "sampler_name": "euler",
                         "scheduler": "normal", "positive": ["2", 0], "negative": ["3", 0],
                         "latent_image": ["4", 0], "denoise": 1.0}},
        "6": {"class_type": "PatchLabTest_TinyVAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "PreviewImage", "inputs": {"images": ["6", 0]}},
    }


@pytest.mark.parametrize("layout", sorted(LATENTS))
def test_the_layout_samples_through_the_server(server, layout):
    _, _, pictures, size = LATENTS[layout]
    paths = server.output_images(server.run(prompt(layout)))
    assert len(paths) == pictures
    assert all(Image.open(path).size == (size, size) for path in paths)


GUIDANCE = [("PatchLab_PerturbedAttentionGuidance", {"scale": 2.0, "blocks": "auto", "rescale": 0.0}),
            ("PatchLab_SmoothedEnergyGuidance", {"scale": 2.0, "blur_sigma": 10.0, "blocks": "all"}),
            ("PatchLab_SkipLayerGuidance", {"scale": 2.0, "blocks": "auto", "rescaling_scale": 0.0})]


@pytest.mark.parametrize("layout", ["wan21", "wan22", "hunyuan_video", "zimage"])
def test_attention_guidance_samples_through_the_server(server, layout):
    graph = prompt(layout)
    model = ["1", 0]
    for number, (node, inputs) in enumerate(GUIDANCE, start=10):
        graph[str(number)] = {"class_type": node, "inputs": {"model": model, **inputs, "start_percent": 0.0,
                                                             "end_percent": 1.0}}
        model = [str(number), 0]
    graph["5"]["inputs"]["model"] = model
    _, _, pictures, size = LATENTS[layout]
    paths = server.output_images(server.run(graph))
    assert len(paths) == pictures
    assert all(Image.open(path).size == (size, size) for path in paths)
