"""Images per second of ``dualguide batch`` on the tiny SDXL-layout model: 1 process at --batch-size 1 and 4,
``--compile``, and 2 processes under torchrun.

    python benchmarks/bench_batch.py [--images 12] [--size 64] [--steps 4] [--threads 1]

Each configuration runs the real command once, in a fresh folder, for ``--images`` prompts. "wall" is
images / seconds of the whole command (start-up, model loading and writing included); "loaded" is
images / the busiest process's generating time, summed from the manifest's ``seconds`` (its share of its
pipeline calls plus writing its PNG), i.e. the rate a long job reaches once the model is loaded. Every process gets ``--threads`` torch threads (default 1: one process per core, as
one process per GPU; on a busy shared VM two threads in one process ran 5-10x slower than one). The table
replaces the section "Batch job (images/s)" of benchmarks/RESULTS.md (the rest of the file is kept).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Tuple

from common import write_sections

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTION = "## Batch job (images/s)"


CONFIGURATIONS: List[Tuple[str, int, List[str]]] = [  # (label, processes, extra flags)
    ("1 process, --batch-size 1", 1, ["--batch-size", "1"]),
    ("1 process, --batch-size 4", 1, ["--batch-size", "4"]),
    ("1 process, --batch-size 4, --compile", 1, ["--batch-size", "4", "--compile"]),
    ("2 processes (torchrun, gloo), --batch-size 4", 2, ["--batch-size", "4"]),
]


def run_job(model: str, prompts: int, processes: int, flags: List[str], args, work: str) -> Tuple[float, float]:
    """``(seconds of the whole command, busiest process's generating seconds)`` making ``prompts`` images."""
    folder = tempfile.mkdtemp(dir=work)
    prompt_file = os.path.join(folder, "prompts.txt")
    with open(prompt_file, "w", encoding="utf-8") as f:
        f.write("\n".join(f"a red circle number {k}" for k in range(prompts)) + "\n")
    command = ["batch", prompt_file, "--model", model, "--out", os.path.join(folder, "out"),
               "--size", str(args.size), "--steps", str(args.steps), *flags]  # fmt: skip
    launcher = [sys.executable, "-m", "dualguide"]
    if processes > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes), "-m", "dualguide"]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1", PYTHONPATH=REPO)
    started = time.perf_counter()
    result = subprocess.run(launcher + command, cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0 or f"{prompts} of {prompts} image(s)" not in result.stdout:
        raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}): {result.stderr[-2000:]}")
    with open(os.path.join(folder, "out", "manifest.jsonl"), encoding="utf-8") as f:
        entries = sorted((json.loads(line) for line in f), key=lambda entry: entry["id"])
    busy, start = [], 0
    for rank in range(processes):  # the contiguous shards of split_between_processes
        share = len(entries) // processes + (rank < len(entries) % processes)
        busy.append(sum(entry["seconds"] for entry in entries[start : start + share]))
        start += share
    return seconds, max(busy)


def environment(threads: int) -> str:
    import diffusers
    import torch

    return (f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores, {threads} torch thread(s) per process; "
            f"Python {platform.python_version()}, torch {torch.__version__}, diffusers {diffusers.__version__}")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=12, help="prompts (one image each) of the long job")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each process")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md"))
    args = parser.parse_args()
    if args.images < 2:
        parser.error("--images: at least 2 (one per process)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, REPO)
    from dualguide import StableDiffusionXLTPGPipeline
    from dualguide.tiny import build_tiny_sdxl

    before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    rows: Dict[str, Tuple[float, float, float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench_batch_") as work:
        model = os.path.join(work, "tiny_sdxl")
        pipe = StableDiffusionXLTPGPipeline(**build_tiny_sdxl(seed=0, sample_size=args.size // 2), add_watermarker=False)
        pipe.save_pretrained(model)
        for label, processes, flags in CONFIGURATIONS:
            full, busy = run_job(model, args.images, processes, flags, args, work)
            rows[label] = (full, args.images / full, args.images / busy)
            print(f"{label}: {args.images} images in {full:.1f} s ({args.images / full:.2f} img/s), loaded {args.images / busy:.2f} img/s", flush=True)
    lines = [SECTION, "", f"Machine: {environment(args.threads)}.", "",
             f"`dualguide batch` on the tiny SDXL-layout model: {args.size}x{args.size} px, {args.steps} Euler steps, CFG 5 + TPG 3",
             f"(the defaults), float32, one image per prompt, {args.threads} torch thread(s) per process. Each row is one run of the",
             f"whole command for {args.images} prompts: wall = images / seconds of the command (start-up and loading included),",
             "loaded = images / the busiest process's generating seconds (from the manifest), the rate of a long job.",
             "With --compile both include compiling the UNet, once, in the job's first pipeline call (all calls share one branch set).", "",
             "| configuration | seconds (whole command) | images/s wall | images/s loaded |", "|---|---|---|---|"]  # fmt: skip
    for label, (seconds, wall, loaded) in rows.items():
        lines.append(f"| {label} | {seconds:.1f} | {wall:.2f} | {loaded:.2f} |")
    load = "" if before is None else f" with a load average of {before:.1f} before and {os.getloadavg()[0]:.1f} after (other work on the machine)"
    lines += ["", f"Measured {time.strftime('%Y-%m-%d')}, once{load}: on a shared VM such figures are rough.", ""]
    section = "\n".join(lines)
    print(section)
    write_sections(args.out, [section])
    print(f"wrote the section {SECTION!r} of {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
