"""The ``dualguide`` command on a tiny model saved to a temp folder."""

import json
import os
import subprocess
import sys
import threading
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from dualguide import cli
from dualguide.generation import images as image_files
from dualguide.generation import models



def run_cli(*argv):
    return cli.main([str(a) for a in argv])


def one_error_line(capsys) -> str:
    """The whole stderr of a failed command: exactly one line, ``dualguide: error: ...``, no traceback or usage."""
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("dualguide: error: "), err
    assert "Traceback" not in err and "usage:" not in err
    return err



class FakePipe:
    """Stands for a loaded pipeline: records the seeds of the generators it gets, or raises ``failure``."""

    def __init__(self, failure=None):
        self.failure, self.calls = failure, []

    def set_progress_bar_config(self, **kwargs):
        pass

    def __call__(self, prompt, generator=None, num_images_per_prompt=1, **kwargs):
        assert isinstance(generator, list) and len(generator) == num_images_per_prompt
        self.calls.append((prompt, [g.initial_seed() for g in generator]))
        if self.failure is not None:
            raise self.failure
        return SimpleNamespace(images=[Image.new("RGB", (8, 8), (g.initial_seed() % 256, 0, 0)) for g in generator])


@pytest.fixture
def fake(monkeypatch, tmp_path_factory):
    """``(pipe, model folder)``: ``load_model`` returns a FakePipe; the folder passes the --model checks."""
    folder = tmp_path_factory.mktemp("fake_model")
    (folder / "model_index.json").write_text('{"_class_name": "StableDiffusionXLPipeline"}')  # an SDXL folder to the checks
    pipe = FakePipe()
    monkeypatch.setattr(models, "load_model", lambda *args, **kwargs: pipe)
    return pipe, str(folder)


def test_help_and_samplers_do_not_import_torch():
    code = "import sys; from dualguide import cli; cli.main(['samplers']); print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "dpmpp_2m_sde" in result.stdout and "karras" in result.stdout
    lines = result.stdout.splitlines()
    assert any(line.startswith("dpm_fast: --steps is the number of model evaluations") for line in lines)
    assert any(line.startswith("dpm_adaptive: ") and "ignores --steps" in line for line in lines)
    assert result.stdout.strip().endswith("False")
    help_run = subprocess.run([sys.executable, "-m", "dualguide.cli", "--help"], capture_output=True, text=True)
    assert help_run.returncode == 0 and "generate" in help_run.stdout and "compare" in help_run.stdout


