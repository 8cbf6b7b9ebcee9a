"""Every example runs on the tiny model (few steps, small size) and writes what it says."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "examples").glob("*.py"))


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda path: path.name)
def test_example_runs_on_the_tiny_model(example, tmp_path):
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(example.parent.parent)}
    result = subprocess.run(
        [sys.executable, str(example), "--steps", "2", "--size", "32"],
        cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    written = [name for name in os.listdir(tmp_path) if name.endswith(".png")]
    finite = "finite" in result.stdout and "NOT finite" not in result.stdout and "finite: False" not in result.stdout
    assert written or finite, result.stdout
