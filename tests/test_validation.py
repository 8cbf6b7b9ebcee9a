"""One validation layer: bad arguments are rejected before any encoding or UNet call, naming the parameter."""

import inspect
import math
import re

import numpy as np
import pytest
import torch

import samplers
from conftest import SIZE, generate, unet_snapshot
from dualguide import CFG, NAG, PAG, TPG, Interval, StableDiffusionXLTPGPipeline, apply_nag, apply_softpag
from dualguide.validation import (
    PIPELINE_NUMBERS,
    PIPELINE_PAIRS,
    PIPELINE_SEQUENCES,
    PIPELINE_SIZES,
    check_number,
    check_pair,
    check_prompt_batch,
    check_size,
    check_tensor,
)

LATENT = SIZE // 2  # the tiny VAE's factor is 2
WIDTH = 64  # the tiny UNet's cross_attention_dim
NAN, INF = math.nan, math.inf


def pipe_state(pipeline):
    return {key: id(value) for key, value in vars(pipeline).items()}


def assert_rejected(pipeline, error, name, **kwargs):
    """The call raises ``error`` naming ``name``; no text encoder or UNet ran; pipeline and UNet unchanged."""
    settings = dict(prompt="a red circle", num_inference_steps=3, height=SIZE, width=SIZE, output_type="latent")
    settings = {**settings, "generator": torch.Generator().manual_seed(0), **kwargs}
    before, state = unet_snapshot(pipeline.unet), pipe_state(pipeline)
    calls = []
    modules = [pipeline.unet, pipeline.text_encoder, pipeline.text_encoder_2]
    handles = [m.register_forward_pre_hook(lambda m, args, kw: calls.append(m), with_kwargs=True) for m in modules]
    try:
        with pytest.raises(error, match=rf"(?<![\w.]){re.escape(name)}(?!\w)") as info:
            pipeline(**settings)
    finally:
        for handle in handles:
            handle.remove()
    assert calls == []
    assert unet_snapshot(pipeline.unet) == before
    assert pipe_state(pipeline) == state
    return info.value


PARAMETERS = inspect.signature(StableDiffusionXLTPGPipeline.__call__).parameters

# Every numeric argument of __call__ with the settings that make it matter (those the pipeline has).
NUMERIC = {
    "num_inference_steps": {},
    "eta": {},
    "denoising_end": {},
    "num_images_per_prompt": {},
    "guidance_scale": {},
    "guidance_rescale": dict(guidance_scale=5.0),
    "tpg_scale": {},
    "pag_scale": {},
    "pag_adaptive_scale": {},
    "nag_scale": dict(do_nag=True),
    "nag_tau": dict(do_nag=True),
    "nag_alpha": dict(do_nag=True),
    "nag_end": dict(do_nag=True),
    "sigma_min": dict(sampler="euler", sigma_schedule="karras"),
    "sigma_max": dict(sampler="euler", sigma_schedule="karras"),
    "max_batch_rows": {},
    "clip_skip": {},
    "height": {},
    "width": {},
}


def test_every_numeric_argument_has_a_rule():
    parameters = inspect.signature(StableDiffusionXLTPGPipeline.__call__).parameters
    numeric = {
        name
        for name, p in parameters.items()
        if re.search(r"\b(int|float)\b", str(p.annotation)) and "bool" not in str(p.annotation)
    }
    intervals = {name for name in parameters if name.endswith("_interval")}  # dualguide.Interval checks them
    covered = set(PIPELINE_NUMBERS) | set(PIPELINE_SEQUENCES) | set(PIPELINE_SIZES) | set(PIPELINE_PAIRS) | intervals
    assert numeric <= covered, f"numeric arguments without a rule: {sorted(numeric - covered)}"
    assert set(NUMERIC) == set(PIPELINE_NUMBERS) | set(PIPELINE_SIZES)


@pytest.mark.parametrize("value", [NAN, INF, -INF, np.float32(NAN), np.float64(INF)], ids=repr)
@pytest.mark.parametrize("name", sorted(n for n in NUMERIC if n in PARAMETERS))
def test_nan_and_infinity_rejected_for_every_numeric_argument(pipe, name, value):
    assert_rejected(pipe, ValueError, name, **{**NUMERIC[name], name: value})


