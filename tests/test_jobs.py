"""``dualguide batch``: prompt files, ids and seeds, batching, several processes, resume, failures.

The tiny model from conftest saved to a temp folder: 32 px, 2 steps, 6 images in the shared job.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from dualguide import cli
from dualguide.generation import images as image_files
from dualguide.generation import models
from dualguide.jobs.batch import plan_batch
from dualguide.jobs import append_line, image_calls, read_lines
from dualguide.jobs.progress import JobProgress

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Six images: lines 1 and 2 share their settings (one call of four at --batch-size 4, two prompts in it);
# line 3 has its own seed, a negative prompt and NAG (a call of its own).
JOB = [
    {"prompt": "a red circle", "n": 2},
    {"prompt": "a blue square", "n": 2},
    {"prompt": "a green cat", "seed": 50, "n": 2, "nag": 3, "negative": "blurry"},
]
JOB_IDS = ["00001_000", "00001_001", "00002_000", "00002_001", "00004_000", "00004_001"]  # line 3 is blank
JOB_SEEDS = [10, 11, 12, 13, 50, 51]
pytestmark = pytest.mark.usefixtures("one_thread")  # as the torchrun workers (OMP_NUM_THREADS=1)


@pytest.fixture(scope="module")
def job_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "job.jsonl"
    lines = [json.dumps(JOB[0]), json.dumps(JOB[1]), "", json.dumps(JOB[2])]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def run_cli(*argv):
    return cli.main([str(a) for a in argv])


def batch_argv(job_file, model_folder, out, *extra):
    return ["batch", job_file, "--model", model_folder, "--out", out, "--seed", 10, *extra]


@pytest.fixture(scope="module")
def reference(job_file, model_folder, tmp_path_factory):
    """The job made by one process, one image per call: the folder every other way of running must equal."""
    out = tmp_path_factory.mktemp("reference")
    assert run_cli(*batch_argv(job_file, model_folder, out)) == 0
    return out


def manifest_entries(out):
    """The manifest's entries by id, without ``seconds``; every id exactly once."""
    entries, _ = read_lines(os.path.join(out, "manifest.jsonl"))
    by_id = {entry["id"]: {k: v for k, v in entry.items() if k != "seconds"} for entry in entries}
    assert len(by_id) == len(entries), "an image has several manifest lines"
    return by_id


def pixels(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).astype(int)


def assert_same_job(out, reference):
    """Same files (no temporaries, no failures), same manifest entries, PNGs within 1/255."""
    names = sorted(os.listdir(out))
    assert names == sorted(os.listdir(reference)), names
    assert manifest_entries(out) == manifest_entries(reference)
    for name in names:
        if name.endswith(".png"):
            difference = np.abs(pixels(os.path.join(out, name)) - pixels(os.path.join(reference, name)))
            assert difference.max() <= 1, f"{name}: {(difference > 1).sum()} values differ, by up to {difference.max()}"


