"""``dualguide eval``: modes, the plan through the batch job, per-prompt comparison, report files, resume, bad input.

The embedded model (its judge, ground-truth KID) and the tiny model from conftest (CLIP score, KID against a
reference folder) at 32 px, 2 steps, 3 prompts x 2 seeds.
"""

import json

import numpy as np
import pytest
from PIL import Image

from dualguide import cli
from dualguide.evaluation.command import (
    Measured, Prompt, Unit, compare, parse_modes, plan_lines, plan_order, plan_units,
)  # fmt: skip
from dualguide.evaluation.statistics import paired_comparison
from dualguide.toy.data import evaluation_prompts

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = ["--steps", "2", "--size", "32", "--seeds", "2", "--batch-size", "8"]
MODES = "none: cfg=1; cfg: cfg=4"


def run_cli(*argv):
    return cli.main([str(a) for a in argv])


# Modes and the plan


def test_parse_modes():
    modes = parse_modes("none: cfg=1,tpg=0; cfg : cfg=4 ;cfg+tpg: cfg=4, tpg-layers=u0-u3,m0,tpg=3;", "cfg")
    assert modes == {"none": {"cfg": "1", "tpg": "0"}, "cfg": {"cfg": "4"},
                     "cfg+tpg": {"cfg": "4", "tpg_layers": "u0-u3,m0", "tpg": "3"}}  # fmt: skip
    assert parse_modes("off:; cfg: cfg=4", "cfg")["off"] == {}


def test_plan_gives_every_mode_the_same_prompts_and_seeds_in_chunks():
    prompts = [Prompt("p"), Prompt("q", "blurry"), Prompt("r")]
    units = plan_units(prompts, seeds=2, unconditional=5, first_seed=10, per_call=4)
    assert units == [Unit("p", None, 10, 2), Unit("q", "blurry", 12, 2), Unit("r", None, 14, 2),
                     Unit("", None, 16, 4), Unit("", None, 20, 1)]  # fmt: skip
    order = plan_order(["a", "b"], units, per_call=4)
    assert order == [("a", 0), ("a", 1), ("b", 0), ("b", 1), ("a", 2), ("b", 2), ("a", 3), ("b", 3), ("a", 4), ("b", 4)]
    lines = plan_lines(order, units, {"a": {"cfg": "1", "tpg": "0"}, "b": {"cfg": "4"}})
    assert lines[:3] == [
        {"prompt": "p", "seed": 10, "n": 2, "cfg": "1", "tpg": "0"},
        {"prompt": "q", "negative": "blurry", "seed": 12, "n": 2, "cfg": "1", "tpg": "0"},
        {"prompt": "p", "seed": 10, "n": 2, "cfg": "4"},
    ]
    assert lines[-1] == {"prompt": "", "seed": 20, "n": 1, "cfg": "4"}


def test_compare_pairs_prompts_measured_in_both_modes():
    baseline = np.array([0.5, 1.0, np.nan, 0.0, 0.5])
    mode = np.array([1.0, 1.0, np.nan, 0.5, 1.0])  # +0.5, 0, (not measured), +0.5, +0.5
    one = np.array([np.nan, 1.0, np.nan, np.nan, np.nan])  # position: a single prompt names one
    measured = {
        "cfg": {"adherence": Measured(baseline, True), "position": Measured(one, True),
                "kid": Measured(np.array([0.2, 0.1, 0.3, 0.2, 0.2]), False, 0.01)},
        "tpg": {"adherence": Measured(mode, True), "position": Measured(1 - one, True),
                "kid": Measured(np.array([0.1, 0.1, 0.2, 0.1, 0.1]), False, 0.02)},
    }  # fmt: skip
    results = compare(measured, "cfg")
    assert set(results["cfg"]) == set(results["tpg"]) == {"adherence", "kid"}  # not position: one prompt only
    adherence = results["tpg"]["adherence"]
    assert (adherence.value, adherence.n) == (0.875, 4) and results["cfg"]["adherence"].value == 0.5
    assert adherence.comparison == paired_comparison([1.0, 1.0, 0.5, 1.0], [0.5, 1.0, 0.0, 0.5])
    assert adherence.comparison.difference == 0.375 and adherence.comparison.sign_test_p == pytest.approx(0.25)
    kid = results["tpg"]["kid"]
    assert (kid.error, kid.comparison.difference, kid.comparison.verdict) == (0.02, pytest.approx(-0.08), "better")
    assert results["cfg"]["adherence"].comparison is None


# The embedded model: judge metrics, ground-truth KID, report, resume


@pytest.fixture(scope="module")
def embedded_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "run"
    argv = ["eval", "--embedded-prompts", 3, "--unconditional", 4, "--modes", MODES, "--out", out, *FAST]
    assert run_cli(*argv) == 0
    return out, argv


