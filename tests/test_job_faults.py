"""``dualguide batch`` under faults: a second job on the same ``--out``, a manifest line torn by a crash, a full disk.

The pipeline is test_jobs' FakePipe (no model), so each run takes well under a second.
"""

import errno
import json
import os
import signal
import subprocess
import sys

import pytest
from PIL import Image

from dualguide.jobs import lock, read_lines
from test_jobs import REPO, FakePipe, finished, manifest_entries, run_cli, torchrun

PROMPTS = ["a cat", "a dog", "a cow", "a fox"]
IDS = ["00001_000", "00002_000", "00003_000", "00004_000"]


@pytest.fixture
def job(tmp_path, monkeypatch):
    """``(run, pipe, out)``: ``run(*extra)`` runs the job of four prompts into ``out`` with a FakePipe."""
    from dualguide.generation import models

    model = tmp_path / "model"
    model.mkdir()
    (model / "model_index.json").write_text('{"_class_name": "StableDiffusionXLPipeline"}')  # an SDXL folder to the checks
    prompts, out = tmp_path / "p.txt", tmp_path / "out"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    pipe = FakePipe()
    monkeypatch.setattr(models, "load_model", lambda *args, **kwargs: pipe)
    return (lambda *extra: run_cli("batch", prompts, "--model", model, "--out", out, *extra)), pipe, out


def strict_lines(path):
    """Every line of ``path`` as JSON, read as any JSON-lines reader would (no skipping of broken lines)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    assert text.endswith("\n"), "the last line is torn"
    return [json.loads(line) for line in text.splitlines()]


def folder_is_clean(out, ids):
    """Exactly the PNGs of ``ids`` (each in one whole manifest line), the manifest, no temporary files."""
    entries = strict_lines(out / "manifest.jsonl")
    assert sorted(entry["id"] for entry in entries) == sorted(ids)
    assert sorted(os.listdir(out)) == sorted([entry["file"] for entry in entries] + ["manifest.jsonl"])
    for entry in entries:
        with Image.open(out / entry["file"]) as image:
            image.load()


def one_error_line(err):
    assert err.count("\n") == 1 and err.startswith("dualguide: error: ") and "Traceback" not in err, err
    return err


# --- two jobs on one --out ---------------------------------------------------------------------------------------

HOLD = """
import sys, time
from types import SimpleNamespace
from dualguide.jobs.lock import job_lock
with job_lock(sys.argv[1], SimpleNamespace(is_main_process=True, num_processes=1)):
    print("holding", flush=True)
    time.sleep(300)
"""


@pytest.fixture
def other_job(job):
    """Another job's main process holding the lock of ``out`` (a real process, killed by the test)."""
    out = job[2]
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "holding\n"
    yield holder
    holder.kill()
    holder.wait()


def test_a_second_job_is_refused_and_a_killed_job_leaves_no_lock(job, other_job, capsys):
    run, pipe, out = job
    assert run() == 2
    err = one_error_line(capsys.readouterr().err)
    assert f"--out {out}: another dualguide job is writing there" in err
    assert pipe.calls == [] and not (out / "manifest.jsonl").exists()
    os.kill(other_job.pid, signal.SIGKILL)  # the other job crashes: its lock file stays, its lock goes
    other_job.wait()
    assert os.listdir(out) == [lock.LOCK]
    assert run() == 0
    folder_is_clean(out, IDS)  # the lock file went with the job


def test_a_second_job_under_torchrun_is_refused_by_every_process(job, other_job):
    """The main process finds the lock taken; the other one learns it from the main one instead of hanging."""
    _, _, out = job
    model = out.parent / "model"
    code, _, err = finished(torchrun("batch", out.parent / "p.txt", "--model", model, "--out", out), timeout=120)
    assert code != 0 and err.count("another dualguide job is writing there") == 2, err[-3000:]
    assert os.listdir(out) == [lock.LOCK]


# --- a torn manifest ---------------------------------------------------------------------------------------------


def test_a_torn_last_line_is_cut_and_its_image_made_again(job, capsys):
    run, pipe, out = job
    assert run() == 0
    manifest = out / "manifest.jsonl"
    data = manifest.read_bytes()
    last = data.rindex(b"\n", 0, len(data) - 1) + 1
    manifest.write_bytes(data[: last + 20])  # a crash in the middle of the last line (00004_000)
    with open(out / "failures.jsonl", "wb") as f:
        f.write(b'{"id": "00009_000", "err')  # and of a failure line
    capsys.readouterr()
    pipe.calls.clear()
    assert run() == 0
    assert "(1 made now, 3 already there)" in capsys.readouterr().out and pipe.calls == [["a fox"]]
    assert (out / "failures.jsonl").read_bytes() == b""
    (out / "failures.jsonl").unlink()
    folder_is_clean(out, IDS)


# --- a full disk -------------------------------------------------------------------------------------------------


def png_write_fails(monkeypatch, number, code):
    """From the ``number``-th PNG on, writing it fails with ``code`` after some bytes are written (as a full disk)."""
    saves = []
    save = Image.Image.save

    def failing(image, fp, *args, **kwargs):
        saves.append(fp)
        if len(saves) < number:
            return save(image, fp, *args, **kwargs)
        with open(fp, "wb") as f:
            f.write(b"\x89PNG\r\n\x1a\n half")
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(Image.Image, "save", failing)


def manifest_write_fails(monkeypatch, image_id):
    """Appending ``image_id``'s manifest line writes half of it, then fails as a full disk."""
    write = os.write

    def failing(descriptor, data):
        if bytes(data).startswith(b'{"id": "%s"' % image_id.encode()):
            write(descriptor, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return write(descriptor, data)

    monkeypatch.setattr(os, "write", failing)


@pytest.mark.parametrize("where", ["png", "manifest"])
def test_a_full_disk_stops_the_job_in_one_line_and_a_rerun_finishes_it(job, capsys, monkeypatch, where):
    run, pipe, out = job
    with monkeypatch.context() as patch:
        if where == "png":
            png_write_fails(patch, 3, errno.ENOSPC)
        else:
            manifest_write_fails(patch, IDS[2])
        assert run() == 1
    err = one_error_line(capsys.readouterr().err)
    assert f"--out {out}: no space left on the device (" in err and "MiB free); free some space and rerun" in err
    assert pipe.calls == [["a cat"], ["a dog"], ["a cow"]]  # stopped at once: the fox was not made
    assert sorted(manifest_entries(out)) == IDS[:2] and not (out / "failures.jsonl").exists()
    files = sorted(os.listdir(out))
    assert not [name for name in files if name.endswith(".partial")], files
    assert (IDS[2] in " ".join(files)) == (where == "manifest")  # a PNG only when it was whole
    pipe.calls.clear()
    assert run() == 0
    assert "(2 made now, 2 already there)" in capsys.readouterr().out and pipe.calls == [["a cow"], ["a fox"]]
    folder_is_clean(out, IDS)


def test_other_write_errors_are_recorded_and_the_job_goes_on(job, capsys, monkeypatch):
    run, pipe, out = job
    png_write_fails(monkeypatch, 3, errno.EIO)
    assert run() == 1
    assert "2 image(s) failed; see" in one_error_line(capsys.readouterr().err)
    assert len(pipe.calls) == 4 and sorted(manifest_entries(out)) == IDS[:2]
    assert [entry["id"] for entry in read_lines(str(out / "failures.jsonl"))[0]] == IDS[2:]
