"""The diffusers drop-in pipeline: parity with diffusers, guidance modes, bad input."""

import pytest
import torch

from conftest import SIZE, generate, unet_snapshot
from dualguide import StableDiffusionXLTPGPipeline, apply_softpag

PARITY = dict(atol=1e-2, rtol=1e-3)


def diffusers_latents(pipeline, prompt="a red circle", seed=0, **kwargs):
    settings = dict(num_inference_steps=4, height=64, width=64, output_type="latent")
    settings.update(kwargs)
    return pipeline(prompt, generator=torch.Generator().manual_seed(seed), **settings).images


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(guidance_scale=5.0),
        dict(guidance_scale=5.0, negative_prompt="a blue square"),
        dict(guidance_scale=1.0),
        dict(guidance_scale=5.0, prompt=["a red circle", "a green triangle"], negative_prompt=["blue", "yellow"]),
        dict(guidance_scale=5.0, guidance_rescale=0.7, num_images_per_prompt=2),
    ],
)
def test_default_euler_matches_diffusers_sdxl(pipe, sdxl_pipe, kwargs):
    theirs = diffusers_latents(sdxl_pipe, **kwargs)
    ours = diffusers_latents(pipe, tpg_scale=0.0, **kwargs)
    assert ours.shape == theirs.shape
    assert torch.allclose(ours, theirs, **PARITY)


def test_cfg_pag_matches_diffusers_pag_pipeline(components, pipe):
    from diffusers import StableDiffusionXLPAGPipeline

    reference = StableDiffusionXLPAGPipeline(**components, add_watermarker=False, pag_applied_layers=["mid"])
    reference.set_progress_bar_config(disable=True)
    theirs = diffusers_latents(reference, guidance_scale=5.0, pag_scale=3.0)
    ours = diffusers_latents(pipe, guidance_scale=5.0, tpg_scale=0.0, pag_scale=3.0)
    plain = diffusers_latents(pipe, guidance_scale=5.0, tpg_scale=0.0)
    assert torch.allclose(ours, theirs, **PARITY)
    assert not torch.allclose(ours, plain, **PARITY)


def test_three_tpg_modes_differ_and_are_finite(pipe):
    cfg_only = generate(pipe, guidance_scale=5.0, tpg_scale=0.0)
    tpg_only = generate(pipe, guidance_scale=0.0, tpg_scale=3.0)
    both = generate(pipe, guidance_scale=5.0, tpg_scale=3.0)
    for out in (cfg_only, tpg_only, both):
        assert torch.isfinite(out).all()
    assert not torch.allclose(cfg_only, both) and not torch.allclose(tpg_only, both)


def test_cfg_plus_tpg_is_one_unet_call_per_step(pipe):
    rows = []
    handle = pipe.unet.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[0]))
    try:
        generate(pipe, num_inference_steps=4, guidance_scale=5.0, tpg_scale=3.0)
    finally:
        handle.remove()
    assert rows == [3, 3, 3, 3]


def test_unet_untouched_after_calls_and_errors(pipe):
    before = unet_snapshot(pipe.unet)
    generate(pipe, tpg_scale=3.0, pag_scale=2.0, do_nag=True)
    assert unet_snapshot(pipe.unet) == before

    def interrupt(pipeline, step, timestep, tensors):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        generate(pipe, tpg_scale=3.0, do_nag=True, callback_on_step_end=interrupt)
    assert unet_snapshot(pipe.unet) == before


def test_softpag_applies_to_later_calls(components):
    pipeline = StableDiffusionXLTPGPipeline(**components, add_watermarker=False)
    pipeline.set_progress_bar_config(disable=True)
    pag = generate(pipeline, tpg_scale=0.0, pag_scale=3.0)
    assert apply_softpag(pipeline, beta=0.5) is pipeline
    soft = generate(pipeline, tpg_scale=0.0)  # pag_scale defaults to 3.0 now
    assert not torch.allclose(soft, pag)
    apply_softpag(pipeline, beta=1.0)
    assert torch.allclose(generate(pipeline, tpg_scale=0.0), pag, atol=1e-5)
    with pytest.raises(ValueError, match="beta"):
        apply_softpag(pipeline, beta=2.0)