def torchrun(*argv, processes=2):
    """``torchrun --nproc_per_node N -m dualguide ...`` on CPUs (gloo), started; ``(Popen, argv)``."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes), "-m", "dualguide"]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=REPO)
    return subprocess.Popen(command + [str(a) for a in argv], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finished(process, timeout=400):
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    return process.returncode, out, err


# --- the prompt file and the plan (no model) -------------------------------------------------------------------


@pytest.fixture
def fake_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fake_model")
    (folder / "model_index.json").write_text('{"_class_name": "StableDiffusionXLPipeline"}')  # an SDXL folder to the checks
    return str(folder)



def plan(path, model, *extra):
    args = cli.build_parser().parse_args(["batch", str(path), "--model", model, "--out", str(os.path.dirname(path)), *extra])
    return plan_batch(args)[0]


def test_txt_ids_seeds_and_names(tmp_path, fake_model):
    path = tmp_path / "p.txt"
    path.write_bytes("\ufeffa red circle\r\n\n  a blue square  \n\n".encode("utf-8"))
    jobs = plan(path, fake_model, "--seed", "7", "--n", "2", "--cfg", "6")
    assert [(j.id, j.prompt, j.seed) for j in jobs] == [
        ("00001_000", "a red circle", 7), ("00001_001", "a red circle", 8),
        ("00003_000", "a blue square", 9), ("00003_001", "a blue square", 10),
    ]  # fmt: skip
    assert jobs[2].file == "00003_000_s9_a_blue_square.png"
    assert all(j.settings["guidance_scale"] == 6.0 and j.negative is None for j in jobs)


def test_jsonl_lines_set_their_own_seed_n_negative_and_settings(tmp_path, fake_model):
    path = tmp_path / "p.jsonl"
    lines = [
        {"prompt": "a", "n": 2},
        {"prompt": "b", "seed": 100, "negative": "ugly", "cfg": 5, "tpg-layers": "u0-u3", "nag_tau": 2, "size": [32, 48]},
        {"prompt": "c", "tpg-interval": "0:0.5", "cfg": None},
    ]
    path.write_text("\n".join(json.dumps(line) for line in lines))
    jobs = plan(path, fake_model, "--seed", "5", "--negative", "bad", "--cfg", "3")
    assert [(j.id, j.seed, j.negative) for j in jobs] == [
        ("00001_000", 5, "bad"), ("00001_001", 6, "bad"), ("00002_000", 100, "ugly"), ("00003_000", 8, "bad"),
    ]  # fmt: skip
    a, b, c = jobs[0].settings, jobs[2].settings, jobs[3].settings
    assert a["guidance_scale"] == 3.0 and "negative_prompt" not in a
    assert (b["guidance_scale"], b["tpg_applied_layers_index"], b["nag_tau"], b["width"], b["height"]) == (5.0, "u0-u3", 2.0, 32, 48)
    assert c["tpg_interval"] == (0.0, 0.5) and c["guidance_scale"] == 3.0  # null: as on the command line


def test_calls_group_consecutive_images_of_equal_settings(tmp_path, fake_model, job_file):
    jobs = plan(job_file, fake_model, "--seed", "10")
    assert [j.id for j in jobs] == JOB_IDS and [j.seed for j in jobs] == JOB_SEEDS
    assert [[j.id for j in call] for call in image_calls(jobs, 4)] == [JOB_IDS[:4], JOB_IDS[4:]]
    assert [len(call) for call in image_calls(jobs, 3)] == [3, 1, 2]
    assert [len(call) for call in image_calls(jobs, 1)] == [1] * 6
    # One image's seed does not depend on how many images come before it in the same call or process.
    assert [j.seed for j in plan(job_file, fake_model, "--seed", "10", "--n", "5")] == JOB_SEEDS


BAD_FILES = [
    ("missing.txt", None, "missing.txt: no such file"),
    ("p.csv", b"a,b\n", "p.csv: a prompt file must end in .txt"),
    ("empty.txt", b"", "empty.txt: no prompts"),
    ("blank.jsonl", b"\n  \n", "blank.jsonl: no prompts"),
    ("latin1.txt", b"ok\ncaf\xe9\n", "latin1.txt:2: not UTF-8"),
    ("broken.jsonl", b'{"prompt": "a"}\n{"prompt": "b"\n', "broken.jsonl:2: not valid JSON"),
    ("list.jsonl", b'["a"]\n', "list.jsonl:1: expected a JSON object"),
    ("unknown.jsonl", b'{"prompt": "a"}\n\n{"prompt": "b", "cgf": 5}\n', "unknown.jsonl:3: unknown key 'cgf'; valid keys: prompt, negative, seed, n, cfg"),
    ("noprompt.jsonl", b'{"negative": "a"}\n', 'noprompt.jsonl:1: "prompt" must be a string'),
    ("seed.jsonl", b'{"prompt": "a", "seed": -1}\n', 'seed.jsonl:1: "seed" must be a whole number in 0..2**64-1'),
    ("bign.jsonl", b'{"prompt": "a", "n": 0}\n', 'bign.jsonl:1: "n" must be a whole number >= 1'),
    ("value.jsonl", b'{"prompt": "a"}\n{"prompt": "b", "cfg": "much"}\n', "value.jsonl:2: cfg: expected a finite number >= 0, got 'much'"),
    ("alpha.jsonl", b'{"prompt": "b", "nag-alpha": 2}\n', "alpha.jsonl:1: nag-alpha: expected a number in [0, 1], got '2'"),
    ("nan.jsonl", b'{"prompt": "b", "cfg": NaN}\n', "nan.jsonl:1: cfg: expected a finite number >= 0, got 'NaN'"),
    ("sampler.jsonl", b'{"prompt": "b", "sampler": "nope"}\n', "sampler.jsonl:1: sampler: unknown sampler 'nope'"),
    ("toobig.jsonl", b'{"prompt": "b", "seed": 18446744073709551615, "n": 2}\n', "toobig.jsonl:1: image 1 of this line would get seed"),
]  # fmt: skip


@pytest.mark.parametrize("name, content, message", BAD_FILES, ids=[case[0] for case in BAD_FILES])
def test_bad_prompt_file_is_one_line_status_2_before_loading(tmp_path, fake_model, loads, capsys, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    assert run_cli("batch", path, "--model", fake_model, "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("dualguide: error: ") and "Traceback" not in err, err
    assert f"dualguide: error: {tmp_path / message}" in err
    assert loads == [] and not (tmp_path / "out").exists()


def test_bad_batch_size_and_unwritable_out_are_status_2(tmp_path, fake_model, loads, capsys, monkeypatch):
    path = tmp_path / "p.txt"
    path.write_text("a\n")
    assert run_cli("batch", path, "--model", fake_model, "--out", tmp_path / "o", "--batch-size", 0) == 2
    assert "--batch-size: expected a whole number >= 1, got '0'" in capsys.readouterr().err
    assert run_cli("batch", path, "--model", fake_model) == 2
    assert "required: --out" in capsys.readouterr().err

    def denied(folder):
        raise PermissionError(13, "Permission denied", folder)

    monkeypatch.setattr(image_files, "probe_folder", denied)
    assert run_cli("batch", path, "--model", fake_model, "--out", tmp_path / "o") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--out" in err and "cannot write" in err and loads == []


# --- the manifest ------------------------------------------------------------------------------------------------


def test_manifest_lines_survive_a_killed_writer(tmp_path):
    path = str(tmp_path / "manifest.jsonl")
    append_line(path, {"id": "a", "file": "a.png"})
    with open(path, "ab") as f:
        f.write(b'{"id": "b", "fi')  # a writer killed in the middle of its line
    entries, offset = read_lines(path)
    assert [e["id"] for e in entries] == ["a"] and offset < os.path.getsize(path)
    append_line(path, {"id": "c", "file": "c.png"})  # glued to the half line; still found
    append_line(path, {"id": "d", "file": "d.png"})
    assert [e["id"] for e in read_lines(path)[0]] == ["a", "c", "d"]
    assert [e["id"] for e in read_lines(path, offset)[0]] == ["c", "d"]


def test_progress_counts_lines_appended_after_the_start(tmp_path):
    manifest, failures = str(tmp_path / "m.jsonl"), str(tmp_path / "f.jsonl")
    append_line(manifest, {"id": "old"})
    with JobProgress(manifest, failures, total=4, already=1, show=False) as progress:
        append_line(manifest, {"id": "x"})
        append_line(failures, {"id": "y", "error": "boom"})
    assert (progress.made, progress.failed) == (1, 1)


# --- the real model: batch size, processes, resume ---------------------------------------------------------------


def test_reference_run_writes_pngs_and_manifest(reference, job_file, model_folder, capsys):
    entries = manifest_entries(reference)
    assert sorted(entries) == JOB_IDS and [entries[i]["seed"] for i in JOB_IDS] == JOB_SEEDS
    cat = entries["00004_000"]
    assert cat["negative"] == "blurry" and cat["settings"]["do_nag"] is True and cat["settings"]["nag_scale"] == 3.0
    assert entries["00001_000"]["settings"]["num_inference_steps"] == 2  # recommended.json
    assert sorted(os.listdir(reference)) == sorted([e["file"] for e in entries.values()] + ["manifest.jsonl"])
    with Image.open(reference / cat["file"]) as image:
        assert image.size == (32, 32) and json.loads(image.text["parameters"])["seed"] == 50
    # The same command again makes nothing and loads no model.
    capsys.readouterr()
    assert run_cli(*batch_argv(job_file, model_folder, reference)) == 0
    assert "6 of 6 image(s)" in capsys.readouterr().out


def test_rerun_skips_finished_images_and_loads_nothing(reference, job_file, model_folder, tmp_path, capsys, loads):
    out = tmp_path / "copy"
    shutil.copytree(reference, out)
    assert run_cli(*batch_argv(job_file, model_folder, out, "--batch-size", 4)) == 0  # batch size is not a setting
    assert "6 of 6 image(s)" in capsys.readouterr().out and loads == []
    assert_same_job(out, reference)


def test_batch_size_4_equals_batch_size_1(reference, job_file, model_folder, tmp_path, capsys):
    """Needs the pipeline's per-image generators (own noise, TPG permutations and sampler noise per image)."""
    out = tmp_path / "b4"
    assert run_cli(*batch_argv(job_file, model_folder, out, "--batch-size", 4)) == 0
    assert "6 made now" in capsys.readouterr().out
    assert_same_job(out, reference)


