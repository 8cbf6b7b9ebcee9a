"""The drop-in promise: any diffusers scheduler, every StableDiffusionXLPipeline argument, callbacks, few-step models."""

import inspect

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSDEScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LCMScheduler,
    StableDiffusionXLPipeline,
    TCDScheduler,
    UniPCMultistepScheduler,
)

import samplers
from conftest import SIZE, unet_snapshot
from counting import rows_seen
from dualguide import StableDiffusionXLTPGPipeline

EXACT = dict(atol=1e-4, rtol=1e-4)
SCHEDULERS = {
    "ddim": (DDIMScheduler, {}),
    "dpmpp_karras": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True, "algorithm_type": "dpmsolver++"}),
    "dpm_sde": (DPMSolverSDEScheduler, {"noise_sampler_seed": 0}),  # its Brownian tree is otherwise seeded from the global RNG
    "unipc": (UniPCMultistepScheduler, {}),
    "heun": (HeunDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "lcm": (LCMScheduler, {}),
    "tcd": (TCDScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
}


def with_scheduler(pipeline_class, components, name):
    kind, options = SCHEDULERS[name]
    scheduler = kind.from_config(components["scheduler"].config, **options)
    pipeline = pipeline_class(**{**components, "scheduler": scheduler}, add_watermarker=False)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def latents_of(pipeline, seed=0, **kwargs):
    settings = dict(prompt="a red circle", num_inference_steps=3, height=SIZE, width=SIZE, output_type="latent", guidance_scale=5.0)
    settings.update(kwargs)
    return pipeline(generator=torch.Generator().manual_seed(seed), **settings).images


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_scheduler_parity_with_diffusers(components, name):
    theirs = latents_of(with_scheduler(StableDiffusionXLPipeline, components, name), guidance_scale=5.0)
    ours = latents_of(with_scheduler(StableDiffusionXLTPGPipeline, components, name), guidance_scale=5.0, tpg_scale=0.0)
    print(f"{name}: max |ours - diffusers| = {float((ours - theirs).abs().max()):.2e}")
    assert torch.allclose(ours, theirs, **EXACT)


@pytest.mark.parametrize("name", ["ddim", "lcm", "dpmpp_karras"])
def test_kdiffusion_sampler_runs_over_any_scheduler(components, name):
    pipeline = with_scheduler(StableDiffusionXLTPGPipeline, components, name)
    out = latents_of(pipeline, sampler="dpmpp_2m", guidance_scale=5.0)
    assert torch.isfinite(out).all()


def test_call_signature_contains_every_diffusers_parameter():
    theirs = set(inspect.signature(StableDiffusionXLPipeline.__call__).parameters)
    ours = set(inspect.signature(StableDiffusionXLTPGPipeline.__call__).parameters)
    assert theirs - ours <= {"kwargs"}, theirs - ours
    assert {"tpg_scale", "tpg_applied_layers_index", "do_nag", "nag_alpha", "nag_use_l1", "sampler"} <= ours


def test_custom_sigmas_and_timesteps_on_both_paths(components, pipe):
    sigmas = [14.6, 6.5, 2.7, 0.9, 0.03]  # an Align-Your-Steps-like custom schedule
    euler_theirs = latents_of(with_scheduler(StableDiffusionXLPipeline, components, "euler"), sigmas=sigmas, num_inference_steps=None)
    euler_ours = latents_of(pipe, sigmas=sigmas, num_inference_steps=None, tpg_scale=0.0)
    assert torch.allclose(euler_ours, euler_theirs, **EXACT)
    k_path = latents_of(pipe, sigmas=sigmas, num_inference_steps=None, sampler="dpmpp_2m", tpg_scale=0.0)
    assert torch.isfinite(k_path).all() and not torch.allclose(k_path, euler_ours, atol=1e-3)
    lcm = with_scheduler(StableDiffusionXLTPGPipeline, components, "lcm")
    lcm_theirs = with_scheduler(StableDiffusionXLPipeline, components, "lcm")
    timesteps = [999, 700, 400, 100]
    assert torch.allclose(
        latents_of(lcm, timesteps=timesteps, num_inference_steps=None, tpg_scale=0.0),
        latents_of(lcm_theirs, timesteps=timesteps, num_inference_steps=None),
        **EXACT,
    )
    assert torch.isfinite(latents_of(pipe, timesteps=timesteps, num_inference_steps=None, sampler="euler")).all()


@pytest.mark.parametrize("sampler", [None, "euler"])
def test_denoising_end_hands_noisy_latents_to_a_refiner(pipe, sdxl_pipe, sampler):
    with rows_seen(pipe.unet) as counter:
        half = latents_of(pipe, num_inference_steps=4, denoising_end=0.5, sampler=sampler, tpg_scale=0.0)
    assert len(counter) == 2
    if sampler is None:
        assert torch.allclose(half, latents_of(sdxl_pipe, num_inference_steps=4, denoising_end=0.5), **EXACT)


def test_eta_reaches_ddim(components):
    ours = with_scheduler(StableDiffusionXLTPGPipeline, components, "ddim")
    theirs = with_scheduler(StableDiffusionXLPipeline, components, "ddim")
    assert torch.allclose(latents_of(ours, eta=0.7, tpg_scale=0.0), latents_of(theirs, eta=0.7), **EXACT)
    assert not torch.allclose(latents_of(ours, eta=0.7, tpg_scale=0.0), latents_of(ours, tpg_scale=0.0), atol=1e-3)


def halve_at_step_one(pipeline, step, timestep, tensors):
    return {"latents": tensors["latents"] * 0.5} if step == 1 else {}


def test_callback_latents_take_effect_at_the_next_model_call(pipe, sdxl_pipe):
    settings = dict(num_inference_steps=3, callback_on_step_end=halve_at_step_one)
    assert torch.allclose(latents_of(pipe, tpg_scale=0.0, **settings), latents_of(sdxl_pipe, **settings), **EXACT)
    # the k-diffusion path: the same Euler steps as the scheduler loop
    k_path = latents_of(pipe, tpg_scale=0.0, sampler="euler", **settings)
    assert torch.allclose(k_path, latents_of(sdxl_pipe, **settings), atol=1e-3)


def test_cfg_cutoff_callback_drops_the_uncond_rows(pipe, sdxl_pipe):
    from diffusers.callbacks import SDXLCFGCutoffCallback

    callback = SDXLCFGCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=1)
    inputs = callback.tensor_inputs
    with rows_seen(pipe.unet) as counter:
        ours = latents_of(pipe, num_inference_steps=4, tpg_scale=0.0, callback_on_step_end=callback, callback_on_step_end_tensor_inputs=inputs)
    assert counter == [2, 2, 1, 1]
    theirs = latents_of(sdxl_pipe, num_inference_steps=4, callback_on_step_end=SDXLCFGCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=1), callback_on_step_end_tensor_inputs=inputs)
    assert torch.allclose(ours, theirs, **EXACT)


