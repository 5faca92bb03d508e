"""PatchLab_DifferentialDiffusion: the denoise-mask slot is chained, strength 0 is off."""

import pytest
import torch

from devtools import checks
from devtools.sampling import sample
from patchlab.nodes.inpaint import DifferentialDiffusion

LATENT = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(5))
MASK = torch.linspace(0, 1, 16).view(1, 1, 1, 16).expand(1, 1, 16, 16).contiguous()


def inpaint(model):
    return sample(model, "sd15", steps=4, latent=LATENT, noise_mask=MASK)


@pytest.fixture(scope="module")
def sd15(tiny_model):
    return tiny_model("sd15")


def test_an_earlier_mask_function_is_chained_not_replaced(sd15):
    seen = []

    def earlier(sigma, denoise_mask, extra_options):
        seen.append(float(sigma[0]))
        return denoise_mask * 0.5

    first = sd15.clone()
    first.set_model_denoise_mask_function(earlier)
    (chained,) = checks.run_node(DifferentialDiffusion, model=first, strength=1.0)
    (alone,) = checks.run_node(DifferentialDiffusion, model=sd15, strength=1.0)
    result = inpaint(chained)
    assert len(seen) == 4
    assert not torch.allclose(result, inpaint(alone), rtol=1e-3, atol=1e-3)
    fn = chained.model_options["denoise_mask_function"]
    assert fn is not earlier


def test_strength_zero_leaves_the_mask_as_given(sd15):
    (off,) = checks.run_node(DifferentialDiffusion, model=sd15, strength=0.0)
    assert torch.equal(inpaint(off), inpaint(sd15))


def test_core_treats_strength_zero_as_full_strength(core_nodes, sd15):
    (core_zero,) = checks.run_node(core_nodes["DifferentialDiffusion"], model=sd15, strength=0.0)
    (core_full,) = checks.run_node(core_nodes["DifferentialDiffusion"], model=sd15, strength=1.0)
    assert torch.equal(inpaint(core_zero), inpaint(core_full))


def test_differential_diffusion_changes_an_inpainting_result(sd15):
    (patched,) = checks.run_node(DifferentialDiffusion, model=sd15, strength=1.0)
    assert not torch.allclose(inpaint(patched), inpaint(sd15), rtol=1e-3, atol=1e-3)
