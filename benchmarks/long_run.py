"""Does a long ``dualguide batch`` stay flat? Memory (RSS) and seconds per image over a run of many images.

    python benchmarks/long_run.py [--images 300] [--size 32] [--steps 1]

Runs the real command (a subprocess, OMP_NUM_THREADS=1) on the embedded model with CFG + TPG + NAG on, so that
every per-call state (hooks, permutations, NAG's K/V, the denoiser's caches) is exercised at every image, one
image per pipeline call. While it runs, the process's RSS is sampled with the number of manifest lines at that
moment; the per-image seconds are the manifest's (pipeline call plus PNG). Prints the RSS at image 50 and at the
end, the growth between them in %, and the mean seconds per image over the first and the last 50 images; the
figures replace the section "Long run (memory and time per image)" of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import List, Tuple

from common import write_sections

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTION = "## Long run (memory and time per image)"
WINDOW = 50


def rss_mib(pid: int) -> float:
    """Resident set size of process ``pid`` in MiB (psutil if installed, else /proc)."""
    try:
        import psutil
    except ImportError:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        return kib / 1024
    return psutil.Process(pid).memory_info().rss / 2**20


def manifest_lines(path: str) -> int:
    try:
        with open(path, encoding="utf-8") as f:
            return sum(1 for line in f if line.endswith("\n"))
    except FileNotFoundError:
        return 0


def run(images: int, size: int, steps: int, work: str) -> Tuple[List[Tuple[int, float]], List[float]]:
    """``([(images done, RSS MiB)], seconds of each image in order)`` of one ``batch`` run."""
    prompts = os.path.join(work, "prompts.txt")
    with open(prompts, "w", encoding="utf-8") as f:
        f.write("\n".join(f"a red circle number {k}" for k in range(images)) + "\n")
    out = os.path.join(work, "out")
    command = [sys.executable, "-m", "dualguide", "batch", prompts, "--out", out, "--size", str(size), "--steps", str(steps),
               "--cfg", "5", "--tpg", "3", "--nag", "3", "--nag-negative", "blue", "--batch-size", "1", "--device", "cpu"]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=REPO)
    manifest = os.path.join(out, "manifest.jsonl")
    samples: List[Tuple[int, float]] = []
    with open(os.path.join(work, "log.txt"), "w", encoding="utf-8") as log:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        while process.poll() is None:
            done = manifest_lines(manifest)
            try:
                rss = rss_mib(process.pid)
            except Exception:  # noqa: BLE001 - the process ended between poll and read (psutil's or /proc's error)
                rss = 0.0
            if rss > 0:  # an ended process (a zombie) reads 0
                samples.append((done, rss))
            time.sleep(0.2)
    if process.returncode != 0:
        with open(os.path.join(work, "log.txt"), encoding="utf-8") as f:
            raise RuntimeError(f"{' '.join(command)} failed ({process.returncode}): {f.read()[-2000:]}")
    with open(manifest, encoding="utf-8") as f:
        entries = [json.loads(line) for line in f]
    if len(entries) != images:
        raise RuntimeError(f"the manifest has {len(entries)} lines for {images} images")
    return samples, [float(entry["seconds"]) for entry in entries]


def rss_at(samples: List[Tuple[int, float]], done: int) -> float:
    """The RSS of the last sample taken with ``done`` or fewer images written and at least ``done`` - 1."""
    near = [rss for count, rss in samples if done - 1 <= count <= done]
    if not near:
        raise RuntimeError(f"no RSS sample near image {done}: make the run longer or the images slower")
    return near[-1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--size", type=int, default=32, help="pixels per side (the embedded model's smallest)")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md"))
    args = parser.parse_args()
    if args.images < 2 * WINDOW:
        parser.error(f"--images: at least {2 * WINDOW} (a first and a last {WINDOW})")
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="long_run_") as work:
        started = time.perf_counter()
        samples, seconds = run(args.images, args.size, args.steps, work)
        wall = time.perf_counter() - started
    at_window, at_end = rss_at(samples, WINDOW), rss_at(samples, args.images)
    growth = 100 * (at_end - at_window) / at_window
    first, last = statistics.mean(seconds[:WINDOW]), statistics.mean(seconds[-WINDOW:])
    peak = max(rss for _, rss in samples)
    load = f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after"
    lines = [SECTION, "",
             f"`dualguide batch` of {args.images} prompts on the embedded model, {args.size}x{args.size} px, {args.steps} Euler step(s),",
             "CFG 5 + TPG 3 + NAG 3 (negative \"blue\"), one image per call, float32 on the CPU, OMP_NUM_THREADS=1, one process.",
             f"RSS sampled every 0.2 s with the manifest's line count; seconds per image from the manifest. Whole run {wall:.0f} s.", "",
             "| figure | value |", "|---|---|",
             f"| RSS at image {WINDOW} | {at_window:.1f} MiB |", f"| RSS at image {args.images} (end) | {at_end:.1f} MiB |",
             f"| growth between them | {growth:+.2f} % (target <= 5 %) |", f"| peak RSS | {peak:.1f} MiB |",
             f"| s/image, first {WINDOW} | {first:.3f} |", f"| s/image, last {WINDOW} | {last:.3f} ({last / first:.2f}x the first) |", "",
             f"Measured {time.strftime('%Y-%m-%d')}, once, on a VM shared with other work ({load}): the seconds are rough",
             "and move with the load; the memory figures do not depend on it.", ""]  # fmt: skip
    section = "\n".join(lines)
    print(section)
    write_sections(args.out, [section])
    print(f"wrote the section {SECTION!r} of {args.out}")
    return 0 if growth <= 5.0 else 1


if __name__ == "__main__":
    sys.exit(main())