def test_two_processes_equal_one(reference, job_file, model_folder, tmp_path):
    out = tmp_path / "two"
    code, stdout, stderr = finished(torchrun(*batch_argv(job_file, model_folder, out, "--batch-size", 2)))
    assert code == 0, stderr[-3000:]
    assert stdout.count("6 of 6 image(s)") == 1  # only the main process reports, for the whole job
    assert_same_job(out, reference)


def worker_pids(launcher_pid):
    """``{rank: pid}`` of the worker processes below a torchrun launcher."""
    children = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
        except (OSError, ValueError, IndexError):
            continue
        if b"RANK" in env and b"LOCAL_RANK" in env and parent in (launcher_pid, *children.values()):
            children[int(env[b"RANK"])] = int(entry)
    return children


def test_a_killed_process_then_a_rerun_equal_a_clean_run(reference, job_file, model_folder, tmp_path):
    out = tmp_path / "killed"
    launcher = torchrun(*batch_argv(job_file, model_folder, out))
    manifest = out / "manifest.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and launcher.poll() is None:  # rank 1 makes 00002_001 .. 00004_001
        if manifest.exists() and any(e["id"] in JOB_IDS[3:] for e in read_lines(str(manifest))[0]):
            break
        time.sleep(0.05)
    workers = worker_pids(launcher.pid)
    assert launcher.poll() is None and 1 in workers, "the job ended before a process could be killed"
    os.kill(workers[1], signal.SIGKILL)
    code, _, _ = finished(launcher)
    assert code != 0
    made = len(read_lines(str(manifest))[0])
    assert 1 <= made < 6, f"{made} images made before the kill: not mid-run"
    code, stdout, stderr = finished(torchrun(*batch_argv(job_file, model_folder, out)))
    assert code == 0, stderr[-3000:]
    assert f"({6 - made} made now, {made} already there)" in stdout
    assert_same_job(out, reference)


