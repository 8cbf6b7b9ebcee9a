"""Bounds in the front ends and file names from hostile prompts: refused in one line before any model loads,
names that stay inside --out within 255 bytes."""

import json
import os

import pytest

from dualguide import cli
from dualguide.generation import Limits, image_name, slug
from dualguide.generation.images import grid_name
from dualguide.ui.engine import Engine


def run_cli(*argv):
    return cli.main([str(a) for a in argv])


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("dualguide: error: "), err
    return err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "p", "--size", "100000"], "--size: width 100000 px is over the bound --max-side 4096"),
        (["generate", "p", "--size", "64x4097"], "height 4097 px is over the bound --max-side 4096"),
        (["generate", "p", "--size", "256", "--max-side", "128"], "width 256 px is over the bound --max-side 128"),
        (["generate", "p", "--steps", "501"], "--steps 501: over the bound --max-steps 500"),
        (["generate", "p", "--steps", "20", "--max-steps", "10"], "--steps 20: over the bound --max-steps 10"),
        (["generate", "p", "--n", "65"], "--n: 65 images in one pipeline call is over the bound --max-batch 64"),
        (["generate", "p", "--n", "2", "--max-batch", "1"], "--n: 2 images in one pipeline call is over the bound --max-batch 1"),
        (["generate", "a", "b", "c", "--max-images", "2"], "this run would make 3 images, over the bound --max-images 2"),
        (["compare", "p", "--steps", "600"], "--steps 600: over the bound --max-steps 500"),
        (["compare", "p", "--max-images", "4"], "this run would make 5 images, over the bound --max-images 4"),
        (["compare", "p", "--with-pag", "--size", "5000"], "width 5000 px is over the bound --max-side 4096"),
        (["eval", "--embedded-prompts", "2", "--steps", "501"], "--steps 501: over the bound --max-steps 500"),
        (["eval", "--embedded-prompts", "2", "--max-images", "10"], "over the bound --max-images 10"),
        (["eval", "--embedded-prompts", "2", "--batch-size", "65"], "--batch-size: 65 images in one pipeline call"),
    ],
)  # fmt: skip
def test_each_bound_is_one_line_naming_its_flag_before_loading(argv, message, tmp_path, loads, capsys):
    assert run_cli(*argv, "--out", tmp_path / "out") == 2
    assert message in error_line(capsys) and loads == []


def test_batch_bounds_name_the_line_or_the_flag(tmp_path, loads, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a"}\n{"prompt": "b", "size": [100000, 64]}\n')
    assert run_cli("batch", prompts, "--out", tmp_path / "o") == 2
    assert f"{prompts}:2: size: width 100000 px is over the bound --max-side 4096" in error_line(capsys)
    prompts.write_text('{"prompt": "a", "steps": 900}\n')
    assert run_cli("batch", prompts, "--out", tmp_path / "o") == 2
    assert f"{prompts}:1: steps 900: over the bound --max-steps 500" in error_line(capsys)
    prompts.write_text('{"prompt": "a", "n": 3}\n')
    assert run_cli("batch", prompts, "--out", tmp_path / "o", "--max-images", "2") == 2
    assert "this run would make 3 images, over the bound --max-images 2" in error_line(capsys)
    assert run_cli("batch", prompts, "--out", tmp_path / "o", "--batch-size", "70") == 2
    assert "--batch-size: 70 images in one pipeline call is over the bound --max-batch 64" in error_line(capsys)
    assert loads == [] and not (tmp_path / "o").exists()


def test_a_recommended_size_over_the_bound_is_refused_and_a_raised_bound_lets_it_load(tmp_path, loads, capsys):
    model = tmp_path / "model"
    model.mkdir()
    (model / "model_index.json").write_text('{"_class_name": "StableDiffusionXLPipeline"}')  # an SDXL folder to the checks
    (model / "recommended.json").write_text(json.dumps({"width": 8192, "height": 8192}))
    assert run_cli("generate", "p", "--model", model, "--out", tmp_path / "o") == 2
    assert "width 8192 px is over the bound --max-side 4096" in error_line(capsys) and loads == []
    assert run_cli("generate", "p", "--model", model, "--out", tmp_path / "o", "--max-side", "8192") == 1  # the fake loader
    assert len(loads) == 1


def test_limits_default_and_from_options():
    assert Limits() == Limits(max_side=4096, max_steps=500, max_batch=64, max_images=100_000)
    assert Limits.from_options({"max_side": 512, "max_steps": None}) == Limits(max_side=512)


def test_the_ui_repeats_raised_bounds_in_every_command():
    engine = Engine(None, limits=Limits(max_side=8192, max_steps=500))
    assert engine.server_flags() == ["--max-side", "8192"]


HOSTILE = [
    "../../etc/passwd", "/abs/path", "a\\b/c", "..", ".", "\x00\x01\n\t\r", "con", "a" * 1000, "猫" * 300, "𝐀" * 300,
    "e\u0301" * 200, "🙂" * 100, "", " ", "-rf", "~/x", "$(rm -rf /)", "name.png", "\u202eevil",
]  # fmt: skip


@pytest.mark.parametrize("prompt", HOSTILE)
def test_file_names_from_hostile_prompts_stay_inside_out_within_255_bytes(prompt, tmp_path):
    names = [image_name(999, 99, 2**64 - 1, prompt), grid_name([prompt]), grid_name([prompt, prompt + "x"]),
             f"00001_000_s{2**64 - 1}_{slug(prompt)}.png"]  # fmt: skip
    for name in names:
        assert len(name.encode("utf-8")) <= 255
        assert "/" not in name and "\\" not in name and ".." not in name and name.isprintable()
        path = os.path.join(tmp_path, name)
        assert os.path.dirname(os.path.abspath(path)) == str(tmp_path)
        open(path, "wb").close()  # the file system takes the name


@pytest.mark.parametrize("flag", ["--max-side", "--max-steps", "--max-batch", "--max-images"])
@pytest.mark.parametrize("value", ["0", "-5", "abc", "1.5"])
def test_a_bad_bound_names_its_flag_before_loading(flag, value, tmp_path, loads, capsys):
    assert run_cli("generate", "p", flag, value, "--out", tmp_path / "out") == 2
    err = error_line(capsys)
    assert f"argument {flag}" in err and "expected a whole number >= 1" in err and loads == []
