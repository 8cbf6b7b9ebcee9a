"""ControlNet pipelines (text-to-image, image-to-image, inpainting): parity with diffusers (plain and PAG),
MultiControlNet, guess mode, control windows, ControlNet rows per step, bad input, ``from_pipe``, IP-Adapter."""

import inspect

import pytest
import torch
from diffusers import (
    StableDiffusionXLControlNetImg2ImgPipeline,
    StableDiffusionXLControlNetInpaintPipeline,
    StableDiffusionXLControlNetPAGImg2ImgPipeline,
    StableDiffusionXLControlNetPAGPipeline,
    StableDiffusionXLControlNetPipeline,
)
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

from conftest import SIZE, unet_snapshot
from dualguide import (
    StableDiffusionXLControlNetTPGImg2ImgPipeline,
    StableDiffusionXLControlNetTPGInpaintPipeline,
    StableDiffusionXLControlNetTPGPipeline,
    StableDiffusionXLTPGPipeline,
    build_tiny_sdxl,
)
from dualguide.tiny import build_tiny_controlnet
from counting import rows_seen
from test_ip_adapter import IMAGE_EMBED_DIM, tiny_ip_adapter_state_dict
from test_task_pipelines import compare, picture, square_mask

OFF = dict(tpg_scale=0.0)  # our guidance terms off: CFG only, as diffusers
PAG_ON = dict(tpg_scale=0.0, pag_scale=3.0, pag_applied_layers_index="m0-m9")  # diffusers' "mid"
TASKS = {  # ours, diffusers'
    "text2img": (StableDiffusionXLControlNetTPGPipeline, StableDiffusionXLControlNetPipeline),
    "img2img": (StableDiffusionXLControlNetTPGImg2ImgPipeline, StableDiffusionXLControlNetImg2ImgPipeline),
    "inpaint": (StableDiffusionXLControlNetTPGInpaintPipeline, StableDiffusionXLControlNetInpaintPipeline),
}


def task_settings(task):
    """The images (and strength) of a call of ``task``."""
    control = picture(7)
    if task == "text2img":
        return dict(image=control)
    if task == "img2img":
        return dict(image=picture(), control_image=control, strength=0.7)
    return dict(image=picture(), mask_image=square_mask(), control_image=control, strength=0.75)


def build(kind, components, controlnet, **options):
    pipeline = kind(**components, controlnet=controlnet, add_watermarker=False, **options)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def run(pipeline, seed=0, **kwargs):
    settings = dict(prompt="a red circle", num_inference_steps=3, output_type="latent", guidance_scale=5.0)
    settings.update(kwargs)
    return pipeline(generator=torch.Generator().manual_seed(seed), **settings).images


@pytest.fixture(scope="module")
def controlnet(unet):
    return build_tiny_controlnet(unet, seed=1)


@pytest.fixture(scope="module")
def multi(unet, controlnet):
    return MultiControlNetModel([controlnet, build_tiny_controlnet(unet, seed=2)])


@pytest.fixture(scope="module")
def ours(components, controlnet):
    return {task: build(kinds[0], components, controlnet) for task, kinds in TASKS.items()}


# -- parity -----------------------------------------------------------------------------------


@pytest.mark.parametrize("task", list(TASKS))
def test_matches_diffusers(components, controlnet, ours, task):
    theirs = run(build(TASKS[task][1], components, controlnet), **task_settings(task))
    compare(f"ControlNet {task}", run(ours[task], **task_settings(task), **OFF), theirs)


@pytest.mark.parametrize("task, reference", [("text2img", StableDiffusionXLControlNetPAGPipeline), ("img2img", StableDiffusionXLControlNetPAGImg2ImgPipeline)])
def test_pag_matches_diffusers_pag(components, controlnet, ours, task, reference):
    """diffusers' PAG runs the ControlNet on the perturbed rows too: equal results show that reusing the cond rows' residuals is exact."""
    processors = components["unet"].attn_processors
    try:
        theirs = run(build(reference, components, controlnet, pag_applied_layers=["mid"]), **task_settings(task), pag_scale=3.0)
    finally:  # diffusers' PAG pipelines return latents before restoring the UNet's processors
        components["unet"].set_attn_processor(processors)
    compare(f"ControlNet {task} PAG", run(ours[task], **task_settings(task), **PAG_ON), theirs)


