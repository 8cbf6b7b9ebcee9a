"""Image-to-image and inpainting pipelines: parity with diffusers (plain and PAG), refiner hand-off,
dual guidance, bad input before any UNet call, ``from_pipe`` without reloading, the workflow helpers."""

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import (
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPAGImg2ImgPipeline,
    StableDiffusionXLPAGInpaintPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)

from conftest import SIZE, unet_snapshot
from dualguide import StableDiffusionXLTPGImg2ImgPipeline, StableDiffusionXLTPGInpaintPipeline, StableDiffusionXLTPGPipeline
from dualguide.tiny import tiny_unet_config
from dualguide.workflows import InpaintModel, img2img_start, keep_known, strength_sigmas

EXACT = dict(atol=1e-4, rtol=1e-4)
OFF = dict(tpg_scale=0.0)  # our guidance terms off: CFG only, as diffusers
PAG_ON = dict(tpg_scale=0.0, pag_scale=3.0, pag_applied_layers_index="m0-m9")


def build(kind, components, **options):
    pipeline = kind(**components, add_watermarker=False, **options)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def picture(seed=0, size=SIZE):
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return PIL.Image.fromarray(pixels)


def square_mask(size=SIZE):
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 255
    return PIL.Image.fromarray(mask)


def run(pipeline, seed=0, **kwargs):
    settings = dict(prompt="a red circle", num_inference_steps=4, output_type="latent", guidance_scale=5.0)
    settings.update(kwargs)
    return pipeline(generator=torch.Generator().manual_seed(seed), **settings).images


def compare(label, ours, theirs):
    difference = float((ours - theirs).abs().max())
    print(f"{label}: max |ours - diffusers| = {difference:.2e}")
    assert torch.allclose(ours, theirs, **EXACT), difference


class UNetCalls:
    def __init__(self, unet):
        self.calls = 0
        self.handle = unet.register_forward_pre_hook(lambda module, args: setattr(self, "calls", self.calls + 1))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


@pytest.fixture(scope="module")
def img2img(components):
    return build(StableDiffusionXLTPGImg2ImgPipeline, components)


@pytest.fixture(scope="module")
def inpaint(components):
    return build(StableDiffusionXLTPGInpaintPipeline, components)


@pytest.fixture(scope="module")
def components9(components):
    torch.manual_seed(1)
    unet = UNet2DConditionModel(**{**tiny_unet_config(), "in_channels": 9}).eval()
    return {**components, "unet": unet}


@pytest.fixture(scope="module")
def inpaint9(components9):
    return build(StableDiffusionXLTPGInpaintPipeline, components9)


# -- parity -----------------------------------------------------------------------------------


def test_img2img_matches_diffusers(components, img2img):
    settings = dict(image=picture(), strength=0.6)
    compare("img2img", run(img2img, **settings, **OFF), run(build(StableDiffusionXLImg2ImgPipeline, components), **settings))


def test_img2img_pag_matches_diffusers_pag(components, img2img):
    reference = build(StableDiffusionXLPAGImg2ImgPipeline, components, pag_applied_layers=["mid"])
    settings = dict(image=picture(), strength=0.6)
    compare("img2img PAG", run(img2img, **settings, **PAG_ON), run(reference, **settings, pag_scale=3.0))


@pytest.mark.parametrize("unet_channels", [4, 9])
def test_inpaint_matches_diffusers(components, components9, inpaint, inpaint9, unet_channels):
    ours, parts = (inpaint, components) if unet_channels == 4 else (inpaint9, components9)
    settings = dict(image=picture(), mask_image=square_mask(), strength=0.75, height=SIZE, width=SIZE)
    theirs = run(build(StableDiffusionXLInpaintPipeline, parts), **settings)
    compare(f"inpaint {unet_channels}-channel", run(ours, **settings, **OFF), theirs)


@pytest.mark.parametrize("unet_channels", [4, 9])
def test_inpaint_pag_matches_diffusers_pag(components, components9, inpaint, inpaint9, unet_channels):
    ours, parts = (inpaint, components) if unet_channels == 4 else (inpaint9, components9)
    reference = build(StableDiffusionXLPAGInpaintPipeline, parts, pag_applied_layers=["mid"])
    settings = dict(image=picture(), mask_image=square_mask(), strength=0.75, height=SIZE, width=SIZE)
    processors = reference.unet.attn_processors
    try:
        theirs = run(reference, **settings, pag_scale=3.0)
    finally:  # diffusers' PAG inpainting returns latents before restoring the UNet's processors
        reference.unet.set_attn_processor(processors)
    compare(f"inpaint {unet_channels}-channel PAG", run(ours, **settings, **PAG_ON), theirs)


