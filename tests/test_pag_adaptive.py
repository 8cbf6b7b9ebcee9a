"""``pag_adaptive_scale`` as diffusers' PAG pipelines: the PAG scale falls with the timestep,
``max(pag_scale - pag_adaptive_scale * (1000 - t), 0)``; equal to diffusers' SDXL PAG pipeline."""

import pytest
import torch
from diffusers import StableDiffusionXLPAGPipeline

from conftest import generate
from dualguide import PAG


@pytest.fixture(scope="module")
def diffusers_pag(components):
    pipeline = StableDiffusionXLPAGPipeline(**components, add_watermarker=False, pag_applied_layers=["mid"])
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.mark.parametrize("adaptive", [0.0, 0.002, 0.01])
def test_adaptive_pag_equals_diffusers_pag_pipeline(pipe, diffusers_pag, adaptive):
    settings = dict(guidance_scale=5.0, pag_scale=3.0, pag_adaptive_scale=adaptive, num_inference_steps=3)
    ours = generate(pipe, tpg_scale=0.0, **settings)
    theirs = generate(diffusers_pag, **settings)
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_the_scale_falls_with_the_timestep_and_stops_at_zero(pipe):
    pag = PAG(3.0, adaptive_scale=0.002)
    assert pag.scale_at(1000) == 3.0 and pag.scale_at(500) == pytest.approx(2.0) and pag.scale_at(0) == 1.0
    assert PAG(3.0, adaptive_scale=0.01).scale_at(0) == 0.0 and PAG(3.0).scale_at(0) == 3.0
    steady = generate(pipe, tpg_scale=0.0, pag_scale=3.0, num_inference_steps=3)
    assert not torch.equal(generate(pipe, tpg_scale=0.0, pag_scale=3.0, pag_adaptive_scale=0.002, num_inference_steps=3), steady)


@pytest.mark.parametrize("value, error", [(-0.1, ValueError), (float("nan"), ValueError), ("0.1", TypeError), (5000.0, ValueError)])
def test_a_bad_adaptive_scale_names_the_parameter(pipe, value, error):
    with pytest.raises(error, match="pag_adaptive_scale"):
        generate(pipe, pag_scale=3.0, pag_adaptive_scale=value)


def test_a_refused_adaptive_scale_leaves_the_unet_as_it_was(pipe):
    from conftest import unet_snapshot

    before = unet_snapshot(pipe.unet)
    with pytest.raises(ValueError, match="pag_adaptive_scale"):
        generate(pipe, pag_scale=3.0, pag_adaptive_scale=-1.0)
    assert unet_snapshot(pipe.unet) == before
