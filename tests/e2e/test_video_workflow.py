"""The Wan 2.1 text-to-video example through the real server: StepCache on the model, the decoded frames saved by
ComfyUI's SaveAnimatedWEBP as one animation, which the history lists under ``images`` (so ``output_images`` and the
demo pick it up); on ``wan_shapes``, once trained, the demo's clip shows the red circle moving right."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageSequence

from devtools import workflows
from devtools.testkit.shapes import data, models, oracle

pytestmark = pytest.mark.e2e
PATH = workflows.EXAMPLE_DIR / "step_cache_wan21.json"
TRAINED = models.weights_path("wan_shapes").is_file()


def frames_of(path) -> torch.Tensor:
    """The frames of an animated picture as a ComfyUI IMAGE [T, H, W, 3] in 0-1."""
    with Image.open(path) as animation:
        frames = [np.asarray(frame.convert("RGB"), dtype=np.float32) / 255
                  for frame in ImageSequence.Iterator(animation)]
    return torch.from_numpy(np.stack(frames))


def test_the_frames_are_saved_as_one_animated_webp_the_history_lists(server, object_info):
    prompt = workflows.api_prompt_for(PATH, object_info)  # random weights: 128x64 px, length 9 (3 latent frames)
    entry = server.run(prompt, timeout=600)
    (saved,) = server.output_images(entry)
    assert saved.suffix == ".webp" and saved.is_file()
    (output,) = [o for o in entry["outputs"].values() if o.get("images")]
    assert output["animated"] == [True]
    frames = frames_of(saved)
    assert frames.shape == (3, 64, 128, 3)  # the test kit's VAE decodes one picture per latent frame


@pytest.mark.skipif(not TRAINED, reason="wan_shapes is not trained yet: the demo runs the workflow on random weights")
def test_on_wan_shapes_the_demos_clip_shows_the_red_circle_moving_right(server, object_info):
    prompt = workflows.use_testkit(workflows.ui_to_api(workflows.load(PATH), object_info), trained=True)
    (saved,) = server.output_images(server.run(prompt, timeout=600))
    frames = frames_of(saved)
    assert frames.shape == (4, 128, 128, 3)
    read = oracle.read_clips(oracle.load(), oracle.to_pictures(frames)[None])
    seen = {key: int(value[0]) for key, value in read.items()}
    assert seen["direction"] == data.DIRECTIONS.index("right"), seen
    assert seen["colour"] == data.COLOUR_NAMES.index("red"), seen