def test_base_then_refiner_matches_diffusers(components, pipe, img2img):
    base = run(pipe, height=SIZE, width=SIZE, denoising_end=0.5, **OFF)
    refined = run(img2img, image=base, denoising_start=0.5, **OFF)
    diffusers_base = run(build(StableDiffusionXLPipeline, components), height=SIZE, width=SIZE, denoising_end=0.5)
    diffusers_refined = run(build(StableDiffusionXLImg2ImgPipeline, components), image=diffusers_base, denoising_start=0.5)
    compare("base (denoising_end=0.5)", base, diffusers_base)
    compare("refiner (denoising_start=0.5)", refined, diffusers_refined)


def test_base_then_refiner_on_the_kdiffusion_path(components, pipe, img2img):
    base = run(pipe, height=SIZE, width=SIZE, denoising_end=0.5, sampler="euler", **OFF)
    refined = run(img2img, image=base, denoising_start=0.5, sampler="euler", **OFF)
    diffusers_base = run(build(StableDiffusionXLPipeline, components), height=SIZE, width=SIZE, denoising_end=0.5)
    diffusers_refined = run(build(StableDiffusionXLImg2ImgPipeline, components), image=diffusers_base, denoising_start=0.5)
    difference = float((refined - diffusers_refined).abs().max())
    print(f"refiner, k-diffusion euler: max |ours - diffusers| = {difference:.2e}")
    assert torch.allclose(refined, diffusers_refined, atol=1e-3)


# -- dual guidance and the k-diffusion path ---------------------------------------------------


def test_dual_guidance_changes_img2img_and_inpaint(img2img, inpaint):
    dual = dict(tpg_scale=3.0, do_nag=True, nag_scale=3.0)
    for pipeline, settings in ((img2img, dict(image=picture(), strength=0.6)), (inpaint, dict(image=picture(), mask_image=square_mask(), strength=0.75, height=SIZE, width=SIZE))):
        plain = run(pipeline, **settings, **OFF, num_inference_steps=3)
        guided = run(pipeline, **settings, **dual, num_inference_steps=3)
        assert torch.isfinite(guided).all() and not torch.allclose(guided, plain, atol=1e-3)


def test_kdiffusion_path_runs_and_inpainting_keeps_the_unmasked_region(img2img, inpaint, inpaint9):
    k_img2img = run(img2img, image=picture(), strength=0.6, sampler="dpmpp_2m", num_inference_steps=3)
    assert torch.isfinite(k_img2img).all()
    settings = dict(image=picture(), mask_image=square_mask(), strength=0.75, sampler="dpmpp_2m", num_inference_steps=3, height=SIZE, width=SIZE)
    assert torch.isfinite(run(inpaint9, **settings)).all()
    k_inpaint = run(inpaint, **settings)
    known = inpaint.prepare_latents(
        1, 4, SIZE, SIZE, torch.float32, "cpu", torch.Generator().manual_seed(0), None, image=inpaint.image_processor.preprocess(picture()),
        timestep=None, is_strength_max=True, add_noise=False, return_noise=True, return_image_latents=True,
    )[2]  # fmt: skip
    keep = inpaint.mask_processor.preprocess(square_mask())
    keep = torch.nn.functional.interpolate(keep, size=k_inpaint.shape[-2:]) < 0.5
    assert torch.allclose(k_inpaint[keep.expand_as(k_inpaint)], known[keep.expand_as(known)], atol=1e-5)