def test_embedded_run_writes_the_report(embedded_run, capsys):
    out, _ = embedded_run
    names = {"plan.jsonl", "images", "results.md", "results.csv", "results.json", "metrics.png", "examples.png"}
    assert {path.name for path in out.iterdir()} == names
    images = sorted(path.name for path in (out / "images").glob("*.png"))
    assert len(images) == 2 * (3 * 2 + 4)
    data = json.loads((out / "results.json").read_text())
    assert data["baseline"] == "cfg" and list(data["modes"]) == ["none", "cfg"]
    none = data["modes"]["none"]
    for metric in ("adherence", "shape", "color", "background", "size", "kid", "kid_uncond", "diversity"):
        assert metric in none and none[metric]["comparison"]["verdict"] in ("better", "worse", "no difference")
    assert none["adherence"]["n"] == 3 and none["kid_uncond"]["n"] == 4 and none["kid"]["error"] > 0
    assert "| none |" in (out / "results.md").read_text()
    with Image.open(out / "examples.png") as grid:
        assert grid.size[0] > grid.size[1] / 2  # two columns, four rows (three prompts and the empty one)
    lines = [json.loads(line) for line in (out / "plan.jsonl").read_text().splitlines()]
    prompts = [(prompt, 2 * number) for number, prompt in enumerate(evaluation_prompts(3))]
    expected = [(*p, "1") for p in prompts] + [(*p, "4") for p in prompts] + [("", 6, "1"), ("", 6, "4")]
    assert [(line["prompt"], line["seed"], line["cfg"]) for line in lines] == expected


def test_rerun_makes_nothing_and_loads_no_model(embedded_run, loads, capsys):
    out, argv = embedded_run
    before = (out / "images" / "manifest.jsonl").read_text()
    report = (out / "results.json").read_text()
    assert run_cli(*argv) == 0
    assert "(0 made now, 20 already there)" in capsys.readouterr().out
    assert loads == [] and (out / "images" / "manifest.jsonl").read_text() == before
    assert (out / "results.json").read_text() == report  # same images, same seeded statistics


# Any checkpoint: CLIP score and KID against a reference folder


def test_model_with_clip_and_reference(model_folder, clip_folder, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\na green star\n")
    reference = tmp_path / "reference"
    reference.mkdir()
    for number in range(4):
        Image.new("RGB", (40, 40), (60 * number, 90, 200)).save(reference / f"{number}.png")
    out = tmp_path / "run"
    argv = ["eval", prompts, "--model", model_folder, "--clip", clip_folder, "--reference", reference,
            "--modes", "off: cfg=1; cfg: cfg=4; cfg+tpg: cfg=4,tpg=2", "--out", out, *FAST]  # fmt: skip
    assert run_cli(*argv) == 0
    data = json.loads((out / "results.json").read_text())["modes"]
    assert set(data["cfg+tpg"]) == {"clip_score", "kid", "diversity"}
    assert data["cfg+tpg"]["clip_score"]["n"] == 3 and data["off"]["kid"]["comparison"] is not None


# Bad input: one line, status 2, nothing made, no model loaded


BAD = [
    (["--modes", "cfg: cfg=4,cgf=2"], "--modes: mode 'cfg': unknown key 'cgf'; valid: steps, size"),
    (["--modes", "cfg: cfg=much"], "--modes: mode 'cfg': cfg: expected a finite number >= 0, got 'much'"),
    (["--modes", "cfg: sampler=nope"], "--modes: mode 'cfg': sampler: unknown sampler 'nope'"),
    (["--modes", "cfg=4"], "--modes: 'cfg=4' is not NAME: KEY=VALUE"),
    (["--modes", "none: cfg=1; cfg+tpg: tpg=3"], "--baseline cfg: not one of the modes (none, cfg+tpg)"),
    (["--seeds", "0"], "argument --seeds: expected a whole number >= 1, got '0'"),
    (["--clip", "{tmp}"], "--clip {tmp} is not a CLIP model folder"),
    (["--reference", "{tmp}"], "--reference {tmp} holds no .png or .jpg images"),
    (["--model", "{model}"], "--embedded-prompts: the grammar is the embedded model's"),
    (["--embedded-prompts", "6000"], "--embedded-prompts 6000: the grammar has 5040 distinct prompts"),
]


@pytest.mark.parametrize("extra, message", BAD, ids=[" ".join(extra) for extra, _ in BAD])
def test_bad_input_is_one_line_status_2_before_loading(model_folder, tmp_path, loads, capsys, extra, message):
    (tmp_path / "notes.txt").write_text("no image here")
    fill = {"tmp": tmp_path, "model": model_folder}
    extra = [part.format(**fill) for part in extra]
    assert run_cli("eval", "--embedded-prompts", 3, "--out", tmp_path / "out", *extra) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("dualguide: error: ") and "Traceback" not in err, err
    assert message.format(**fill) in err
    assert loads == [] and not (tmp_path / "out").exists()
