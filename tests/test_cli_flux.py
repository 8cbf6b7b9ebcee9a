"""The command on a Flux.1 diffusers folder: the family read from model_index.json, ``--cfg`` as true CFG (with
``--negative``) and the distilled guidance left at the model's, NAG at the official Flux settings, the comparison of
what NAG is for, ``--image`` and bad folders in one line."""

import json
import os

import numpy as np
import pytest
import torch
from diffusers import ChromaPipeline, FluxKontextPipeline, FluxPipeline
from PIL import Image

from dualguide import FluxTPGPipeline, cli, loading
from dualguide.generation import tasks
from dualguide.tiny import build_tiny_chroma, build_tiny_flux

SIZE = ["--steps", "2", "--size", "32"]


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_flux_dev")
    FluxPipeline(**build_tiny_flux("dev")).save_pretrained(folder)
    return str(folder)


def parameters(path):
    return json.loads(Image.open(path).text["parameters"])


def only_png(folder):
    (name,) = [name for name in os.listdir(folder) if name.endswith(".png")]
    return os.path.join(folder, name)


def test_the_folder_loads_back_offline_with_its_tokenizers(flux_folder, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with open(os.path.join(flux_folder, "model_index.json")) as f:
        assert json.load(f)["_class_name"] == "FluxPipeline"
    pipe = FluxTPGPipeline.from_pretrained(flux_folder)
    assert pipe.tokenizer("a red circle").input_ids and pipe.tokenizer_2("a red circle").input_ids


def test_generate_maps_cfg_to_true_cfg_and_keeps_the_distilled_guidance(flux_folder, tmp_path):
    out = tmp_path / "out"
    argv = ["generate", "a red circle", "--model", flux_folder, *SIZE, "--cfg", "3", "--negative", "blue", "--out", str(out)]
    assert cli.main(argv) == 0
    written = parameters(only_png(out))
    assert written["true_cfg_scale"] == 3.0 and written["negative_prompt"] == "blue" and "guidance_scale" not in written
    assert written["tpg_scale"] == 0.0 and written["nag_alpha"] == 0.25 and written["nag_tau"] == 2.5
    image = np.asarray(Image.open(only_png(out)), dtype=np.float32)
    assert image.shape == (32, 32, 3)

    pipe = FluxTPGPipeline.from_pretrained(flux_folder)
    common = dict(num_inference_steps=2, height=32, width=32, sampler="euler", tpg_scale=0.0, output_type="np")
    direct = pipe("a red circle", negative_prompt="blue", true_cfg_scale=3.0, generator=[torch.Generator().manual_seed(0)], **common)
    plain = pipe("a red circle", generator=[torch.Generator().manual_seed(0)], **common)
    assert np.abs(direct.images[0] * 255 - image).max() <= 1.0  # the PNG rounds to whole levels
    assert np.abs(plain.images[0] * 255 - image).max() > 2.0  # true CFG changed the picture


def test_compare_on_flux_shows_none_nag_true_cfg_and_both(flux_folder, tmp_path):
    out = tmp_path / "grid"
    argv = ["compare", "a red circle", "--model", flux_folder, *SIZE, "--nag-negative", "blurry", "--out", str(out)]
    assert cli.main(argv) == 0
    panels = parameters(only_png(out))["panels"]
    assert list(panels) == ["none", "NAG 5", "true CFG 4", "true CFG+NAG"]
    none, nag, cfg, both = panels.values()
    assert not none["do_nag"] and none["true_cfg_scale"] == 1.0 and none["negative_prompt"] is None
    assert nag["do_nag"] and nag["nag_scale"] == 5.0 and nag["nag_negative_prompt"] == "blurry" and nag["true_cfg_scale"] == 1.0
    assert cfg["true_cfg_scale"] == 4.0 and cfg["negative_prompt"] == "blurry" and not cfg["do_nag"]
    assert both["true_cfg_scale"] == 4.0 and both["do_nag"] and both["nag_negative_prompt"] == "blurry"
    assert all("guidance_scale" not in panel for panel in panels.values())


def test_batch_on_a_flux_folder_with_nag_and_the_distilled_guidance(flux_folder, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    out = tmp_path / "out"
    argv = ["batch", str(prompts), "--model", flux_folder, *SIZE, "--nag", "5", "--nag-negative", "blue", "--distilled-guidance", "2",
            "--out", str(out)]  # fmt: skip
    assert cli.main(argv) == 0
    written = parameters(only_png(out))
    assert written["do_nag"] and written["nag_scale"] == 5.0 and written["true_cfg_scale"] == 4.0 and written["guidance_scale"] == 2.0


def test_eval_runs_on_a_flux_folder(flux_folder, clip_folder, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    out = tmp_path / "run"
    argv = ["eval", str(prompts), "--model", flux_folder, "--clip", str(clip_folder), "--modes", "off: nag=1; nag: nag=5,nag-negative=blue",
            "--baseline", "off", "--out", str(out), *SIZE, "--seeds", "1"]  # fmt: skip
    assert cli.main(argv) == 0
    assert set(json.loads((out / "results.json").read_text())["modes"]) >= {"off", "nag"}


def test_image_on_flux_runs_img2img_or_names_the_option(flux_folder, tmp_path, capsys, monkeypatch):
    picture = tmp_path / "start.png"
    Image.new("RGB", (32, 32), (200, 20, 20)).save(picture)
    out = tmp_path / "out"
    argv = ["generate", "a green circle", "--model", flux_folder, *SIZE, "--image", str(picture), "--strength", "0.6", "--out", str(out)]
    assert cli.main(argv) == 0 and parameters(only_png(out))["task"] == "img2img"
    monkeypatch.setitem(tasks.TASK_PIPELINES, "flux", {"img2img": "FluxTPGNoSuchImg2ImgPipeline"})  # a family without one yet
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("dualguide: error: --image: the img2img task is not available for Flux.1")


def test_a_kontext_folder_edits_the_image_and_makes_text_to_image_without_one(tmp_path):
    folder = tmp_path / "kontext"
    FluxKontextPipeline(**build_tiny_flux("kontext")).save_pretrained(folder)
    picture = tmp_path / "start.png"
    Image.new("RGB", (32, 32), (200, 20, 20)).save(picture)
    edit, text = tmp_path / "edit", tmp_path / "text"
    assert cli.main(["generate", "make it green", "--model", str(folder), *SIZE, "--image", str(picture), "--out", str(edit)]) == 0
    written = parameters(only_png(edit))
    assert written["task"] == "img2img" and written["nag_end"] == 0.25 and written["image"] == str(picture)
    assert Image.open(only_png(edit)).size == (32, 32)  # --size is Kontext's output (max_area), not scaled to 1 MP
    assert cli.main(["generate", "a red circle", "--model", str(folder), *SIZE, "--out", str(text)]) == 0
    assert "task" not in parameters(only_png(text))


def test_generate_on_a_chroma_folder_takes_cfg_as_guidance_scale(tmp_path):
    folder, out = tmp_path / "chroma", tmp_path / "out"
    ChromaPipeline(**build_tiny_chroma()).save_pretrained(folder)
    argv = ["generate", "a red circle", "--model", str(folder), *SIZE, "--cfg", "3", "--negative", "blue", "--nag", "3", "--out", str(out)]
    assert cli.main(argv) == 0
    written = parameters(only_png(out))
    assert written["guidance_scale"] == 3.0 and "true_cfg_scale" not in written and written["do_nag"] and written["nag_alpha"] == 0.25


def test_distilled_guidance_on_a_model_without_it_is_refused_before_loading(tmp_path, loads, capsys):
    assert cli.main(["generate", "p", "--distilled-guidance", "2", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--distilled-guidance" in err and loads == []


@pytest.mark.parametrize(
    "index, wanted",
    [({"_class_name": "AuraFlowPipeline"}, "is not a supported model family"), (None, "no model_index.json")],
    ids=["other-family", "no-index"],
)
def test_a_bad_model_folder_fails_in_one_line_before_loading(tmp_path, loads, capsys, index, wanted):
    folder = tmp_path / "model"
    folder.mkdir()
    if index is not None:
        (folder / "model_index.json").write_text(json.dumps(index))
    assert cli.main(["compare", "p", "--model", str(folder), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and wanted in err and loads == []


def test_a_class_whose_guided_pipeline_is_missing_is_refused_before_loading(tmp_path, loads, capsys, monkeypatch):
    monkeypatch.setitem(loading.CLASS_PIPELINES, "FluxFuturePipeline", ("flux", "FluxFutureTPGPipeline"))
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxFuturePipeline"}))
    assert cli.main(["generate", "p", "--model", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no FluxFutureTPGPipeline here yet" in err and "is not a supported model family" in err
    assert loads == []


def test_a_flux_folder_without_weights_fails_in_one_line(tmp_path, capsys):
    folder = tmp_path / "flux"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    assert cli.main(["generate", "p", "--model", str(folder), *SIZE, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--model {folder}" in err


def test_flux_loads_in_bfloat16_on_cuda_by_default():
    from dualguide.loading import default_dtype

    assert default_dtype("cuda", "flux") == torch.bfloat16 and default_dtype("cuda", "sdxl") == torch.float16
    assert default_dtype("cpu", "flux") == torch.float32


def test_the_ui_engine_runs_a_flux_folder_with_cfg_as_true_cfg(flux_folder):
    from dualguide.ui import settings as ui_settings
    from dualguide.ui.engine import Engine

    engine = Engine(model=flux_folder, device="cpu").start(background=False)
    assert engine.load_error is None
    controls = ui_settings.controls_from_settings(engine.settings, engine.pag_layers)
    controls.modes, controls.steps, controls.size, controls.negative = ["CFG+NAG"], "2", "32", "blue"
    (run,) = engine.plan(controls)
    assert run.kwargs["true_cfg_scale"] == 4.0 and run.kwargs["negative_prompt"] == "blue" and run.kwargs["do_nag"]
    assert "guidance_scale" not in run.kwargs and "--cfg" in run.argv
    images = [event for event in engine.run([run], "session") if event.kind == "image"]
    assert len(images) == 1 and Image.open(images[0].image).size == (32, 32)
