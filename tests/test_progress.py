"""``compare`` on the embedded model (``generate`` goes the same way): one bar over all images x steps on a terminal, naming the
image and mode under way; nothing but the result line when stderr is a pipe (no per-call diffusers bars either)."""

import fcntl
import os
import re
import struct
import subprocess
import sys
import termios

from dualguide import cli

TINY = ["--steps", "2", "--size", "32"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def run_on_a_terminal(*argv) -> tuple:
    """``(status, stdout, what the terminal on stderr showed)``."""
    controller, terminal = os.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 160, 0, 0))  # 160 columns: the whole bar
    process = subprocess.Popen([sys.executable, "-m", "dualguide", *map(str, argv)], env=ENV, stdout=subprocess.PIPE, stderr=terminal)
    os.close(terminal)
    shown = b""
    while True:
        try:
            chunk = os.read(controller, 4096)
        except OSError:  # the process closed its end
            break
        if not chunk:
            break
        shown += chunk
    os.close(controller)
    out = process.stdout.read().decode()
    return process.wait(timeout=60), out, shown.decode(errors="replace")


def test_compare_shows_one_bar_over_every_panel_and_step_on_a_terminal(tmp_path):
    status, out, shown = run_on_a_terminal("compare", "a red circle", "a blue square", *TINY, "--out", tmp_path)
    assert status == 0 and out.startswith("wrote the comparison grid"), shown
    totals = set(re.findall(r"\| *\d+/(\d+) ", shown))
    assert totals == {"20"}  # 2 prompts x 5 panels x 2 steps in one bar, no per-call bar of 2 steps
    assert "| 20/20 " in shown and "CFG+TPG+NAG: a blue square" in shown and "no guidance: a red circle" in shown


def test_compare_prints_only_its_result_line_on_a_pipe(tmp_path, capsys):
    """(``generate`` on a pipe: test_interrupts' SIGINT test finds its stderr to be exactly the one line.)"""
    assert cli.main(["compare", "a red circle", *TINY, "--out", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out.startswith("wrote the comparison grid ") and captured.out.count("\n") == 1


EVAL = ["--embedded-prompts", "2", "--seeds", "1", "--modes", "none: cfg=1; cfg: cfg=4", "--batch-size", "1", *TINY]


def test_eval_shows_one_bar_over_every_image_and_step_on_a_terminal(tmp_path):
    status, out, shown = run_on_a_terminal("eval", *EVAL, "--out", tmp_path / "run")
    assert status == 0 and "wrote " in out, shown
    totals = set(re.findall(r"\| *\d+/(\d+) ", shown))
    assert totals == {"8"}, shown  # 2 prompts x 1 seed x 2 modes x 2 steps in one bar, not a bar of images
    assert "| 8/8 " in shown and "| 1/8 " in shown and "cfg: " in shown and "none: " in shown


def test_eval_prints_only_its_result_lines_on_a_pipe(tmp_path, capsys):
    assert cli.main(["eval", *EVAL, "--out", str(tmp_path / "run")]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out.rstrip("\n").splitlines()[-1].startswith("wrote ")
