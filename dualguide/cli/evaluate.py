"""``dualguide eval``: guidance modes on the same prompts and seeds, measured and compared (work in ``dualguide.evaluation``)."""

from __future__ import annotations

import argparse

from ..options import add_job_arguments, whole


def add_parser(commands) -> None:
    evaluate = commands.add_parser("eval", help="compare guidance modes on the same prompts and seeds: metrics, paired statistics, report")
    evaluate.add_argument("prompts", metavar="PROMPTS", nargs="?", default=None, help=".txt/.jsonl prompt file, a line may carry a negative (or --embedded-prompts, --negative-prompts)")
    evaluate.add_argument("--embedded-prompts", type=whole(2), default=None, metavar="N", help="N prompts of the embedded model's grammar")
    evaluate.add_argument("--negative-prompts", type=whole(2), default=None, metavar="N",
                          help="N partial prompts of the embedded model's grammar, each with a negative naming a value of what it leaves "
                          "open (default modes: none, cfg, nag, cfg+nag, cfg+tpg, cfg+tpg+nag, the negative routed by negative-for)")  # fmt: skip
    evaluate.add_argument("--modes", default=None, help='"NAME: KEY=VALUE,...; ..." keyed by generate flag names; a scale a mode does not set is '
                          "off; negative-for=cfg|nag|cfg+nag|none says which guidance gets each prompt's negative "
                          "(default: none, cfg, tpg, cfg+tpg, cfg+nag, cfg+tpg+nag, cfg+pag)")  # fmt: skip
    evaluate.add_argument("--toy-judge", action="store_true",
                          help="--model was trained by training/ on the embedded model's pictures: use its grammar prompts, "
                          "its judge and its ground-truth renders, as for the embedded model (to compare a retrained model)")  # fmt: skip
    evaluate.add_argument("--baseline", default="cfg", help="the mode every other is compared with (default cfg)")
    evaluate.add_argument("--seeds", type=whole(1), default=2, help="images per prompt, the same seeds in every mode (>= 1, default 2)")
    evaluate.add_argument("--unconditional", type=whole(0), default=0, metavar="N", help="empty-prompt images per mode, for the unconditional KID")
    evaluate.add_argument("--clip", default=None, metavar="PATH", help="local CLIP model folder: CLIP score (and the features, with --model)")
    evaluate.add_argument("--reference", default=None, metavar="DIR", help="reference images for the KID (embedded model: ground-truth renders)")
    add_job_arguments(evaluate, "output folder: plan.jsonl, images/, results.*, metrics.png, examples.png")


def run(args: argparse.Namespace) -> int:
    from ..evaluation.command import evaluate  # numpy, torch and the metrics load only here

    return evaluate(args)