def test_multicontrolnet_with_windows_matches_diffusers(components, multi):
    settings = dict(
        image=[picture(7), picture(8)], controlnet_conditioning_scale=[0.9, 0.6],
        control_guidance_start=[0.0, 0.3], control_guidance_end=[0.7, 1.0], num_inference_steps=4,
    )  # fmt: skip
    theirs = run(build(StableDiffusionXLControlNetPipeline, components, multi), **settings)
    compare("MultiControlNet, windows", run(build(StableDiffusionXLControlNetTPGPipeline, components, multi), **settings, **OFF), theirs)


@pytest.mark.parametrize("task", ["text2img", "inpaint"])
def test_guess_mode_and_window_before_denoising_end_match_diffusers(components, controlnet, ours, task):
    """Guess mode (ControlNet on the cond rows only), and a window that diffusers counts before ``denoising_end`` cuts the run."""
    settings = dict(**task_settings(task), guess_mode=True, control_guidance_end=0.5, denoising_end=0.7, num_inference_steps=4)
    if task == "inpaint":
        settings["strength"] = 1.0
    theirs = run(build(TASKS[task][1], components, controlnet), **settings)
    compare(f"ControlNet {task} guess mode", run(ours[task], **settings, **OFF), theirs)


# -- the ControlNet rows and the dual guidance -------------------------------------------------


@pytest.mark.parametrize("guess_mode, control_rows", [(False, 2), (True, 1)])
def test_controlnet_rows_per_step_with_cfg_and_tpg(ours, controlnet, unet, guess_mode, control_rows):
    with rows_seen(controlnet) as control_seen, rows_seen(unet) as unet_rows:
        latents = run(ours["text2img"], **task_settings("text2img"), guess_mode=guess_mode, tpg_scale=3.0, num_inference_steps=2)
    print(f"rows per step, CFG + TPG, guess_mode={guess_mode}: ControlNet {control_seen}, UNet {unet_rows}")
    assert control_seen == [control_rows] * 2  # uncond + cond (cond only in guess mode), never the TPG rows
    assert unet_rows == [3] * 2  # uncond, cond, TPG in one UNet call
    assert torch.isfinite(latents).all()


@pytest.mark.parametrize("task", list(TASKS))
def test_dual_guidance_and_the_kdiffusion_path(ours, task):
    settings = dict(**task_settings(task), num_inference_steps=2)
    plain = run(ours[task], **settings, **OFF)
    dual = run(ours[task], **settings, tpg_scale=3.0, do_nag=True)
    assert torch.isfinite(dual).all() and not torch.allclose(dual, plain, atol=1e-3)
    assert torch.isfinite(run(ours[task], **settings, sampler="dpmpp_2m")).all()


def test_ip_adapter_matches_diffusers(controlnet):
    components = build_tiny_sdxl(seed=0)
    components["unet"]._load_ip_adapter_weights([tiny_ip_adapter_state_dict(components["unet"])])
    embeds = [torch.randn(2, 1, IMAGE_EMBED_DIM, generator=torch.Generator().manual_seed(1))]
    settings = dict(**task_settings("text2img"), ip_adapter_image_embeds=embeds, num_inference_steps=2)
    theirs = run(build(StableDiffusionXLControlNetPipeline, components, controlnet), **settings)
    compare("ControlNet text2img IP-Adapter", run(build(StableDiffusionXLControlNetTPGPipeline, components, controlnet), **settings, **OFF), theirs)


# -- bad input and a failing run ---------------------------------------------------------------


def modules_snapshot(pipeline):
    return unet_snapshot(pipeline.unet), unet_snapshot(pipeline.controlnet)


