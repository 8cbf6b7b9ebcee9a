"""ControlNet at no extra cost for the perturbed branch: it runs on the uncond and cond rows only."""

import pytest
import torch

from dualguide import CFG, NAG, TPG, GuidedDenoiser
from dualguide.conditioning import encode_sdxl
from dualguide.control import ControlNetInput, control_residuals
from dualguide.tiny import build_tiny_controlnet
from counting import rows_seen

SIGMAS = torch.tensor([8.0, 3.0, 1.0, 0.0])


@pytest.fixture(scope="module")
def controlnet(unet):
    return build_tiny_controlnet(unet, seed=1)


@pytest.fixture(scope="module")
def conds(pipe):
    return encode_sdxl(pipe, ["a red circle", "a blue square"], size=(32, 32), with_negative=True)


def control_image(seed=0):
    return torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_perturbed_rows_reuse_the_cond_residuals_exactly(controlnet, conds):
    positive, negative = conds
    model_input = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    timesteps = torch.full((2,), 500.0)
    control = ControlNetInput(controlnet, control_image(), scale=0.8)
    with rows_seen(controlnet) as counter:
        down, mid = control_residuals(control, 0.8, ("uncond", "cond", "tpg"), model_input, timesteps, positive, negative)
    assert counter == [4]  # uncond + cond rows of two images, not the TPG rows
    from dualguide.conditioning import Conditioning

    every_row = Conditioning.cat([negative, positive, positive])
    full_down, full_mid = controlnet(
        model_input.repeat(3, 1, 1, 1), timesteps.repeat(3), encoder_hidden_states=every_row.prompt_embeds,
        controlnet_cond=control_image().repeat(3, 1, 1, 1), conditioning_scale=0.8,
        added_cond_kwargs={"text_embeds": every_row.pooled_embeds, "time_ids": every_row.time_ids}, return_dict=False,
    )  # fmt: skip
    for ours, theirs in zip(down + [mid], list(full_down) + [full_mid]):
        assert torch.allclose(ours, theirs, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("guess_mode, rows_per_step", [(False, 4), (True, 2)])
def test_controlnet_rows_per_step_with_cfg_and_tpg(pipe, controlnet, conds, guess_mode, rows_per_step):
    positive, negative = conds
    denoiser = GuidedDenoiser(pipe.unet, pipe.scheduler, cfg=CFG(5.0), tpg=TPG(3.0), nag=NAG(3.0), sigmas=SIGMAS)
    control = ControlNetInput(controlnet, control_image(), scale=0.8, guess_mode=guess_mode)
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3)) * SIGMAS[0]
    with rows_seen(controlnet) as control_rows, rows_seen(pipe.unet) as unet_rows:
        for sigma in SIGMAS[:-1]:
            denoiser(x, sigma.expand(2), cond=positive, uncond=negative, nag_negative=negative.prompt_embeds, control=control)
    assert control_rows == [rows_per_step] * 3
    assert unet_rows == [6] * 3  # one UNet call of uncond, cond and TPG rows per step


@torch.no_grad()
def test_control_changes_the_prediction_and_its_window_is_respected(pipe, controlnet, conds):
    positive, negative = conds
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(4)) * SIGMAS[0]
    kwargs = dict(cond=positive, uncond=negative)

    def predict(control, sigma=SIGMAS[0]):
        denoiser = GuidedDenoiser(pipe.unet, pipe.scheduler, cfg=CFG(5.0), tpg=TPG(3.0), sigmas=SIGMAS)
        return denoiser(x, sigma.expand(2), control=control, **kwargs)

    plain = predict(None)
    assert not torch.allclose(predict(ControlNetInput(controlnet, control_image(), scale=1.0)), plain, atol=1e-4)
    assert torch.equal(predict(ControlNetInput(controlnet, control_image(), scale=0.0)), plain)
    late = ControlNetInput(controlnet, control_image(), scale=1.0, start=0.5)  # off on step 0 of 3
    assert torch.equal(predict(late), plain)
    assert not torch.allclose(predict(late, SIGMAS[2]), predict(None, SIGMAS[2]), atol=1e-4)