# --- settings changed, failures ----------------------------------------------------------------------------------


class FakePipe:
    """Stands for a loaded pipeline: one coloured image per prompt, or a failure for a prompt holding "boom"."""

    def __init__(self):
        self.calls = []

    def set_progress_bar_config(self, **kwargs):
        pass

    def __call__(self, prompt, negative_prompt=None, generator=None, num_images_per_prompt=1, **kwargs):
        assert len(prompt) == len(generator) and num_images_per_prompt == 1
        self.calls.append(list(prompt))
        if any("boom" in p for p in prompt):
            raise RuntimeError("boom\nsecond line")
        scale = int(kwargs["guidance_scale"])
        return SimpleNamespace(images=[Image.new("RGB", (8, 8), (g.initial_seed() % 256, scale, 0)) for g in generator])


@pytest.fixture
def fake(monkeypatch, fake_model):
    pipe = FakePipe()
    monkeypatch.setattr(models, "load_model", lambda *args, **kwargs: pipe)
    return pipe, fake_model


def test_changed_settings_are_an_error_unless_overwrite(fake, tmp_path, capsys, monkeypatch):
    pipe, model = fake
    path, out = tmp_path / "p.txt", tmp_path / "out"
    path.write_text("a cat\na dog\n")
    assert run_cli("batch", path, "--model", model, "--out", out, "--cfg", 4) == 0
    first = sorted(os.listdir(out))
    pipe.calls.clear()
    assert run_cli("batch", path, "--model", model, "--out", out, "--cfg", 5) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "2 image(s) of this job were made there before from other settings" in err
    assert "guidance_scale differ" in err and "--overwrite" in err and pipe.calls == []
    assert run_cli("batch", path, "--model", model, "--out", out, "--seed", 3, "--cfg", 4) == 2  # another seed: also a change
    assert "seed differ" in capsys.readouterr().err and sorted(os.listdir(out)) == first
    assert run_cli("batch", path, "--model", model, "--out", out, "--seed", 3, "--cfg", 5, "--overwrite") == 0
    entries = manifest_entries(out)
    assert [(e["seed"], e["settings"]["guidance_scale"]) for e in entries.values()] == [(3, 5.0), (4, 5.0)]
    assert sorted(os.listdir(out)) == sorted([e["file"] for e in entries.values()] + ["manifest.jsonl"])  # old PNGs gone
    assert pixels(out / entries["00001_000"]["file"])[0, 0].tolist() == [3, 5, 0]


