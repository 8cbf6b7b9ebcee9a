"""``dualguide batch``: PNGs for every prompt of a file, resumable, one process per device (work in ``dualguide.jobs``)."""

from __future__ import annotations

import argparse

from ..options import add_job_arguments, whole


def add_parser(commands) -> None:
    batch = commands.add_parser(
        "batch", help="write PNGs for every prompt of a .txt/.jsonl file; resumable; one process per device under accelerate/torchrun"
    )
    batch.add_argument("prompts", metavar="PROMPTS", help=".txt (one prompt per line) or .jsonl (one JSON object per line)")
    batch.add_argument("--n", type=whole(1), default=1, help='images per prompt, unless its line gives "n" (>= 1)')
    add_job_arguments(batch, "output folder: PNGs, manifest.jsonl, failures.jsonl")


def run(args: argparse.Namespace) -> int:
    from ..jobs.batch import run_batch

    return run_batch(args)
