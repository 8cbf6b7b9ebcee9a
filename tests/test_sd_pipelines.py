"""Stable Diffusion 1.x / 2.x pipelines: with the guidance terms off they equal diffusers' SD pipelines, and
PAG on the mid block equals diffusers' SD PAG pipelines (tiny float32 models, few steps)."""

import inspect

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    StableDiffusionControlNetImg2ImgPipeline,
    StableDiffusionControlNetInpaintPipeline,
    StableDiffusionControlNetPAGInpaintPipeline,
    StableDiffusionControlNetPAGPipeline,
    StableDiffusionControlNetPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPAGImg2ImgPipeline,
    StableDiffusionPAGInpaintPipeline,
    StableDiffusionPAGPipeline,
    StableDiffusionPipeline,
    UniPCMultistepScheduler,
)

from dualguide import (
    StableDiffusionControlNetTPGImg2ImgPipeline,
    StableDiffusionControlNetTPGInpaintPipeline,
    StableDiffusionControlNetTPGPipeline,
    StableDiffusionTPGImg2ImgPipeline,
    StableDiffusionTPGInpaintPipeline,
    StableDiffusionTPGPipeline,
)
from dualguide.tiny import build_tiny_controlnet, build_tiny_sd

SIZE = 32
SCHEDULERS = {
    "ddim": lambda config: DDIMScheduler.from_config(config),
    "dpmpp_karras": lambda config: DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", use_karras_sigmas=True),
    "euler_a": lambda config: EulerAncestralDiscreteScheduler.from_config(config),
    "unipc": lambda config: UniPCMultistepScheduler.from_config(config),
}
# task -> (ours, diffusers' plain pipeline, diffusers' PAG pipeline)
TASKS = {
    "text2img": (StableDiffusionTPGPipeline, StableDiffusionPipeline, StableDiffusionPAGPipeline),
    "img2img": (StableDiffusionTPGImg2ImgPipeline, StableDiffusionImg2ImgPipeline, StableDiffusionPAGImg2ImgPipeline),
    "inpaint": (StableDiffusionTPGInpaintPipeline, StableDiffusionInpaintPipeline, StableDiffusionPAGInpaintPipeline),
    "controlnet": (StableDiffusionControlNetTPGPipeline, StableDiffusionControlNetPipeline, StableDiffusionControlNetPAGPipeline),
    "controlnet_img2img": (StableDiffusionControlNetTPGImg2ImgPipeline, StableDiffusionControlNetImg2ImgPipeline, None),
    "controlnet_inpaint": (
        StableDiffusionControlNetTPGInpaintPipeline, StableDiffusionControlNetInpaintPipeline, StableDiffusionControlNetPAGInpaintPipeline,
    ),
}  # fmt: skip


@pytest.fixture(scope="module", params=[1, 2], ids=["sd1", "sd2"])
def version(request):
    return request.param


@pytest.fixture(scope="module")
def components(version):
    parts = build_tiny_sd(version=version)
    return {**parts, "controlnet": build_tiny_controlnet(parts["unet"])}


def pixels(seed: int, channels: int = 3) -> torch.Tensor:
    return torch.rand(1, channels, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def task_inputs(task: str) -> dict:
    if task == "text2img":
        return dict(height=SIZE, width=SIZE, num_inference_steps=3)
    if task == "controlnet":
        return dict(image=pixels(1), height=SIZE, width=SIZE, num_inference_steps=3)
    inputs = dict(image=pixels(2), strength=0.75, num_inference_steps=4)  # 3 steps after the strength cut
    if task.startswith("controlnet_"):
        inputs["control_image"] = pixels(1)
    if task.endswith("inpaint"):
        mask = torch.zeros(1, 1, SIZE, SIZE)
        mask[..., 8:24, 8:24] = 1.0
        inputs.update(mask_image=mask, height=SIZE, width=SIZE)
    return inputs


def build(cls, components, scheduler, **options):
    names = set(inspect.signature(cls.__init__).parameters) | {"requires_safety_checker"}
    pipe = cls(**{k: v for k, v in components.items() if k in names}, **options)
    pipe.scheduler = SCHEDULERS[scheduler](components["scheduler"].config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def latents(pipe, task, **kwargs) -> torch.Tensor:
    out = pipe(
        "a red circle", negative_prompt="blurry", guidance_scale=5.0, output_type="latent",
        generator=torch.Generator().manual_seed(0), **task_inputs(task), **kwargs,
    )  # fmt: skip
    return out.images


# Every scheduler on the four tasks of the issue; two on the other ControlNet tasks (same shared runs).
CASES = [(task, scheduler) for task in list(TASKS)[:4] for scheduler in SCHEDULERS] + [
    (task, scheduler) for task in list(TASKS)[4:] for scheduler in ("ddim", "euler_a")
]


@torch.no_grad()
@pytest.mark.parametrize("task, scheduler", CASES)
def test_guidance_off_equals_diffusers(components, task, scheduler):
    ours, plain, _ = TASKS[task]
    expected = latents(build(plain, components, scheduler), task)
    got = latents(build(ours, components, scheduler), task, tpg_scale=0.0)
    assert (got - expected).abs().max() <= 1e-4


@torch.no_grad()
@pytest.mark.parametrize("scheduler", ["ddim", "euler_a"])
def test_nine_channel_inpainting_equals_diffusers(version, scheduler):
    parts = build_tiny_sd(version=version, in_channels=9)
    expected = latents(build(StableDiffusionInpaintPipeline, parts, scheduler), "inpaint")
    got = latents(build(StableDiffusionTPGInpaintPipeline, parts, scheduler), "inpaint", tpg_scale=0.0)
    assert (got - expected).abs().max() <= 1e-4


@torch.no_grad()
@pytest.mark.parametrize("task", [task for task, (_, _, pag) in TASKS.items() if pag is not None])
def test_pag_on_the_mid_block_equals_diffusers_pag(components, task):
    ours, _, pag = TASKS[task]
    expected = latents(build(pag, components, "ddim", pag_applied_layers="mid"), task, pag_scale=3.0)
    got = latents(build(ours, components, "ddim"), task, tpg_scale=0.0, pag_scale=3.0, pag_applied_layers_index="m0")
    assert (got - expected).abs().max() <= 1e-4