def test_a_failing_image_is_recorded_and_the_job_goes_on(fake, tmp_path, capsys):
    pipe, model = fake
    path, out = tmp_path / "p.txt", tmp_path / "out"
    path.write_text("a cat\nboom\na dog\n")
    assert run_cli("batch", path, "--model", model, "--out", out, "--batch-size", 3) == 1
    captured = capsys.readouterr()
    assert "2 of 3 image(s)" in captured.out
    assert captured.err.count("\n") == 1 and "1 image(s) failed; see" in captured.err
    assert pipe.calls == [["a cat", "boom", "a dog"], ["a cat"], ["boom"], ["a dog"]]  # the call, then one by one
    (failure,) = read_lines(str(out / "failures.jsonl"))[0]
    assert (failure["id"], failure["seed"], failure["error"]) == ("00002_000", 1, "RuntimeError: boom")
    assert sorted(manifest_entries(out)) == ["00001_000", "00003_000"]
    path.write_text("a cat\nno longer failing\na dog\n")  # a rerun (here with the line fixed) makes what is missing
    assert run_cli("batch", path, "--model", model, "--out", out, "--batch-size", 3) == 0
    assert sorted(manifest_entries(out)) == ["00001_000", "00002_000", "00003_000"]


def test_a_pipeline_error_on_one_line_is_recorded(model_folder, tmp_path, capsys):
    """The real pipeline refusing one line's settings (a layer id the UNet lacks): recorded, the rest made."""
    path, out = tmp_path / "p.jsonl", tmp_path / "out"
    path.write_text('{"prompt": "a cat"}\n{"prompt": "a dog", "tpg-layers": "d99"}\n')
    assert run_cli("batch", path, "--model", model_folder, "--out", out) == 1
    assert "1 image(s) failed" in capsys.readouterr().err
    (failure,) = read_lines(str(out / "failures.jsonl"))[0]
    assert failure["id"] == "00002_000" and "d99" in failure["error"]
    assert sorted(manifest_entries(out)) == ["00001_000"]


def test_python_m_dualguide_runs_the_command():
    result = subprocess.run([sys.executable, "-m", "dualguide", "batch", "--help"], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0 and "--batch-size" in result.stdout and "PROMPTS" in result.stdout
