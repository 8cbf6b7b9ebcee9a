"""The command on a Stable Diffusion 1.x / 2.x folder: the family read from model_index.json, its default layers,
its task pipelines; a folder of an unsupported family fails in one line before loading."""

import json
import os

import pytest
from PIL import Image

from dualguide import StableDiffusionTPGPipeline, cli
from dualguide.tiny import build_tiny_sd

SUPPORTED = "supported: Stable Diffusion XL, Stable Diffusion 1.x / 2.x, Stable Diffusion 3 / 3.5"


@pytest.fixture(scope="module", params=[1, 2], ids=["sd1", "sd2"])
def sd_folder(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"tiny_sd{request.param}")
    pipe = StableDiffusionTPGPipeline(**build_tiny_sd(version=request.param))
    pipe.save_pretrained(folder)
    return str(folder)


def parameters(path):
    return json.loads(Image.open(path).text["parameters"])


def test_generate_and_compare_on_an_sd_folder_use_its_family_defaults(sd_folder, tmp_path):
    out = tmp_path / "out"
    assert cli.main(["generate", "a red circle", "--model", sd_folder, "--steps", "2", "--size", "32", "--nag", "2", "--out", str(out)]) == 0
    (name,) = os.listdir(out)
    written = parameters(out / name)
    assert written["tpg_applied_layers_index"] == "d4-d5" and written["tpg_scale"] == 3.0 and Image.open(out / name).size == (32, 32)
    assert cli.main(["compare", "a red circle", "--model", sd_folder, "--steps", "2", "--size", "32", "--with-pag",
                     "--out", str(tmp_path / "grid")]) == 0  # fmt: skip
    (grid,) = os.listdir(tmp_path / "grid")
    assert set(parameters(tmp_path / "grid" / grid)["panels"]) >= {"CFG 5", "CFG+TPG 3", "CFG+PAG 3"}


def test_img2img_on_an_sd_folder_runs_the_sd_img2img_pipeline(sd_folder, tmp_path):
    picture = tmp_path / "start.png"
    Image.new("RGB", (32, 32), (200, 20, 20)).save(picture)
    out = tmp_path / "out"
    assert cli.main(["generate", "a green circle", "--model", sd_folder, "--steps", "2", "--image", str(picture),
                     "--strength", "0.6", "--out", str(out)]) == 0  # fmt: skip
    (name,) = os.listdir(out)
    assert parameters(out / name)["task"] == "img2img"


def test_a_wrong_layer_id_for_sd_names_the_valid_range(sd_folder, tmp_path, capsys):
    assert cli.main(["generate", "p", "--model", sd_folder, "--steps", "2", "--size", "32", "--tpg-layers", "d6-d23",
                     "--out", str(tmp_path)]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "tpg_applied_layers_index" in err and "d0-d5" in err


def test_a_folder_of_an_unsupported_family_fails_in_one_line_before_loading(tmp_path, loads, capsys):
    folder = tmp_path / "auraflow"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "AuraFlowPipeline"}))
    assert cli.main(["generate", "p", "--model", str(folder), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not a supported model family" in err and SUPPORTED in err and loads == []