def test_guidance_scale_set_by_a_callback_applies_from_the_next_step(pipe):
    def cfg_off_after_first(pipeline, step, timestep, tensors):
        if step == 0:
            pipeline._guidance_scale = 1.0
        return {}

    with rows_seen(pipe.unet) as counter:
        latents_of(pipe, num_inference_steps=3, tpg_scale=3.0, callback_on_step_end=cfg_off_after_first)
    assert counter == [3, 2, 2]


@pytest.mark.parametrize("sampler", samplers.names())
def test_callback_fires_once_per_step_on_every_sampler(pipe, sampler):
    steps = []

    def record(pipeline, step, timestep, tensors):
        steps.append(step)
        assert tensors["latents"].shape == (1, 4, SIZE // 2, SIZE // 2)
        return {}

    latents_of(pipe, num_inference_steps=4, sampler=sampler, tpg_scale=0.0, callback_on_step_end=record)
    if sampler == "dpm_adaptive":  # its own number of steps: one report per model evaluation
        assert steps == list(range(len(steps))) and steps
    else:
        assert steps == [0, 1, 2, 3]


def test_callback_sees_every_documented_tensor(pipe):
    seen = {}

    def record(pipeline, step, timestep, tensors):
        seen.update({k: None if v is None else tuple(v.shape) for k, v in tensors.items()})
        return {}

    names = pipe._callback_tensor_inputs
    latents_of(pipe, num_inference_steps=2, guidance_scale=5.0, callback_on_step_end=record, callback_on_step_end_tensor_inputs=names)
    assert seen["prompt_embeds"][0] == 2 and seen["negative_prompt_embeds"][0] == 1 and seen["denoised"] == seen["latents"]


def test_few_step_model_with_nag_and_cfg_off(components):
    pipeline = with_scheduler(StableDiffusionXLTPGPipeline, components, "lcm")
    with rows_seen(pipeline.unet) as counter:
        nag = latents_of(pipeline, num_inference_steps=4, guidance_scale=1.0, tpg_scale=0.0, do_nag=True)
    plain = latents_of(pipeline, num_inference_steps=4, guidance_scale=1.0, tpg_scale=0.0)
    assert counter == [1, 1, 1, 1]
    assert torch.isfinite(nag).all() and not torch.allclose(nag, plain, atol=1e-3)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(timesteps=[999, 500], sigmas=[10.0, 1.0], num_inference_steps=None), "sigmas"),
        (dict(timesteps=[999, 500], num_inference_steps=None, scheduler="dpm_sde"), "timesteps"),
        (dict(denoising_end=1.5), "denoising_end"),
        (dict(denoising_end=0.0), "denoising_end"),
        (dict(ip_adapter_image_embeds=[torch.zeros(2, 1, 8)]), "ip_adapter"),
        (dict(callback_on_step_end_tensor_inputs=["nope"]), "callback_on_step_end_tensor_inputs"),
    ],
)
def test_bad_drop_in_arguments_fail_before_any_unet_call(components, pipe, kwargs, name):
    pipeline = with_scheduler(StableDiffusionXLTPGPipeline, components, kwargs.pop("scheduler")) if "scheduler" in kwargs else pipe
    before = unet_snapshot(pipeline.unet)
    with rows_seen(pipeline.unet) as counter, pytest.raises(ValueError, match=name):
        latents_of(pipeline, **kwargs)
    assert counter == []
    assert unet_snapshot(pipeline.unet) == before


def test_guidance_distilled_unet_takes_the_scale_as_an_embedding(components):
    from diffusers import UNet2DConditionModel

    from dualguide.tiny import tiny_unet_config

    torch.manual_seed(0)
    distilled = dict(components, unet=UNet2DConditionModel(**tiny_unet_config(), time_cond_proj_dim=32).eval())
    theirs = latents_of(with_scheduler(StableDiffusionXLPipeline, distilled, "lcm"), guidance_scale=5.0)
    ours_pipe = with_scheduler(StableDiffusionXLTPGPipeline, distilled, "lcm")
    with rows_seen(ours_pipe.unet) as counter:
        ours = latents_of(ours_pipe, guidance_scale=5.0, tpg_scale=0.0)
    assert counter == [1, 1, 1]  # no uncond rows: the scale goes into timestep_cond
    assert torch.allclose(ours, theirs, **EXACT)
    with_callback = latents_of(ours_pipe, guidance_scale=5.0, tpg_scale=0.0, callback_on_step_end=lambda *step: {})
    assert torch.equal(with_callback, ours)
