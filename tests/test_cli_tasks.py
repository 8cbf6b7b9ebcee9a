"""``dualguide generate`` / ``compare`` with ``--image``, ``--mask`` and ``--control``: the command's image equals
the task pipeline's Python call with the same settings, and bad task options fail before any model loads."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from dualguide import (
    StableDiffusionXLControlNetTPGImg2ImgPipeline,
    StableDiffusionXLControlNetTPGPipeline,
    StableDiffusionXLTPGImg2ImgPipeline,
    StableDiffusionXLTPGInpaintPipeline,
    cli,
)
from dualguide.tiny import build_tiny_controlnet

SEED = 7
SETTINGS = dict(num_inference_steps=2, guidance_scale=4.0, tpg_scale=2.0, height=32, width=32)  # model_folder's


def run_cli(*argv):
    return cli.main([str(a) for a in argv])


def one_error_line(capsys):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("dualguide: error: "), err
    return err


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    """A 32 px picture, a mask of its centre square, a 16 px mask and a file that is not an image."""
    folder = tmp_path_factory.mktemp("pictures")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / "image.png")
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[8:24, 8:24] = 255
    Image.fromarray(mask).save(folder / "mask.png")
    Image.fromarray(mask[::2, ::2]).save(folder / "small_mask.png")
    (folder / "notes.png").write_text("not a picture")
    return folder


@pytest.fixture(scope="module")
def controlnet_folder(pipe, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_controlnet")
    build_tiny_controlnet(pipe.unet).save_pretrained(folder)
    return str(folder)


def written_image(folder):
    (name,) = [name for name in os.listdir(folder) if name.endswith(".png")]
    image = Image.open(os.path.join(folder, name))
    return np.asarray(image.convert("RGB")).astype(np.int16), json.loads(image.text["parameters"])


def python_call(pipeline, **kwargs):
    images = pipeline("a red circle", generator=torch.Generator().manual_seed(SEED), **SETTINGS, **kwargs).images
    return np.asarray(images[0]).astype(np.int16)


def test_img2img_command_equals_the_img2img_pipeline(pipe, model_folder, pictures, tmp_path):
    assert run_cli("generate", "a red circle", "--model", model_folder, "--out", tmp_path, "--seed", SEED,
                   "--image", pictures / "image.png", "--strength", "0.6") == 0  # fmt: skip
    pixels, metadata = written_image(tmp_path)
    sized = {key: value for key, value in SETTINGS.items() if key not in ("height", "width")}
    expected = StableDiffusionXLTPGImg2ImgPipeline.from_pipe(pipe)(
        "a red circle", image=Image.open(pictures / "image.png").convert("RGB"), strength=0.6,
        generator=torch.Generator().manual_seed(SEED), **sized,
    ).images[0]  # fmt: skip
    assert np.abs(pixels - np.asarray(expected).astype(np.int16)).max() <= 1
    assert metadata["task"] == "img2img" and metadata["strength"] == 0.6
    assert metadata["image"] == str(pictures / "image.png")


def test_inpaint_command_equals_the_inpaint_pipeline_and_keeps_the_unmasked_part(pipe, model_folder, pictures, tmp_path):
    assert run_cli("generate", "a red circle", "--model", model_folder, "--out", tmp_path, "--seed", SEED,
                   "--image", pictures / "image.png", "--mask", pictures / "mask.png") == 0  # fmt: skip
    pixels, metadata = written_image(tmp_path)
    inpaint = StableDiffusionXLTPGInpaintPipeline.from_pipe(pipe)
    image = Image.open(pictures / "image.png").convert("RGB")
    expected = python_call(inpaint, image=image, mask_image=Image.open(pictures / "mask.png").convert("L"))
    assert np.abs(pixels - expected).max() <= 1
    assert metadata["task"] == "inpaint" and metadata["mask"] == str(pictures / "mask.png")


def test_controlnet_commands_equal_the_controlnet_pipelines(pipe, model_folder, pictures, controlnet_folder, tmp_path):
    from diffusers import ControlNetModel

    controlnet = ControlNetModel.from_pretrained(controlnet_folder)
    control = Image.open(pictures / "image.png").convert("RGB")
    out = tmp_path / "text2img"
    assert run_cli("generate", "a red circle", "--model", model_folder, "--out", out, "--seed", SEED,
                   "--control", pictures / "image.png", "--controlnet", controlnet_folder, "--control-scale", "0.8") == 0  # fmt: skip
    pixels, metadata = written_image(out)
    controlled = StableDiffusionXLControlNetTPGPipeline.from_pipe(pipe, controlnet=controlnet)
    assert np.abs(pixels - python_call(controlled, image=control, controlnet_conditioning_scale=0.8)).max() <= 1
    assert metadata["task"] == "controlnet-text2img" and metadata["controlnet_conditioning_scale"] == 0.8
    without = python_call(pipe)
    assert np.abs(pixels - without).max() > 1  # the ControlNet steers the picture

    out = tmp_path / "img2img"
    assert run_cli("generate", "a red circle", "--model", model_folder, "--out", out, "--seed", SEED, "--image",
                   pictures / "image.png", "--control", pictures / "image.png", "--controlnet", controlnet_folder) == 0  # fmt: skip
    pixels, metadata = written_image(out)
    controlled = StableDiffusionXLControlNetTPGImg2ImgPipeline.from_pipe(pipe, controlnet=controlnet)
    assert np.abs(pixels - python_call(controlled, image=control, control_image=control)).max() <= 1
    assert metadata["task"] == "controlnet-img2img"


def test_compare_runs_every_panel_on_the_same_init_image(model_folder, pictures, tmp_path):
    assert run_cli("compare", "a red circle", "--model", model_folder, "--out", tmp_path,
                   "--image", pictures / "image.png", "--strength", "0.5") == 0  # fmt: skip
    (grid,) = os.listdir(tmp_path)
    metadata = json.loads(Image.open(tmp_path / grid).text["parameters"])
    assert metadata["task"] == "img2img" and metadata["strength"] == 0.5 and len(metadata["panels"]) == 5


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--mask", "{mask}"], "--mask needs --image"),
        (["--strength", "0.5"], "--strength needs --image"),
        (["--image", "{image}", "--strength", "0"], "--strength"),
        (["--image", "{image}", "--strength", "1.5"], "--strength"),
        (["--image", "{missing}"], "--image: no such file"),
        (["--image", "{notes}"], "not an image"),
        (["--image", "{image}", "--mask", "{small_mask}"], "--mask: 16x16 pixels, but --image is 32x32"),
        (["--control", "{image}"], "--control and --controlnet go together"),
        (["--controlnet", "{folder}"], "--control and --controlnet go together"),
        (["--control", "{image}", "--controlnet", "{folder}"], "no ControlNet here"),
        (["--control", "{image}", "--controlnet", "{image}"], "not a file"),
        (["--control-scale", "2"], "--control-scale needs --control"),
        (["--image", "{image}", "--control-scale", "nan"], "--control-scale"),
    ],
)
def test_bad_task_options_fail_in_one_line_before_loading(loads, pictures, tmp_path, capsys, argv, message):
    names = {"image": pictures / "image.png", "mask": pictures / "mask.png", "small_mask": pictures / "small_mask.png",
             "notes": pictures / "notes.png", "missing": pictures / "missing.png", "folder": pictures}  # fmt: skip
    argv = [argument.format(**names) for argument in argv]
    assert run_cli("generate", "a red circle", "--out", tmp_path, *argv) == 2
    assert message in one_error_line(capsys)
    assert loads == []


def test_a_controlnet_that_cannot_load_is_one_line_and_status_2(model_folder, pictures, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    assert run_cli("generate", "a red circle", "--model", model_folder, "--out", tmp_path / "out",
                   "--control", pictures / "image.png", "--controlnet", broken) == 2  # fmt: skip
    assert f"--controlnet {broken}: cannot load it" in one_error_line(capsys)
