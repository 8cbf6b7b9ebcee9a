"""Judged adherence of a trained toy pipeline over grammar prompts, for a sweep of CFG and TPG settings.

    python -m training.evaluate --model dualguide/embedded --write      # about 15 s per setting on 2 CPU cores

Prints one JSON line per (guidance_scale, tpg_scale, tpg_applied_layers_index), with the mean absolute
pixel difference (0-255) to the same seed without TPG; ``--write`` stores the best setting with both
CFG and TPG on (by adherence, then background accuracy, then that difference) in ``recommended.json``. The
prompts are held out (``data.tuning_prompts``: never those ``dualguide eval`` and the tests measure); with
``--prompt-set evaluation`` they are those (to compare two models, never to choose settings).
"""

from __future__ import annotations

import argparse
import json
from typing import List, Optional

import torch

from dualguide.layers import resolve_layers
from dualguide.loading import write_recommended
from dualguide.toy.data import evaluation_prompts, tuning_prompts
from dualguide.toy.judge import JUDGE_DIR, ShapeJudge, adherence, mean_pixel_difference
from dualguide.toy.model import load_pipeline, load_recommended


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    formatter = argparse.ArgumentDefaultsHelpFormatter
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=formatter)
    p.add_argument("--model", default="dualguide/embedded")
    p.add_argument("--judge", default=str(JUDGE_DIR))
    p.add_argument("--cfg", type=float, nargs="+", default=[1.0, 4.0, 6.0], help="guidance scales (1: CFG off)")
    p.add_argument("--tpg", type=float, nargs="+", default=[0.0, 3.0, 4.0], help="TPG scales (0: TPG off)")
    p.add_argument("--tpg-layers", nargs="+", default=["d6-d23", "d0-d23"], help="TPG layer sets")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--prompt-set", choices=("tuning", "evaluation"), default="tuning",
                   help="held-out tuning prompts, or the prompts dualguide eval measures (to compare models; no --write)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--write", action="store_true", help="store the best CFG+TPG setting in recommended.json "
                   "(by adherence, then background accuracy; on a tie the one that changes the picture most)")  # fmt: skip
    args = p.parse_args(argv)
    if args.write and args.prompt_set != "tuning":
        p.error("--write chooses recommended.json on the held-out tuning prompts only; drop --prompt-set evaluation")
    if min(args.tpg) < 0 or min(args.cfg) < 1:
        p.error(f"--tpg takes scales >= 0 and --cfg scales >= 1, got --tpg {args.tpg} --cfg {args.cfg}")
    return args


def judged_model(args: argparse.Namespace):
    """``(pipe, judge, recommended settings)`` of ``--model`` and ``--judge``, on ``--threads`` CPU threads."""
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    return pipe, ShapeJudge.load(args.judge), load_recommended(args.model)


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    pipe, judge, recommended = judged_model(args)
    for layers in args.tpg_layers:  # an unknown id fails here, before any sampling
        resolve_layers(pipe.unet, layers, "--tpg-layers")
    prompts = (tuning_prompts if args.prompt_set == "tuning" else evaluation_prompts)(args.prompts)

    def generate(settings: dict) -> list:
        return pipe(prompts, generator=torch.Generator().manual_seed(args.seed), **settings).images

    tpg_settings = [(0.0, recommended["tpg_applied_layers_index"])] if 0.0 in args.tpg else []
    tpg_settings += [(tpg, layers) for tpg in args.tpg if tpg > 0 for layers in args.tpg_layers]
    results = []
    for cfg in args.cfg:
        without_tpg = generate({**recommended, "guidance_scale": cfg, "tpg_scale": 0.0})
        for tpg, layers in tpg_settings:
            settings = {**recommended, "guidance_scale": cfg, "tpg_scale": tpg, "tpg_applied_layers_index": layers}
            images = without_tpg if tpg == 0.0 else generate(settings)
            result = adherence(images, prompts, judge)
            change = mean_pixel_difference(images, without_tpg)
            results.append((result, change, settings))
            print(json.dumps({"guidance_scale": cfg, "tpg_scale": tpg, "tpg_layers": layers, **vars(result),
                              "difference_to_no_tpg": round(change, 2)}), flush=True)  # fmt: skip
    dual = [r for r in results if r[2]["guidance_scale"] > 1 and r[2]["tpg_scale"] > 0]
    if args.write and dual:
        best, _, settings = max(dual, key=lambda r: (r[0].adherence, r[0].background, r[1]))
        recommended.update(settings)
        write_recommended(args.model, recommended)
        print(f"recommended.json: {settings} (adherence {best.adherence:.3f})")


if __name__ == "__main__":
    main()