@pytest.mark.parametrize("value", [NAN, INF, -1.0])
@pytest.mark.parametrize("name", sorted(n for n in PIPELINE_SEQUENCES if n in PARAMETERS))
def test_custom_schedule_lists_are_checked(pipe, name, value):
    assert_rejected(pipe, ValueError, name, sampler="euler", **{name: [10.0, value, 0.0]})


@pytest.mark.parametrize(
    "kwargs, error, name",
    [
        # sizes: 0 is an error, not "the default"
        (dict(height=0), ValueError, "height"),
        (dict(width=0), ValueError, "width"),
        (dict(height=-32), ValueError, "height"),
        (dict(width=33), ValueError, "width"),
        (dict(height=32.0), ValueError, "height"),
        (dict(width="32"), TypeError, "width"),
        # numbers: types, integers, ranges
        (dict(guidance_scale="5"), TypeError, "guidance_scale"),
        (dict(guidance_scale=True), TypeError, "guidance_scale"),
        (dict(guidance_scale=None), TypeError, "guidance_scale"),
        (dict(guidance_scale=torch.tensor(5.0)), TypeError, "guidance_scale"),
        (dict(num_inference_steps=2.5), ValueError, "num_inference_steps"),
        (dict(num_inference_steps=3.0), ValueError, "num_inference_steps"),
        (dict(num_inference_steps="3"), TypeError, "num_inference_steps"),
        (dict(num_inference_steps=np.int64(0)), ValueError, "num_inference_steps"),
        (dict(num_images_per_prompt=np.float32(2)), ValueError, "num_images_per_prompt"),
        (dict(max_batch_rows=np.int64(0)), ValueError, "max_batch_rows"),
        (dict(clip_skip=-1), ValueError, "clip_skip"),
        (dict(clip_skip=100), ValueError, "clip_skip"),
        (dict(do_nag=True, nag_tau=np.float32(0)), ValueError, "nag_tau"),
        (dict(do_nag=True, nag_end=1.5), ValueError, "nag_end"),
        (dict(do_nag=True, nag_end=-0.5), ValueError, "nag_end"),
        (dict(nag_end=0.5, nag_interval=(0.0, 0.5)), ValueError, "nag_interval"),
        (dict(sampler="euler", sigma_schedule="karras", sigma_min=20.0), ValueError, "sigma_min"),
        (dict(sampler="euler", sigma_schedule="karras", sigma_min=0.0), ValueError, "sigma_min"),
        (dict(sampler="euler", sigma_schedule="exponential", sigma_max=-1.0), ValueError, "sigma_max"),
        (dict(sigma_max=5.0), ValueError, "sigma_max"),  # the "model" schedule (or no sampler): ignored, so an error
        (dict(cross_attention_kwargs={"scale": NAN}), ValueError, "cross_attention_kwargs"),
        (dict(cross_attention_kwargs="scale=1"), TypeError, "cross_attention_kwargs"),
        # micro-conditioning pairs
        (dict(original_size=(0, 32)), ValueError, "original_size"),
        (dict(target_size=(32, NAN)), ValueError, "target_size"),
        (dict(target_size=(32,)), ValueError, "target_size"),
        (dict(crops_coords_top_left=(-1, 0)), ValueError, "crops_coords_top_left"),
        (dict(negative_original_size="32x32"), TypeError, "negative_original_size"),
        (dict(negative_crops_coords_top_left=(0, INF)), ValueError, "negative_crops_coords_top_left"),
        # flags and choices
        (dict(do_nag="yes"), TypeError, "do_nag"),
        (dict(do_nag=True, nag_use_l1=1), TypeError, "nag_use_l1"),
        (dict(return_dict=None), TypeError, "return_dict"),
        (dict(sampler=5), TypeError, "sampler"),
        (dict(sampler="eulerr"), ValueError, "sampler"),
        (dict(sigma_schedule=5), TypeError, "sigma_schedule"),
        (dict(output_type="jpeg"), ValueError, "output_type"),
        (dict(callback_on_step_end=5), TypeError, "callback_on_step_end"),
        (dict(callback_on_step_end_tensor_inputs=["noise"]), ValueError, "callback_on_step_end_tensor_inputs"),
        # layer ids and intervals
        (dict(tpg_applied_layers_index=None), ValueError, "tpg_applied_layers_index"),
        (dict(tpg_scale=0.0, tpg_applied_layers_index=None), ValueError, "tpg_applied_layers_index"),
        (dict(pag_scale=1.0, pag_applied_layers_index=None), ValueError, "pag_applied_layers_index"),
        (dict(tpg_applied_layers_index=5), TypeError, "tpg_applied_layers_index"),
        (dict(tpg_applied_layers_index="d99"), ValueError, "tpg_applied_layers_index"),
        (dict(cfg_interval=(0.0, NAN)), ValueError, "cfg_interval"),
        (dict(pag_scale=1.0, pag_interval=(np.float32(0.5), INF)), ValueError, "pag_interval"),
        # prompts: every prompt-like argument against prompt's batch
        (dict(prompt=None), ValueError, "prompt"),
        (dict(prompt=[]), ValueError, "prompt"),
        (dict(prompt=5), TypeError, "prompt"),
        (dict(prompt=["a", 5]), TypeError, "prompt"),
        (dict(prompt=["a", "b"], prompt_2=["c"]), ValueError, "prompt_2"),
        (dict(prompt="a", prompt_2=["b", "c"]), ValueError, "prompt_2"),
        (dict(prompt=["a", "b"], negative_prompt_2=["c", "d", "e"]), ValueError, "negative_prompt_2"),
        (dict(prompt=["a", "b"], negative_prompt=("c",)), ValueError, "negative_prompt"),
        (dict(prompt=["a", "b"], nag_negative_prompt=["c", "d", "e"]), ValueError, "nag_negative_prompt"),
        (dict(prompt=["a", "b"], nag_negative_prompt=["c", "d", "e"], do_nag=False), ValueError, "nag_negative_prompt"),
        # tensors: shapes, widths, batches, finiteness
        (dict(latents=torch.zeros(1, 4, LATENT // 2, LATENT // 2)), ValueError, "latents"),
        (dict(latents=torch.zeros(2, 4, LATENT, LATENT)), ValueError, "latents"),
        (dict(latents=torch.zeros(1, 3, LATENT, LATENT)), ValueError, "latents"),
        (dict(latents=torch.zeros(4, LATENT, LATENT)), ValueError, "latents"),
        (dict(latents=torch.zeros(1, 4, LATENT, LATENT), num_images_per_prompt=2), ValueError, "latents"),
        (dict(latents=torch.zeros(1, 4, LATENT, LATENT), height=2 * SIZE), ValueError, "latents"),
        (dict(latents=torch.full((1, 4, LATENT, LATENT), NAN)), ValueError, "latents"),
        (dict(latents=np.zeros((1, 4, LATENT, LATENT))), TypeError, "latents"),
        (dict(do_nag=True, nag_negative_prompt_embeds=torch.zeros(1, 77, 32)), ValueError, "nag_negative_prompt_embeds"),
        (dict(nag_negative_prompt_embeds=torch.zeros(1, 77, 32)), ValueError, "nag_negative_prompt_embeds"),
        (dict(do_nag=True, nag_negative_prompt_embeds=torch.zeros(3, 77, WIDTH)), ValueError, "nag_negative_prompt_embeds"),
        (dict(do_nag=True, nag_negative_prompt_embeds=torch.zeros(77, WIDTH)), ValueError, "nag_negative_prompt_embeds"),
        (dict(prompt=None, prompt_embeds=torch.zeros(1, 77, 32), pooled_prompt_embeds=torch.zeros(1, 32)), ValueError, "prompt_embeds"),
        (dict(prompt=None, prompt_embeds=torch.zeros(1, 77, WIDTH)), ValueError, "pooled_prompt_embeds"),
        (dict(prompt=None, prompt_embeds=torch.zeros(1, 77, WIDTH), pooled_prompt_embeds=torch.zeros(2, 32)), ValueError, "pooled_prompt_embeds"),
        (dict(prompt=None, prompt_embeds=torch.zeros(1, 77, WIDTH), pooled_prompt_embeds=torch.zeros(1, 16)), ValueError, "pooled_prompt_embeds"),
        (dict(prompt_embeds=torch.zeros(1, 77, WIDTH), pooled_prompt_embeds=torch.zeros(1, 32)), ValueError, "prompt_embeds"),
        (
            dict(prompt=None, prompt_embeds=torch.zeros(1, 77, WIDTH), pooled_prompt_embeds=torch.zeros(1, 32),
                 negative_prompt_embeds=torch.zeros(1, 70, WIDTH), negative_pooled_prompt_embeds=torch.zeros(1, 32)),
            ValueError, "negative_prompt_embeds",
        ),  # fmt: skip
        (
            dict(prompt=None, prompt_embeds=torch.zeros(2, 77, WIDTH), pooled_prompt_embeds=torch.zeros(2, 32),
                 negative_prompt=["a", "b", "c"]),
            ValueError, "negative_prompt",
        ),  # fmt: skip
        (
            dict(prompt=None, prompt_embeds=torch.full((1, 77, WIDTH), INF), pooled_prompt_embeds=torch.zeros(1, 32)),
            ValueError, "prompt_embeds",
        ),  # fmt: skip
        # generators: one per image
        (dict(generator=[torch.Generator(), torch.Generator()]), ValueError, "generator"),
        (dict(generator=[torch.Generator()], num_images_per_prompt=2), ValueError, "generator"),
        (dict(generator=1234), TypeError, "generator"),
    ],
)
def test_bad_argument_rejected_before_any_work(pipe, kwargs, error, name):
    assert_rejected(pipe, error, name, **kwargs)


def test_nag_end_is_reported_as_nag_end(pipe, components):
    message = str(assert_rejected(pipe, ValueError, "nag_end", do_nag=True, nag_end=1.5))
    assert "nag_interval" not in message and "1.5" in message and "[0, 1]" in message
    pipeline = StableDiffusionXLTPGPipeline(**components, add_watermarker=False)
    with pytest.raises(ValueError, match="nag_end"):
        apply_nag(pipeline, nag_end=1.5)
    with pytest.raises(ValueError, match="nag_tau"):
        apply_nag(pipeline, nag_tau=INF)
    assert pipeline._nag_defaults == {}


def test_messages_state_the_valid_values(pipe):
    assert "an integer >= 1" in str(assert_rejected(pipe, ValueError, "num_inference_steps", num_inference_steps=0))
    assert "[0, 1]" in str(assert_rejected(pipe, ValueError, "guidance_rescale", guidance_rescale=NAN))
    assert "multiple of the VAE factor 2" in str(assert_rejected(pipe, ValueError, "height", height=0))
    assert f"(1, 4, {LATENT}, {LATENT})" in str(
        assert_rejected(pipe, ValueError, "latents", latents=torch.zeros(1, 4, 8, 8))
    )
    message = str(assert_rejected(pipe, ValueError, "tpg_applied_layers_index", tpg_applied_layers_index=None))
    assert "NoneType" not in message and "d6-d23" in message
    assert "cross_attention_dim" in str(
        assert_rejected(pipe, ValueError, "nag_negative_prompt_embeds", nag_negative_prompt_embeds=torch.zeros(1, 77, 8))
    )


def test_numpy_scalars_give_the_same_latents_as_python_numbers(pipe):
    python = dict(
        guidance_scale=5.0, guidance_rescale=0.5, tpg_scale=2.0, pag_scale=1.5, do_nag=True, nag_scale=3.0,
        nag_tau=2.5, nag_alpha=0.5, nag_end=0.5, nag_use_l1=False, num_inference_steps=2, num_images_per_prompt=1,
        max_batch_rows=2, height=SIZE, width=SIZE, sampler="euler", sigma_schedule="karras", sigma_min=0.5, sigma_max=8.0,
        original_size=(SIZE, SIZE), crops_coords_top_left=(0, 0), clip_skip=1, tpg_interval=(0.0, 0.5),
    )  # fmt: skip
    numpy = dict(
        guidance_scale=np.float32(5), guidance_rescale=np.float64(0.5), tpg_scale=np.float16(2), pag_scale=np.float32(1.5),
        do_nag=np.bool_(True), nag_scale=np.int64(3), nag_tau=np.float32(2.5), nag_alpha=np.float64(0.5),
        nag_end=np.float32(0.5), nag_use_l1=np.bool_(False), num_inference_steps=np.int64(2),
        num_images_per_prompt=np.int32(1), max_batch_rows=np.int64(2), height=np.int64(SIZE), width=np.int32(SIZE),
        sampler="euler", sigma_schedule="karras", sigma_min=np.float32(0.5), sigma_max=np.float64(8), original_size=np.array([SIZE, SIZE]),
        crops_coords_top_left=(np.int64(0), np.int8(0)), clip_skip=np.int64(1),
        tpg_interval=(np.float32(0), np.float64(0.5)),
    )  # fmt: skip
    assert set(python) == set(numpy)
    assert torch.equal(generate(pipe, **numpy), generate(pipe, **python))


def test_size_none_is_the_default_and_positional_arguments_still_work(pipe):
    default = pipe.default_sample_size  # latents side = default_sample_size
    generator = torch.Generator().manual_seed(0)
    out = pipe("a red circle", None, None, None, 1, guidance_scale=1.0, tpg_scale=0.0, output_type="latent", generator=generator).images
    assert out.shape == (1, 4, default, default)
    assert "prompt" in inspect.signature(StableDiffusionXLTPGPipeline.__call__).parameters


def test_single_prompt_2_string_applies_to_every_prompt(pipe):
    settings = dict(prompt=["a red circle", "a blue square"], num_inference_steps=1, guidance_scale=1.0, tpg_scale=0.0)
    both = generate(pipe, prompt_2="flat colours", **settings)
    one = generate(pipe, prompt_2=["flat colours"] * 2, **settings)
    assert torch.equal(both, one)


def test_correct_latents_and_nag_embeds_are_accepted(pipe):
    latents = torch.randn(2, 4, LATENT, LATENT, generator=torch.Generator().manual_seed(3))
    out = generate(pipe, latents=latents, num_images_per_prompt=2, num_inference_steps=1, guidance_scale=1.0,
                   tpg_scale=0.0, do_nag=True, nag_negative_prompt_embeds=torch.randn(1, 77, WIDTH))  # fmt: skip
    assert out.shape == (2, 4, LATENT, LATENT) and torch.isfinite(out).all()


# --- the primitives and the dataclasses -----------------------------------------------------


@pytest.mark.parametrize(
    "value, expected",
    [(np.float32(2.5), 2.5), (np.int64(3), 3.0), (3, 3.0), (np.float64(0.0), 0.0)],
)
def test_check_number_returns_python_floats(value, expected):
    result = check_number(value, "x", 0.0)
    assert result == expected and type(result) is float


def test_check_number_rules():
    assert type(check_number(np.int16(4), "n", 1, integer=True)) is int
    assert check_number(None, "n", optional=True) is None
    assert check_number(INF, "sigma_high", 0.0, allow_inf=True) == INF
    for bad in (NAN, -INF):
        with pytest.raises(ValueError, match="sigma_high"):
            check_number(bad, "sigma_high", 0.0, allow_inf=True)
    with pytest.raises(ValueError, match=r"x must be a finite number in \(0, 1\], got 0.0"):
        check_number(0, "x", 0.0, 1.0, low_open=True)
    with pytest.raises(TypeError, match="x"):
        check_number(np.bool_(True), "x")
    with pytest.raises(TypeError, match="x"):
        check_number(None, "x")
    assert check_size(None, "height", 8, default=1024) == 1024
    with pytest.raises(ValueError, match="height"):
        check_size(0, "height", 8, default=1024)
    assert check_pair((np.int64(1), 2), "original_size", 1) == (1, 2)
    assert check_prompt_batch(("a", "b"), "prompt_2", 2) == ["a", "b"]
    assert check_prompt_batch(["a"], "negative_prompt", 1) == "a"
    with pytest.raises(ValueError, match="x must have shape \\(2, \\*\\)"):
        check_tensor(torch.zeros(3, 1), "x", (2, None))


def test_dataclasses_use_the_same_rules():
    assert CFG(scale=np.float32(5)).scale == 5.0 and type(CFG(scale=np.float32(5)).scale) is float
    assert PAG(heads=[np.int64(1), 0]).heads == (0, 1)
    assert NAG(use_l1=np.bool_(False)).use_l1 is False
    assert Interval().sigma_high == INF and Interval(sigma_high=INF).sigma_high == INF
    cases = [
        (lambda: TPG(layers=None), ValueError, "tpg_applied_layers_index"),
        (lambda: PAG(layers=None), ValueError, "pag_applied_layers_index"),
        (lambda: CFG(scale=INF), ValueError, "guidance_scale"),
        (lambda: TPG(scale=NAN), ValueError, "tpg_scale"),
        (lambda: PAG(scale=INF), ValueError, "pag_scale"),
        (lambda: NAG(scale=INF), ValueError, "nag_scale"),
        (lambda: NAG(tau=INF), ValueError, "nag_tau"),
        (lambda: NAG(alpha=NAN), ValueError, "nag_alpha"),
        (lambda: PAG(beta=NAN), ValueError, "beta"),
        (lambda: PAG(heads=[NAN]), ValueError, "selected_heads"),
        (lambda: PAG(heads=5), TypeError, "selected_heads"),
        (lambda: Interval(sigma_low=NAN), ValueError, "sigma_low"),
        (lambda: Interval(sigma_low=INF), ValueError, "sigma_low"),
        (lambda: Interval(start=NAN), ValueError, "start"),
    ]
    for make, error, name in cases:
        with pytest.raises(error, match=name):
            make()


def test_apply_softpag_rejects_non_finite_beta(components):
    pipeline = StableDiffusionXLTPGPipeline(**components, add_watermarker=False)
    for beta in (NAN, INF):
        with pytest.raises(ValueError, match="beta"):
            apply_softpag(pipeline, beta=beta)
    assert pipeline._softpag is None


def test_schedules_check_their_numbers(pipe):
    karras, _ = samplers.get_sigmas("karras", np.int64(4), pipe.scheduler, sigma_max=np.float32(5.0))
    assert torch.equal(karras, samplers.get_sigmas("karras", 4, pipe.scheduler, sigma_max=5.0)[0])
    model, _ = samplers.get_sigmas("model", np.int32(4), pipe.scheduler)
    assert len(model) == 5
    cases = [
        (dict(name="karras", steps=4, sigma_max=INF), ValueError, "sigma_max"),
        (dict(name="karras", steps=4, sigma_min=NAN), ValueError, "sigma_min"),
        (dict(name="exponential", steps=4, sigma_min=0.0), ValueError, "sigma_min"),
        (dict(name="exponential", steps=4, sigma_min=20.0), ValueError, "sigma_min"),
        (dict(name="karras", steps=4, sigma_max=0.01), ValueError, "sigma_max"),
        (dict(name="karras", steps=4, rho=INF), ValueError, "rho"),
        (dict(name="karras", steps=0), ValueError, "steps"),
        (dict(name="karras", steps=4.0), ValueError, "steps"),
        (dict(name="model", steps=4, sigma_min=1.0), ValueError, "sigma_min"),
        (dict(name="linear", steps=4), ValueError, "sigma_schedule"),
    ]
    for kwargs, error, name in cases:
        with pytest.raises(error, match=name):
            samplers.get_sigmas(scheduler=pipe.scheduler, **kwargs)
