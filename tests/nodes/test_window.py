"""SigmaWindow: start/end percents become a sigma interval on the model's own schedule."""

import pytest
import torch

from devtools import checks
from patchlab.nodes import _common
from patchlab.nodes import model_sampling as ms_nodes
from patchlab.patches.window import SigmaWindow


def test_full_window_is_always_on(tiny_model):
    window = SigmaWindow.from_percents(tiny_model("sd15"), 0.0, 1.0)
    assert window.is_always and window.contains(torch.tensor([14.6])) and window.contains(torch.tensor([0.03]))


def test_window_follows_the_models_schedule(tiny_model):
    model = tiny_model("flux")
    (shifted,) = checks.run_node(ms_nodes.ModelSamplingSD3, model=model, shift=3.0)
    window = SigmaWindow.from_percents(shifted, 0.5, 1.0)
    assert window.sigma_start == pytest.approx(0.75)
    assert not window.contains(torch.tensor([0.8])) and window.contains(torch.tensor([0.7]))


def test_mask_is_per_sample_without_a_host_sync(tiny_model):
    window = SigmaWindow(2.0, 1.0)
    assert window.mask(torch.tensor([3.0, 1.5, 0.5])).tolist() == [False, True, False]


def test_inverted_percents_are_a_clear_error(tiny_model):
    with pytest.raises(ValueError, match="must satisfy 0 <= start_percent <= end_percent <= 1"):
        SigmaWindow.from_percents(tiny_model("sd15"), 0.8, 0.2)
    assert "swap them" in _common.check_percents(0.8, 0.2)
    assert _common.check_percents(0.2, 0.8) is True
