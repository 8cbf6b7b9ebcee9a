"""The model family read from a diffusers folder or a single-file checkpoint, and the pipeline loaded for it."""

import json

import pytest
import torch
from safetensors.torch import save_file

from dualguide import StableDiffusionTPGPipeline, StableDiffusionXLTPGPipeline
from dualguide.loading import detect_family, load_pipeline
from dualguide.tiny import build_tiny_sd

SUPPORTED = "supported: Stable Diffusion XL, Stable Diffusion 1.x / 2.x, Stable Diffusion 3 / 3.5"


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_sd")
    StableDiffusionTPGPipeline(**build_tiny_sd(version=2)).save_pretrained(folder)
    return folder


def test_a_saved_sd_folder_loads_as_the_sd_pipeline(sd_folder):
    assert detect_family(sd_folder) == "sd"
    pipe = load_pipeline(str(sd_folder))
    assert type(pipe) is StableDiffusionTPGPipeline and pipe.scheduler.config.prediction_type == "v_prediction"
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a red circle", height=32, width=32, num_inference_steps=2, output_type="latent").images
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("class_name, family", [
    ("StableDiffusionPipeline", "sd"), ("StableDiffusionInpaintPipeline", "sd"), ("StableDiffusionXLPipeline", "sdxl"),
    ("StableDiffusionXLTPGPipeline", "sdxl"), ("StableDiffusionXLImg2ImgPipeline", "sdxl"),
])  # fmt: skip
def test_folder_family_from_model_index(tmp_path, class_name, family):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": class_name}))
    assert detect_family(tmp_path) == family


@pytest.mark.parametrize("class_name", ["AuraFlowPipeline", "WanPipeline", ""])
def test_an_unsupported_folder_fails_in_one_line_naming_the_supported_families(tmp_path, class_name):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": class_name}))
    with pytest.raises(ValueError) as error:
        load_pipeline(str(tmp_path))
    assert SUPPORTED in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("key, family", [
    ("conditioner.embedders.1.model.ln_final.weight", "sdxl"),
    ("cond_stage_model.transformer.text_model.final_layer_norm.weight", "sd"),
    ("cond_stage_model.model.ln_final.weight", "sd"),
])  # fmt: skip
def test_single_file_family_from_its_keys(tmp_path, key, family):
    path = tmp_path / "model.safetensors"
    save_file({"model.diffusion_model.out.2.bias": torch.zeros(4), key: torch.zeros(2)}, str(path))
    assert detect_family(path) == family


def test_a_single_file_of_another_family_fails_naming_the_supported_ones(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"model.diffusion_model.double_blocks.0.img_attn.qkv.weight": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError, match=SUPPORTED):
        detect_family(path)
    with pytest.raises(ValueError, match="model_index.json"):
        detect_family(tmp_path / "missing")


def test_the_default_model_is_still_the_tiny_sdxl():
    assert type(load_pipeline()) is StableDiffusionXLTPGPipeline
