"""``dualguide generate``: PNGs for one or more prompts, each image from its own seed."""

from __future__ import annotations

import argparse
import os

from ..generation import images
from ..generation.progress import StepProgress, planned_steps
from ..generation.run import generate_images, prepare
from ..generation.settings import image_seed
from ..generation.tasks import task_metadata
from ..options import add_generate_arguments


def add_parser(commands) -> None:
    add_generate_arguments(commands.add_parser("generate", help="write PNGs for one or more prompts"))


def run(args: argparse.Namespace) -> int:
    prepared = prepare(vars(args), images=len(args.prompt) * args.n, per_call=args.n, call_option="--n")
    os.makedirs(args.out, exist_ok=True)
    written, replaced = [], 0
    with StepProgress(len(args.prompt) * args.n, planned_steps(prepared.pipe, prepared.kwargs)) as progress:
        for index, prompt in enumerate(args.prompt):
            seeds = [image_seed(args.seed, index, number, args.n) for number in range(args.n)]
            label = f"prompt {index + 1}/{len(args.prompt)}: {prompt[:30]}"
            pictures = generate_images(prepared.pipe, prompt, seeds, prepared.kwargs, prepared.task, progress, label)
            for number, (image, seed) in enumerate(zip(pictures, seeds)):
                path = os.path.join(args.out, images.image_name(index, number, seed, prompt))
                replaced += os.path.exists(path)
                metadata = {"prompt": prompt, "seed": seed, "model": prepared.model, **prepared.kwargs, **task_metadata(prepared.task)}
                images.save_png(image, path, metadata)
                written.append(path)
    note = f" ({replaced} replaced a file of the same name: same prompt and seed)" if replaced else ""
    print(f"wrote {len(written)} image(s) to {os.path.abspath(args.out)}{note}")
    return 0
