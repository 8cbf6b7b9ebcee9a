"""The ``dualguide`` command on a tiny model saved to a temp folder."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from dualguide import cli


@pytest.fixture(scope="module")
def model_folder(pipe, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_sdxl")
    pipe.save_pretrained(folder)
    with open(folder / "recommended.json", "w") as f:
        json.dump({"num_inference_steps": 2, "height": 32, "width": 32, "guidance_scale": 4.0, "tpg_scale": 2.0}, f)
    return str(folder)


def run_cli(*argv):
    return cli.main([str(a) for a in argv])


def test_help_and_samplers_do_not_import_torch():
    code = "import sys; from dualguide import cli; cli.main(['samplers']); print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "dpmpp_2m_sde" in result.stdout and "karras" in result.stdout
    assert result.stdout.strip().endswith("False")
    help_run = subprocess.run([sys.executable, "-m", "dualguide.cli", "--help"], capture_output=True, text=True)
    assert help_run.returncode == 0 and "generate" in help_run.stdout and "compare" in help_run.stdout


def test_generate_writes_pngs_with_settings(model_folder, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_cli("generate", "a red circle", "a blue square", "--model", model_folder, "--out", out,
                   "--nag", "3", "--tpg-interval", "0:0.5", "--seed", "5") == 0  # fmt: skip
    files = sorted(os.listdir(out))
    assert len(files) == 2 and all(f.endswith(".png") for f in files)
    image = Image.open(out / files[0])
    assert image.size == (32, 32)
    parameters = json.loads(image.text["parameters"])
    assert parameters["prompt"] == "a red circle" and parameters["seed"] == 5
    assert parameters["num_inference_steps"] == 2 and parameters["guidance_scale"] == 4.0  # recommended.json
    assert parameters["do_nag"] is True and parameters["tpg_interval"] == [0.0, 0.5]
    assert str(out) in capsys.readouterr().out


def test_compare_writes_one_labelled_grid(model_folder, tmp_path):
    assert run_cli("compare", "a red circle", "--model", model_folder, "--out", tmp_path, "--with-pag") == 0
    (grid,) = os.listdir(tmp_path)
    image = Image.open(tmp_path / grid)
    assert image.size == (6 * 128, 128 + 16)  # six 32 px panels upscaled to 128 px, labels below
    panels = json.loads(image.text["parameters"])["panels"]
    assert list(panels)[:2] == ["no guidance", "CFG 4"] and any("TPG+NAG" in p for p in panels)


def test_compare_gives_each_prompt_a_row(model_folder, tmp_path):
    prompts = ["a red circle", "a blue square"]
    assert run_cli("compare", *prompts, "--model", model_folder, "--out", tmp_path, "--steps", "1") == 0
    (grid,) = os.listdir(tmp_path)
    image = Image.open(tmp_path / grid)
    assert image.size == (5 * 128, 2 * 128 + 16) and grid.startswith("compare_a_red_circle_and_1_more_")
    assert json.loads(image.text["parameters"])["prompt"] == prompts
    top, bottom = np.asarray(image)[:128], np.asarray(image)[128:256]
    assert not np.array_equal(top, bottom)  # different prompts, different rows


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "/no/such/folder"], "no such file or folder"),
        (["--model", "someone/not-cached-model"], "offline"),
        (["--sampler", "eulerr"], "--sampler"),
        (["--schedule", "linear"], "--schedule"),
        (["--size", "33"], "height"),
    ],
)
def test_bad_input_is_one_line_and_status_2(model_folder, tmp_path, capsys, argv, message):
    if "--model" not in argv:
        argv = argv + ["--model", model_folder]
    assert run_cli("generate", "a red circle", "--out", tmp_path, *argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1
    assert not any(name.endswith(".png") for name in os.listdir(tmp_path))


def test_interrupted_save_leaves_no_partial_png(tmp_path, monkeypatch):
    image = Image.new("RGB", (8, 8))

    def interrupted_save(self, fp, *args, **kwargs):
        with open(fp, "wb") as f:
            f.write(b"\x89PNG half")
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        cli.save_png(image, str(tmp_path / "x.png"), {"prompt": "p"})
    assert os.listdir(tmp_path) == []


def test_recommended_json_round_trip_and_default_dtype(tmp_path):
    import torch

    from dualguide.loading import default_dtype, read_recommended, write_recommended

    assert read_recommended(tmp_path) == {}
    write_recommended(tmp_path, {"guidance_scale": 4.0, "tpg_applied_layers_index": "d0-d23"})
    assert read_recommended(tmp_path) == {"guidance_scale": 4.0, "tpg_applied_layers_index": "d0-d23"}
    assert cli.recommended_settings(str(tmp_path))["guidance_scale"] == 4.0
    assert default_dtype("cpu") == torch.float32 and default_dtype("cuda:0") == torch.float16