def test_callback_on_step_end_sees_every_step_and_can_interrupt(pipe):
    seen = []

    def callback(pipeline, step, timestep, tensors):
        seen.append((step, float(timestep), tuple(tensors)))
        if step == 1:
            pipeline._interrupt = True
        return {}

    generate(pipe, num_inference_steps=4, callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["latents", "denoised"])
    assert [s[0] for s in seen] == [0, 1]
    assert seen[0][2] == ("latents", "denoised")
    assert seen[0][1] > seen[1][1] > 0


def test_save_and_load_offline(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    loaded = StableDiffusionXLTPGPipeline.from_pretrained(tmp_path, local_files_only=True)
    loaded.set_progress_bar_config(disable=True)
    assert all(torch.equal(a, b) for a, b in zip(loaded.unet.state_dict().values(), pipe.unet.state_dict().values()))
    # Same weights; the reloaded text encoders pick their own attention kernels (transformers 5), which
    # moves the random tiny model's latents by ~2e-5 after 3 steps.
    assert torch.allclose(generate(loaded, tpg_scale=3.0), generate(pipe, tpg_scale=3.0), atol=1e-4)


def test_pil_output(pipe):
    images = generate(pipe, output_type="pil", num_images_per_prompt=2)
    assert len(images) == 2 and images[0].size == (SIZE, SIZE)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(sampler="nope"), "sampler"),
        (dict(sigma_schedule="linear"), "sigma_schedule"),
        (dict(height=33), "height"),
        (dict(prompt=["a", "b"], negative_prompt=["c"]), "negative_prompt"),
        (dict(guidance_scale=-1.0), "guidance_scale"),
        (dict(tpg_scale=-1.0), "tpg_scale"),
        (dict(tpg_applied_layers_index=["d6", "x2"]), "tpg_applied_layers_index"),
        (dict(tpg_applied_layers_index="d30"), "tpg_applied_layers_index"),
        (dict(tpg_applied_layers_index=[]), "tpg_applied_layers_index"),
        (dict(pag_scale=-2.0), "pag_scale"),
        (dict(pag_scale=1.0, pag_applied_layers_index="m10"), "pag_applied_layers_index"),
        (dict(do_nag=True, nag_scale=0.5), "nag_scale"),
        (dict(do_nag=True, nag_tau=0.0), "nag_tau"),
        (dict(do_nag=True, nag_alpha=1.2), "nag_alpha"),
        (dict(do_nag=True, nag_end=1.5), "nag_end"),
        (dict(do_nag=True, prompt=["a", "b"], nag_negative_prompt=["c", "d", "e"]), "nag_negative_prompt"),
        (dict(max_batch_rows=0), "max_batch_rows"),
        (dict(guidance_rescale=2.0), "guidance_rescale"),
        (dict(cfg_interval=(0.8, 0.2)), "cfg_interval"),
        (dict(tpg_interval=(0.0, 1.5)), "tpg_interval"),
        (dict(do_nag=True, nag_interval=(0.5, 0.25)), "nag_interval"),
        (dict(sigma_schedule="karras", sigma_min=5.0, sigma_max=1.0), "sigma_min"),
        (dict(num_inference_steps=0), "num_inference_steps"),
        (dict(num_images_per_prompt=0), "num_images_per_prompt"),
        (dict(do_nag=True, nag_negative_prompt_embeds=torch.zeros(3, 77, 64)), "nag_negative_prompt_embeds"),
    ],
)
def test_bad_input_names_parameter_before_any_step(pipe, kwargs, name):
    before = unet_snapshot(pipe.unet)
    calls = []
    handle = pipe.unet.register_forward_pre_hook(lambda m, args: calls.append(1))
    try:
        with pytest.raises(ValueError, match=name):
            generate(pipe, **kwargs)
    finally:
        handle.remove()
    assert calls == []
    assert unet_snapshot(pipe.unet) == before


def test_interval_of_wrong_type_names_parameter(pipe):
    before = unet_snapshot(pipe.unet)
    with pytest.raises(TypeError, match="pag_interval"):
        generate(pipe, pag_scale=1.0, pag_interval="late")
    assert unet_snapshot(pipe.unet) == before


def test_bad_softpag_heads_rejected_before_any_step(components):
    pipeline = StableDiffusionXLTPGPipeline(**components, add_watermarker=False)
    apply_softpag(pipeline, beta=0.5, selected_heads=[0, 64])
    with pytest.raises(ValueError, match="selected_heads"):
        generate(pipeline)
