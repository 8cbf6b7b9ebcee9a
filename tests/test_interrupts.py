"""A real SIGINT / SIGTERM to a real ``dualguide`` process on the embedded model: only whole PNGs and a parseable
manifest are left, the exit is one line with status 130 / 143, and rerunning ``batch`` finishes the job with the
images of a clean run."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
from PIL import Image

TINY = ["--steps", "4", "--size", "32", "--seed", "3"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def start(*argv) -> subprocess.Popen:
    command = [sys.executable, "-m", "dualguide", *map(str, argv)]
    return subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def pngs(folder) -> list:
    return sorted(name for name in os.listdir(folder) if name.endswith(".png") and not name.startswith("."))


def interrupt_after_first_png(process: subprocess.Popen, folder, signum: int, timeout: float = 240.0):
    """Send ``signum`` once ``folder`` holds a PNG; ``(status, stdout, stderr)``."""
    deadline = time.monotonic() + timeout
    while not (os.path.isdir(folder) and pngs(folder)):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "no PNG in time"
        time.sleep(0.02)
    process.send_signal(signum)
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


def only_whole_files(folder) -> list:
    """The folder's PNGs, after checking that each opens whole and nothing temporary or locked is left."""
    leftovers = [name for name in os.listdir(folder) if name.endswith(".partial") or name == ".dualguide.lock"]
    assert leftovers == []
    names = pngs(folder)
    for name in names:
        with Image.open(os.path.join(folder, name)) as image:
            image.load()  # a truncated PNG raises here
    return names


def pixels(folder) -> dict:
    return {name: np.asarray(Image.open(os.path.join(folder, name))) for name in pngs(folder)}


def test_sigterm_during_batch_leaves_whole_files_and_a_rerun_makes_the_clean_images(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\na green triangle\n")
    job = ["batch", prompts, "--n", "4", *TINY]
    clean = start(*job, "--out", tmp_path / "clean")  # alongside: another folder, another lock
    out = tmp_path / "out"
    status, _, err = interrupt_after_first_png(start(*job, "--out", out), out, signal.SIGTERM)
    assert clean.wait(timeout=240) == 0, clean.communicate()
    assert (status, err) == (143, "dualguide: terminated\n")
    made = only_whole_files(out)
    assert 1 <= len(made) < 12
    with open(out / "manifest.jsonl") as f:
        entries = [json.loads(line) for line in f]  # every line whole
    assert {entry["file"] for entry in entries} <= set(made)
    rerun = subprocess.run([sys.executable, "-m", "dualguide", *map(str, job), "--out", out], env=ENV, capture_output=True, text=True)
    assert rerun.returncode == 0 and rerun.stderr == "", rerun.stderr
    assert "already there" in rerun.stdout and "(0 already" not in rerun.stdout
    assert only_whole_files(out) == pngs(tmp_path / "clean") and len(made) < 12
    resumed, reference = pixels(out), pixels(tmp_path / "clean")
    assert all(np.array_equal(resumed[name], reference[name]) for name in reference)


def test_sigint_during_generate_leaves_whole_pngs_and_one_line(tmp_path):
    out = tmp_path / "out"
    process = start("generate", "a red circle", "a blue square", "a green triangle", "a red square", *TINY, "--out", out)
    assert interrupt_after_first_png(process, out, signal.SIGINT)[::2] == (130, "dualguide: interrupted\n")
    assert 1 <= len(only_whole_files(out)) < 4