# -- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "task, kwargs, error, name",
    [
        ("img2img", dict(strength=0.0), ValueError, "strength"),
        ("img2img", dict(strength=1.5), ValueError, "strength"),
        ("img2img", dict(strength=float("nan")), ValueError, "strength"),
        ("img2img", dict(image="picture.png"), TypeError, "image"),
        ("img2img", dict(image=None), TypeError, "image"),
        ("img2img", dict(denoising_start=0.6, denoising_end=0.5), ValueError, "denoising_start"),
        ("img2img", dict(strength=0.1, num_inference_steps=4), ValueError, "strength"),
        ("inpaint", dict(mask_image=square_mask(SIZE * 2)), ValueError, "mask_image"),
        ("inpaint", dict(mask_image=[1, 2]), TypeError, "mask_image"),
        ("inpaint", dict(strength=-0.2), ValueError, "strength"),
        ("inpaint", dict(denoising_start=0.5, denoising_end=0.5), ValueError, "denoising_start"),
        ("inpaint", dict(padding_mask_crop=4, output_type="latent"), ValueError, "padding_mask_crop"),
        ("inpaint", dict(padding_mask_crop=-1), ValueError, "padding_mask_crop"),
    ],
)
def test_bad_input_fails_before_any_unet_call(img2img, inpaint, task, kwargs, error, name):
    pipeline = img2img if task == "img2img" else inpaint
    settings = dict(image=picture()) if task == "img2img" else dict(image=picture(), mask_image=square_mask(), height=SIZE, width=SIZE)
    settings.update(kwargs)
    before = unet_snapshot(pipeline.unet)
    with UNetCalls(pipeline.unet) as counter, pytest.raises(error, match=name):
        run(pipeline, **settings)
    assert counter.calls == 0
    assert unet_snapshot(pipeline.unet) == before


# -- from_pipe and the signature -------------------------------------------------------------


def test_from_pipe_shares_the_weights(pipe):
    image_pipe = StableDiffusionXLTPGImg2ImgPipeline.from_pipe(pipe)
    inpaint_pipe = StableDiffusionXLTPGInpaintPipeline.from_pipe(image_pipe)
    back = StableDiffusionXLTPGPipeline.from_pipe(inpaint_pipe)
    for other in (image_pipe, inpaint_pipe, back):
        assert other.unet is pipe.unet and other.vae is pipe.vae and other.text_encoder_2 is pipe.text_encoder_2
    assert isinstance(image_pipe, StableDiffusionXLTPGImg2ImgPipeline) and isinstance(back, StableDiffusionXLTPGPipeline)


@pytest.mark.parametrize(
    "ours, theirs, text2img",
    [
        (StableDiffusionXLTPGImg2ImgPipeline, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLTPGPipeline),
        (StableDiffusionXLTPGInpaintPipeline, StableDiffusionXLInpaintPipeline, StableDiffusionXLTPGPipeline),
    ],
)
def test_signature_is_diffusers_plus_the_guidance_tail(ours, theirs, text2img):
    import inspect

    mine = inspect.signature(ours.__call__).parameters
    reference = {k: v for k, v in inspect.signature(theirs.__call__).parameters.items() if k not in ("self", "kwargs")}
    assert list(mine)[1 : len(reference) + 1] == list(reference)
    for name, parameter in reference.items():
        if name not in ("guidance_scale", "callback_on_step_end_tensor_inputs", "num_images_per_prompt"):
            assert mine[name].default == parameter.default, name
    assert mine["guidance_scale"].default == 7.5
    tail = list(inspect.signature(text2img.__call__).parameters)
    tail = tail[tail.index("tpg_scale") :]
    assert list(mine)[len(reference) + 1 :] == tail


# -- the workflow helpers ---------------------------------------------------------------------


def test_workflow_helpers():
    sigmas = torch.tensor([10.0, 5.0, 2.0, 1.0, 0.0])
    assert torch.equal(strength_sigmas(sigmas, 0.5), sigmas[2:])
    assert torch.equal(strength_sigmas(sigmas, 1.0), sigmas)
    with pytest.raises(ValueError, match="strength"):
        strength_sigmas(sigmas, 0.1)
    init, noise = torch.ones(1, 4, 2, 2), torch.full((1, 4, 2, 2), 0.5)
    x, cut = img2img_start(init, noise, sigmas, 0.75)
    assert torch.equal(cut, sigmas[1:]) and torch.allclose(x, init + 0.5 * 5.0)
    mask = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    assert torch.equal(keep_known(torch.zeros(1, 4, 2, 2), init, mask), (1 - mask).expand(1, 4, 2, 2))
    model = InpaintModel(lambda x, sigma: x * 0 + 7.0, init, mask, noise)
    out = model(torch.zeros(1, 4, 2, 2), torch.tensor([2.0]))
    assert torch.equal(out, keep_known(torch.full_like(init, 7.0), init, mask))
