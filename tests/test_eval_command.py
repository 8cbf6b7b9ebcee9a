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
    Measured, Prompt, Unit, compare, default_modes, mode_settings, parse_modes, plan_lines, plan_order, plan_units,
)  # fmt: skip
from dualguide.evaluation.statistics import paired_comparison
from dualguide.toy.data import evaluation_prompts, negative_prompts
from dualguide.toy.model import EMBEDDED_DIR

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


def eval_args(*extra):
    return cli.build_parser().parse_args(["eval", "--negative-prompts", "3", "--out", "unused", *extra])


def test_default_modes_take_the_models_nag_scale():
    assert "nag=2.5," in default_modes(True, {"nag_scale": 2.5, "do_nag": False})  # the tuned scale, NAG off by default
    assert "nag=3;" in default_modes(False, {"guidance_scale": 5.0})  # none recommended: SDXL's 3


def test_modes_route_the_negative_to_cfg_and_nag_separately():
    modes = parse_modes(default_modes(True, {}) + "; nag-only: cfg=4,nag=3,negative-for=nag; plain: cfg=4,nag=3", "cfg")
    assert modes["cfg"] == {"cfg": "4", "negative_for": "cfg"} and modes["nag"]["negative_for"] == "nag"
    settings = mode_settings(eval_args(), modes)
    unit = Unit("a circle on a blue background", "a red shape", 0, 2)
    lines = {mode: plan_lines([(mode, 0)], [unit], settings)[0] for mode in settings}
    negative = "a red shape"
    assert "negative" not in lines["none"] and "nag_negative" not in lines["none"]
    assert lines["cfg"]["negative"] == negative and lines["cfg"]["nag_negative"] == ""  # NAG does not fall back on it
    assert lines["nag"]["negative"] == negative and lines["nag"]["cfg"] == "1"  # CFG off: NAG's fallback, one call
    assert "nag_negative" not in lines["nag"]
    assert lines["nag-only"]["nag_negative"] == negative and "negative" not in lines["nag-only"]  # CFG keeps its own
    assert lines["cfg+nag"]["negative"] == negative and "nag_negative" not in lines["cfg+nag"]
    assert lines["cfg+tpg+nag"]["negative"] == negative and lines["cfg+tpg+nag"]["tpg"] == "4"
    assert lines["plain"]["negative"] == negative and "nag_negative" not in lines["plain"]  # as before negative-for
    assert all("negative_for" not in line for line in lines.values())
    both = mode_settings(eval_args("--nag-negative", "a shape"), modes)  # NAG's own negative set for the command
    assert plan_lines([("cfg+nag", 0)], [unit], both)[0]["nag_negative"] == negative
    assert plan_lines([("nag", 0)], [unit], both)[0]["nag_negative"] == negative
    assert plan_lines([("cfg", 0)], [unit], both)[0].get("nag_negative") is None  # the command's stays


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


def test_negative_prompts_run_reports_the_negated_values(tmp_path):
    out = tmp_path / "run"
    modes = "none: cfg=1,negative-for=none; nag: nag=3,negative-for=nag"
    assert run_cli("eval", "--negative-prompts", 6, "--modes", modes, "--baseline", "none", "--out", out, *FAST) == 0
    lines = [json.loads(line) for line in (out / "plan.jsonl").read_text().splitlines()]
    pairs = negative_prompts(6)
    assert [(line["prompt"], line.get("negative")) for line in lines] == (
        [(prompt, None) for prompt, _ in pairs[:4]] + pairs[:4] + [(prompt, None) for prompt, _ in pairs[4:]]
        + pairs[4:])  # chunks of --batch-size 8 images (4 prompts), each in every mode  # fmt: skip
    data = json.loads((out / "results.json").read_text())["modes"]
    for metric in ("negated", "negated_color", "negated_shape", "negated_background", "adherence", "kid"):
        assert data["nag"][metric]["comparison"]["verdict"] in ("better", "worse", "no difference"), metric
    assert data["nag"]["negated"]["n"] == 6 and data["nag"]["negated_color"]["n"] == 2
    assert "Negative prompts:" in (out / "results.md").read_text()