@pytest.mark.parametrize(
    "task, kwargs, error, name",
    [
        ("multi", dict(image=[picture(7)]), ValueError, "image"),
        ("multi", dict(image=picture(7)), ValueError, "image"),
        ("multi", dict(image=[picture(7), picture(8)], controlnet_conditioning_scale=[1.0]), ValueError, "controlnet_conditioning_scale"),
        ("text2img", dict(control_guidance_start=0.5, control_guidance_end=0.5), ValueError, "control_guidance_start"),
        ("multi", dict(image=[picture(7), picture(8)], control_guidance_start=[0.0, 0.8], control_guidance_end=0.6), ValueError, "control_guidance_start"),
        ("text2img", dict(control_guidance_end=1.5), ValueError, "control_guidance_end"),
        ("text2img", dict(image="control.png"), TypeError, "image"),
        ("text2img", dict(image=[picture(7), picture(8)]), ValueError, "image"),
        ("text2img", dict(guess_mode="yes"), TypeError, "guess_mode"),
        ("img2img", dict(image=[1, 2]), TypeError, "image"),
        ("img2img", dict(control_image=None), TypeError, "control_image"),
        ("img2img", dict(strength=0.0), ValueError, "strength"),
        ("img2img", dict(strength=1.5), ValueError, "strength"),
        ("inpaint", dict(strength=-0.1), ValueError, "strength"),
        ("inpaint", dict(mask_image=square_mask(SIZE * 2)), ValueError, "mask_image"),
        ("inpaint", dict(control_image=object()), TypeError, "control_image"),
    ],
)
def test_bad_input_fails_before_any_model_call(components, multi, ours, task, kwargs, error, name):
    pipeline = build(StableDiffusionXLControlNetTPGPipeline, components, multi) if task == "multi" else ours[task]
    settings = {**task_settings("text2img" if task == "multi" else task), **kwargs}
    before = modules_snapshot(pipeline)
    with rows_seen(pipeline.unet) as unet_rows, rows_seen(pipeline.controlnet) as control_rows, pytest.raises(error, match=name):
        run(pipeline, **settings)
    assert unet_rows == [] and control_rows == []
    assert modules_snapshot(pipeline) == before


@pytest.mark.parametrize("task", list(TASKS))
def test_an_exception_mid_run_leaves_unet_and_controlnet_as_they_were(ours, task):
    pipeline = ours[task]
    before = modules_snapshot(pipeline)

    def fail(pipe, step, timestep, tensors):
        raise RuntimeError("stopped by the callback")

    with pytest.raises(RuntimeError, match="stopped by the callback"):
        run(pipeline, **task_settings(task), tpg_scale=3.0, pag_scale=3.0, do_nag=True, callback_on_step_end=fail)
    assert modules_snapshot(pipeline) == before


# -- from_pipe and the signature ---------------------------------------------------------------


def test_from_pipe_moves_between_pipelines_without_reloading(pipe, controlnet):
    text2img = StableDiffusionXLControlNetTPGPipeline.from_pipe(pipe, controlnet=controlnet)
    img2img = StableDiffusionXLControlNetTPGImg2ImgPipeline.from_pipe(text2img)
    inpaint = StableDiffusionXLControlNetTPGInpaintPipeline.from_pipe(img2img)
    back = StableDiffusionXLTPGPipeline.from_pipe(inpaint)
    for other in (text2img, img2img, inpaint, back):
        assert other.unet is pipe.unet and other.vae is pipe.vae and other.text_encoder_2 is pipe.text_encoder_2
    for other in (text2img, img2img, inpaint):
        assert other.controlnet is controlnet
    assert isinstance(inpaint, StableDiffusionXLControlNetTPGInpaintPipeline) and type(back) is StableDiffusionXLTPGPipeline


@pytest.mark.parametrize("task", list(TASKS))
def test_signature_is_diffusers_plus_the_guidance_tail(task):
    mine = inspect.signature(TASKS[task][0].__call__).parameters
    reference = {k: v for k, v in inspect.signature(TASKS[task][1].__call__).parameters.items() if k not in ("self", "kwargs")}
    assert list(mine)[1 : len(reference) + 1] == list(reference)
    for name, parameter in reference.items():
        if name not in ("guidance_scale", "callback_on_step_end_tensor_inputs"):
            assert mine[name].default == parameter.default, name
    assert mine["guidance_scale"].default == 7.5  # StableDiffusionXLTPGPipeline's
    tail = list(inspect.signature(StableDiffusionXLTPGPipeline.__call__).parameters)
    assert list(mine)[len(reference) + 1 :] == tail[tail.index("tpg_scale") :]