def test_generate_writes_pngs_with_settings(model_folder, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_cli("generate", "a red circle", "a blue square", "--model", model_folder, "--out", out,
                   "--nag", "3", "--tpg-interval", "0:0.5", "--seed", "5") == 0  # fmt: skip
    files = sorted(os.listdir(out))
    assert files == ["000_00_s5_a_red_circle.png", "001_00_s6_a_blue_square.png"]
    image = Image.open(out / files[0])
    assert image.size == (32, 32)
    parameters = json.loads(image.text["parameters"])
    assert parameters["prompt"] == "a red circle" and parameters["seed"] == 5
    assert parameters["num_inference_steps"] == 2 and parameters["guidance_scale"] == 4.0  # recommended.json
    assert parameters["do_nag"] is True and parameters["tpg_interval"] == [0.0, 0.5]
    assert "task" not in parameters  # text to image: no task fields (the ui writes the same metadata)
    assert str(out) in capsys.readouterr().out


def test_compare_writes_one_labelled_grid(model_folder, tmp_path):
    assert run_cli("compare", "a red circle", "--model", model_folder, "--out", tmp_path, "--with-pag") == 0
    (grid,) = os.listdir(tmp_path)
    assert grid == "compare_s0_a_red_circle.png"
    image = Image.open(tmp_path / grid)
    assert image.size == (6 * 128, 128 + 16)  # six 32 px panels upscaled to 128 px, labels below
    panels = json.loads(image.text["parameters"])["panels"]
    assert list(panels)[:2] == ["no guidance", "CFG 4"] and any("TPG+NAG" in p for p in panels)


def test_compare_with_a_nag_negative_adds_nag_with_cfg_off(model_folder, tmp_path):
    argv = ["compare", "a circle", "--model", model_folder, "--out", tmp_path, "--steps", "1", "--nag-negative", "a red shape"]
    assert run_cli(*argv) == 0
    (grid,) = os.listdir(tmp_path)
    image = Image.open(tmp_path / grid)
    panels = json.loads(image.text["parameters"])["panels"]
    assert image.size == (6 * 128, 128 + 16) and list(panels)[:3] == ["no guidance", "NAG 3 (CFG off)", "CFG 4"]
    nag_alone, cfg = panels["NAG 3 (CFG off)"], panels["CFG 4"]
    assert nag_alone["guidance_scale"] == 1.0 and nag_alone["do_nag"] and nag_alone["nag_negative_prompt"] == "a red shape"
    assert not cfg["do_nag"] and not cfg.get("negative_prompt")  # CFG's negative stays empty: only NAG gets it


def test_compare_gives_each_prompt_a_row(model_folder, tmp_path):
    prompts = ["a red circle", "a blue square"]
    assert run_cli("compare", *prompts, "--model", model_folder, "--out", tmp_path, "--steps", "1") == 0
    (grid,) = os.listdir(tmp_path)
    image = Image.open(tmp_path / grid)
    assert image.size == (5 * 128, 2 * 128 + 16) and grid.startswith("compare_s0_a_red_circle_and_1_more_")
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
    assert message in one_error_line(capsys)
    assert not any(name.endswith(".png") for name in os.listdir(tmp_path))


def test_interrupted_save_leaves_no_partial_png(tmp_path, monkeypatch):
    image = Image.new("RGB", (8, 8))

    def interrupted_save(self, fp, *args, **kwargs):
        with open(fp, "wb") as f:
            f.write(b"\x89PNG half")
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        image_files.save_png(image, str(tmp_path / "x.png"), {"prompt": "p"})
    assert os.listdir(tmp_path) == []


def test_recommended_json_round_trip_and_default_dtype(tmp_path):
    import torch

    from dualguide.loading import default_dtype, read_recommended, write_recommended

    assert read_recommended(tmp_path) == {}
    write_recommended(tmp_path, {"guidance_scale": 4.0, "tpg_applied_layers_index": "d0-d23"})
    assert read_recommended(tmp_path) == {"guidance_scale": 4.0, "tpg_applied_layers_index": "d0-d23"}
    assert models.recommended_settings(str(tmp_path))["guidance_scale"] == 4.0
    assert default_dtype("cpu") == torch.float32 and default_dtype("cuda:0") == torch.float16


# --- failures: one stderr line, status 2 (usage) or 1 (runtime), no model loaded for usage errors ---------------


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["generate", "p", "--steps", "abc"], "--steps"),
        (["generate", "p", "--steps", "0"], "--steps"),
        (["generate", "p", "--cfg", "nan"], "--cfg"),
        (["generate", "p", "--cfg", "inf"], "--cfg"),
        (["generate", "p", "--tpg", "-1"], "--tpg"),
        (["generate", "p", "--nag-tau", "0"], "--nag-tau"),
        (["generate", "p", "--nag-alpha", "1.5"], "--nag-alpha"),
        (["generate", "p", "--tpg-interval", "0.5:0.2"], "--tpg-interval"),
        (["generate", "p", "--nag-interval", "0:nan"], "--nag-interval"),
        (["generate", "p", "--size", "0"], "--size"),
        (["generate", "p", "--size", "0x64"], "--size"),
        (["generate", "p", "--size", "64x"], "--size"),
        (["generate", "p", "--n", "0"], "--n"),
        (["generate", "p", "--seed", "-1"], "--seed"),
        (["generate", "p", "--seed", str(2**64)], "--seed"),
        (["generate", "p", "--seed", "2**64"], "--seed"),
        (["generate", "p", "--device", "gpu"], "--device"),
        (["generate", "p", "--no-such-flag"], "--no-such-flag"),
        (["generate"], "prompt"),
        (["compare", "p", "--steps", "1.5"], "--steps"),
        ([], "command"),
        (["paint", "p"], "paint"),
    ],
)
def test_bad_flags_are_one_line_and_status_2(loads, capsys, argv, flag):
    assert run_cli(*argv) == 2
    assert flag in one_error_line(capsys)
    assert loads == []