def test_toy_judge_measures_a_trained_model_folder_as_the_embedded_model(tmp_path):
    modes = "none: cfg=1,negative-for=none; nag: nag=3,negative-for=nag"
    common = ["--negative-prompts", 4, "--modes", modes, "--baseline", "none", *FAST]
    assert run_cli("eval", *common, "--out", tmp_path / "embedded") == 0
    assert run_cli("eval", *common, "--model", EMBEDDED_DIR, "--toy-judge", "--out", tmp_path / "folder") == 0
    embedded, folder = (json.loads((tmp_path / run / "results.json").read_text())["modes"] for run in ("embedded", "folder"))
    assert folder == embedded and "negated" in folder["nag"]  # the same images, judged the same way


# Any checkpoint: CLIP score and KID against a reference folder


def test_model_with_clip_and_reference(model_folder, clip_folder, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    lines = [{"prompt": "a red circle", "negative": "blue"}, {"prompt": "a blue square", "negative": "a circle"},
             {"prompt": "a green star"}]  # fmt: skip
    prompts.write_text("".join(json.dumps(line) + "\n" for line in lines))
    reference = tmp_path / "reference"
    reference.mkdir()
    for number in range(4):
        Image.new("RGB", (40, 40), (60 * number, 90, 200)).save(reference / f"{number}.png")
    out = tmp_path / "run"
    argv = ["eval", prompts, "--model", model_folder, "--clip", clip_folder, "--reference", reference,
            "--modes", "off: cfg=1; cfg: cfg=4; cfg+tpg: cfg=4,tpg=2", "--out", out, *FAST]  # fmt: skip
    assert run_cli(*argv) == 0
    data = json.loads((out / "results.json").read_text())["modes"]
    assert set(data["cfg+tpg"]) == {"clip_score", "negative_clip_score", "kid", "diversity"}
    assert data["cfg+tpg"]["clip_score"]["n"] == 3 and data["off"]["kid"]["comparison"] is not None
    assert data["cfg+tpg"]["negative_clip_score"]["n"] == 2  # the lines with a negative


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
    (["--toy-judge"], "--toy-judge goes with --model"),
    (["--embedded-prompts", "6000"], "--embedded-prompts 6000: the grammar has 5040 distinct prompts"),
    (["--negative-prompts", "4"], "give one of PROMPTS (a .txt/.jsonl file), --embedded-prompts N or --negative-prompts N"),
    (["--modes", "cfg: cfg=4,negative-for=both"], "--modes: mode 'cfg': negative-for: expected one of cfg, nag, cfg+nag"),
    (["--modes", "cfg: nag=3,negative-for=nag,nag-negative=a red shape"], "give NAG's negative by negative-for or nag-negative"),
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


@pytest.mark.parametrize(
    "line, message",
    [({"prompt": "a red circle", "negative": "blurry"}, "prompts.jsonl:1: the embedded model's judge needs its grammar: "
      "negative prompt 'blurry' must name one colour, shape or background"),
     ({"prompt": "a red blob", "negative": "red"}, "prompts.jsonl:1: the embedded model's judge needs its grammar")],
)  # fmt: skip
def test_embedded_prompt_files_need_negatives_the_judge_reads(tmp_path, loads, capsys, line, message):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps(line) + "\n" + json.dumps({"prompt": "a star", "negative": "a red shape"}) + "\n")
    assert run_cli("eval", prompts, "--out", tmp_path / "out") == 2
    assert message in capsys.readouterr().err and loads == []
    assert run_cli("eval", "--negative-prompts", 3, "--model", tmp_path, "--out", tmp_path / "out") == 2
    assert "--negative-prompts: the grammar is the embedded model's" in capsys.readouterr().err
