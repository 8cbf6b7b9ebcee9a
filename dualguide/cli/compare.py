"""``dualguide compare``: one labelled grid of the same seed under each guidance mode, a row per prompt."""

from __future__ import annotations

import argparse
import os

from ..generation import images
from ..generation.progress import StepProgress, planned_steps
from ..generation.run import generate_images, prepare
from ..generation.settings import compare_modes, panel_count
from ..generation.tasks import task_metadata
from ..options import add_guidance_arguments, add_model_arguments, add_task_arguments


def add_parser(commands) -> None:
    compare = commands.add_parser(
        "compare", help="one labelled grid of the same seed under each guidance mode",
        description="One labelled grid, a row per prompt: no guidance, CFG, CFG+TPG, CFG+NAG, CFG+TPG+NAG; with "
        "--nag-negative also NAG with CFG off (the negative acting where CFG's cannot), with --with-pag CFG+PAG. On Flux.1 "
        "(guidance-distilled): none, NAG, true CFG, true CFG+NAG, the negative from --nag-negative or --negative.",
    )  # fmt: skip
    compare.add_argument("prompt", nargs="+", help="one grid row per prompt, all with the same seed")
    compare.add_argument("--with-pag", action="store_true", help="add a CFG+PAG panel")
    add_model_arguments(compare)
    add_guidance_arguments(compare)
    add_task_arguments(compare)


def run(args: argparse.Namespace) -> int:
    nag_alone = bool(args.nag_negative)
    prepared = prepare(vars(args), images=len(args.prompt) * panel_count(args.with_pag, nag_alone), seeds=1)
    modes = compare_modes(prepared.kwargs, args.with_pag, nag_alone)
    with StepProgress(len(args.prompt) * len(modes), planned_steps(prepared.pipe, prepared.kwargs)) as progress:
        rows = [[generate_images(prepared.pipe, prompt, [args.seed], arguments, prepared.task, progress, f"{label}: {prompt[:30]}")[0]
                 for label, arguments in modes] for prompt in args.prompt]  # fmt: skip
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"compare_s{args.seed}_{images.grid_name(args.prompt)}.png")
    replaced = os.path.exists(path)
    prompt = args.prompt[0] if len(args.prompt) == 1 else args.prompt
    metadata = {"prompt": prompt, "seed": args.seed, "model": prepared.model, **task_metadata(prepared.task), "panels": dict(modes)}
    images.save_png(images.labelled_grid([label for label, _ in modes], rows), path, metadata)
    print(f"{'replaced' if replaced else 'wrote'} the comparison grid {os.path.abspath(path)}")
    return 0
