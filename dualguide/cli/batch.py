"""``dualguide batch``: PNGs for every prompt of a file, resumable, one process per device (work in ``dualguide.jobs``)."""

from __future__ import annotations

import argparse

from ..options import add_guidance_arguments, add_model_arguments, require_out, whole


def add_parser(commands) -> None:
    batch = commands.add_parser(
        "batch", help="write PNGs for every prompt of a .txt/.jsonl file; resumable; one process per device under accelerate/torchrun"
    )
    batch.add_argument("prompts", metavar="PROMPTS", help=".txt (one prompt per line) or .jsonl (one JSON object per line)")
    batch.add_argument("--n", type=whole(1), default=1, help='images per prompt, unless its line gives "n" (>= 1)')
    batch.add_argument("--batch-size", type=whole(1), default=1, help="images with the same settings per pipeline call (>= 1)")
    batch.add_argument("--overwrite", action="store_true", help="remake images made before in --out with other settings")
    add_model_arguments(batch)
    add_guidance_arguments(batch)
    require_out(batch, "output folder: PNGs, manifest.jsonl, failures.jsonl")


def run(args: argparse.Namespace) -> int:
    from ..jobs.batch import run_batch

    return run_batch(args)