def test_bad_flag_in_a_real_process_prints_one_line():
    result = subprocess.run([sys.executable, "-m", "dualguide.cli", "generate", "p", "--steps", "abc"],
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == "dualguide: error: argument --steps: expected a whole number >= 1, got 'abc'\n"


def test_largest_seed_is_accepted_and_seeds_must_not_pass_2_64(fake, tmp_path, capsys):
    pipe, folder = fake
    assert run_cli("generate", "p", "--model", folder, "--out", tmp_path, "--seed", 2**64 - 1) == 0
    assert pipe.calls == [("p", [2**64 - 1])] and os.listdir(tmp_path) == [f"000_00_s{2**64 - 1}_p.png"]
    assert run_cli("generate", "p", "--model", folder, "--out", tmp_path, "--seed", 2**64 - 1, "--n", 2) == 2
    assert "--seed" in one_error_line(capsys) and len(pipe.calls) == 1


def test_out_that_is_a_file_is_refused_before_loading(loads, tmp_path, capsys):
    (tmp_path / "taken").write_text("x")
    for command in ("generate", "compare"):
        assert run_cli(command, "p", "--out", tmp_path / "taken") == 2
        assert "--out" in one_error_line(capsys)
    assert loads == [] and (tmp_path / "taken").read_text() == "x"


def test_out_below_a_file_is_refused_before_loading(loads, tmp_path, capsys):
    (tmp_path / "taken").write_text("x")
    assert run_cli("generate", "p", "--out", tmp_path / "taken" / "a" / "b") == 2
    assert "is a file" in one_error_line(capsys) and loads == []


def test_unwritable_out_is_refused_before_loading(loads, tmp_path, capsys, monkeypatch):
    # The tests run as root, for whom chmod 0o555 does not stop writing: the probe is made to fail instead.
    def denied(folder):
        raise PermissionError(13, "Permission denied", folder)

    monkeypatch.setattr(image_files, "probe_folder", denied)
    for out in (tmp_path, tmp_path / "new" / "folder"):
        assert run_cli("generate", "p", "--out", out) == 2
        err = one_error_line(capsys)
        assert "--out" in err and "cannot write" in err and "Permission denied" in err
    assert loads == [] and os.listdir(tmp_path) == []


@pytest.mark.skipif(not os.path.isdir("/sys/kernel"), reason="needs Linux sysfs, where no one can create files")
def test_out_in_a_folder_no_one_can_write_is_refused(loads, capsys):
    assert run_cli("generate", "p", "--out", "/sys/dualguide-test-out") == 2
    assert "cannot write in /sys" in one_error_line(capsys) and loads == []


def test_probe_leaves_nothing_behind(tmp_path):
    image_files.probe_folder(str(tmp_path))
    assert os.listdir(tmp_path) == []


def test_model_folder_without_model_index_is_a_usage_error(loads, tmp_path, capsys):
    empty = tmp_path / "not_a_model"
    empty.mkdir()
    (tmp_path / "notes.txt").write_text("x")
    assert run_cli("generate", "p", "--model", empty, "--out", tmp_path / "out") == 2
    err = one_error_line(capsys)
    assert f"--model {empty}: no diffusers model here (no model_index.json)" in err and "download" not in err
    assert run_cli("generate", "p", "--model", tmp_path / "notes.txt", "--out", tmp_path / "out") == 2
    assert "single-file checkpoint" in one_error_line(capsys)
    assert run_cli("generate", "p", "--model", "./missing/model", "--out", tmp_path / "out") == 2
    assert "no such file or folder" in one_error_line(capsys)
    assert loads == []


@pytest.mark.parametrize(
    "failure, message",
    [
        (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\nsee the documentation"), "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"),
        (MemoryError(), "MemoryError"),
        (OSError(5, "Input/output error", "/some/file"), "Input/output error: /some/file"),
    ],
)  # fmt: skip
def test_runtime_failure_is_one_line_and_status_1(fake, tmp_path, capsys, failure, message):
    pipe, folder = fake
    pipe.failure = failure
    assert run_cli("generate", "p", "--model", folder, "--out", tmp_path) == 1
    assert one_error_line(capsys) == f"dualguide: error: {message}\n"


def test_failed_write_is_one_line_and_status_1(fake, tmp_path, capsys, monkeypatch):
    _, folder = fake

    def disk_full(image, path, metadata):
        raise OSError(28, "No space left on device", path)

    monkeypatch.setattr(image_files, "save_png", disk_full)
    assert run_cli("compare", "p", "--model", folder, "--out", tmp_path) == 1
    assert "No space left on device: " in one_error_line(capsys)


def test_interrupt_is_status_130_and_debug_shows_the_traceback(fake, tmp_path, capsys, monkeypatch):
    pipe, folder = fake
    pipe.failure = KeyboardInterrupt()
    assert run_cli("generate", "p", "--model", folder, "--out", tmp_path) == 130
    assert capsys.readouterr().err == "dualguide: interrupted\n"
    pipe.failure = RuntimeError("boom")
    monkeypatch.setenv("DUALGUIDE_DEBUG", "1")
    with pytest.raises(RuntimeError, match="boom"):
        run_cli("generate", "p", "--model", folder, "--out", tmp_path)


# --- seeds: image k of the command gets seed + k, in its name and its metadata --------------------------------


def test_each_image_gets_its_own_generator_and_seed(fake, tmp_path, capsys):
    pipe, folder = fake
    assert run_cli("generate", "a cat", "a dog", "--n", 3, "--seed", 10, "--model", folder, "--out", tmp_path) == 0
    assert pipe.calls == [("a cat", [10, 11, 12]), ("a dog", [13, 14, 15])]
    expected = [f"{p:03d}_{i:02d}_s{10 + 3 * p + i}_{slug}.png" for p, slug in enumerate(("a_cat", "a_dog")) for i in range(3)]
    assert sorted(os.listdir(tmp_path)) == expected
    for name in expected:
        seed = json.loads(Image.open(tmp_path / name).text["parameters"])["seed"]
        assert f"_s{seed}_" in name
    # Another seed writes other files; the same seed again says that it replaced files.
    assert run_cli("generate", "a cat", "--seed", 11, "--model", folder, "--out", tmp_path) == 0
    assert len(os.listdir(tmp_path)) == 7
    assert run_cli("generate", "a cat", "--seed", 11, "--model", folder, "--out", tmp_path) == 0
    assert "1 replaced" in capsys.readouterr().out and len(os.listdir(tmp_path)) == 7


def test_compare_grids_of_two_seeds_do_not_overwrite_each_other(fake, tmp_path):
    _, folder = fake
    for seed in (1, 2):
        assert run_cli("compare", "a cat", "--seed", seed, "--model", folder, "--out", tmp_path) == 0
    assert sorted(os.listdir(tmp_path)) == ["compare_s1_a_cat.png", "compare_s2_a_cat.png"]


@pytest.fixture(scope="module", params=["euler", "euler_ancestral"])
def batch_run(request, model_folder, tmp_path_factory):
    """Two prompts, two images each, seed 5, written by one command: ``(sampler, folder)``."""
    out = tmp_path_factory.mktemp("batch")
    argv = ["generate", "a red circle", "a blue square", "--n", 2, "--seed", 5, "--steps", 2, "--sampler", request.param]
    assert run_cli(*argv, "--model", model_folder, "--out", out) == 0
    return request.param, out


def test_batch_names_and_metadata_carry_each_image_seed(batch_run):
    _, out = batch_run
    expected = ["000_00_s5_a_red_circle.png", "000_01_s6_a_red_circle.png",
                "001_00_s7_a_blue_square.png", "001_01_s8_a_blue_square.png"]  # fmt: skip
    assert sorted(os.listdir(out)) == expected
    for name, seed in zip(expected, (5, 6, 7, 8)):
        assert json.loads(Image.open(out / name).text["parameters"])["seed"] == seed
    pixels = [np.asarray(Image.open(out / name)) for name in expected]
    assert not np.array_equal(pixels[0], pixels[1])  # own seeds, different images


def test_regenerating_one_image_alone_with_its_seed_gives_the_same_pixels(batch_run, model_folder, tmp_path):
    """Image k = 3 of the run (2nd prompt, 2nd image, seed 5 + 3) equals ``--seed 8 --n 1`` alone.

    Needs the pipeline's per-image generators (own noise, TPG permutations and sampler noise per image).
    Up to 1 of 255 is allowed for float rounding between batch sizes; a shared stream differs by far more.
    """
    sampler, out = batch_run
    argv = ["generate", "a blue square", "--seed", 8, "--n", 1, "--steps", 2, "--sampler", sampler]
    assert run_cli(*argv, "--model", model_folder, "--out", tmp_path) == 0
    assert os.listdir(tmp_path) == ["000_00_s8_a_blue_square.png"]
    alone = Image.open(tmp_path / "000_00_s8_a_blue_square.png")
    in_batch = Image.open(out / "001_01_s8_a_blue_square.png")
    assert json.loads(alone.text["parameters"]) == json.loads(in_batch.text["parameters"])
    difference = np.abs(np.asarray(alone).astype(int) - np.asarray(in_batch).astype(int))
    assert difference.max() <= 1, f"{(difference > 1).sum()} of {difference.size} values differ, by up to {difference.max()}"


# --- atomic writes ---------------------------------------------------------------------------------------------


def test_temporary_files_have_unique_names_in_the_same_folder(tmp_path, monkeypatch):
    image, seen = Image.new("RGB", (8, 8)), []

    def failing_save(self, fp, *args, **kwargs):
        seen.append(fp)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", failing_save)
    for _ in range(2):
        with pytest.raises(OSError):
            image_files.save_png(image, str(tmp_path / "x.png"), {"prompt": "p"})
    assert len(set(seen)) == 2 and all(os.path.dirname(p) == str(tmp_path) and p.endswith(".partial") for p in seen)
    assert os.listdir(tmp_path) == []


def test_concurrent_writes_of_one_path_leave_one_whole_png(tmp_path):
    path, colours = str(tmp_path / "x.png"), [(255, 0, 0), (0, 0, 255)]
    images = [Image.new("RGB", (64, 64), colour) for colour in colours]

    def write(image):
        for _ in range(10):
            image_files.save_png(image, path, {"prompt": "p"})

    threads = [threading.Thread(target=write, args=(image,)) for image in images]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert os.listdir(tmp_path) == ["x.png"]
    with Image.open(path) as result:
        assert result.getpixel((0, 0)) in colours and len(set(result.getdata())) == 1


def test_saved_png_has_the_usual_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        image_files.save_png(Image.new("RGB", (8, 8)), str(tmp_path / "x.png"), {})
    finally:
        os.umask(umask)
    assert os.stat(tmp_path / "x.png").st_mode & 0o777 == 0o644


# --- sampler notes ---------------------------------------------------------------------------------------------


def test_sampler_notes_match_k_diffusion():
    import torch
    from k_diffusion.sampling import sample_dpm_adaptive, sample_dpm_fast

    from samplers.registry import SAMPLER_NAMES, SAMPLER_NOTES

    assert set(SAMPLER_NOTES) == {"dpm_fast", "dpm_adaptive"} <= set(SAMPLER_NAMES)
    evaluations, steps = [], []

    def model(x, sigma):
        evaluations.append(1)
        return x * 0.5

    x = torch.ones(1, 1, 2, 2)
    sample_dpm_fast(model, x, 0.03, 14.6, 25, callback=lambda info: steps.append(info["i"]), disable=True)
    assert len(evaluations) == 25 and len(steps) == 9  # "25 -> 9 solver steps", fewer steps than evaluations
    evaluations.clear()
    sample_dpm_adaptive(model, x, 0.03, 14.6, disable=True)  # takes no step count at all
    assert len(evaluations) % 3 == 0  # 3 evaluations per tried step
