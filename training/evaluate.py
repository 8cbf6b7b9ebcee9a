"""Judged adherence of a trained toy pipeline over grammar prompts, for a sweep of CFG and TPG scales.

    python -m training.evaluate --model dualguide/embedded --write      # about 30 s per setting on 2 CPU cores

Prints one JSON line per (guidance_scale, tpg_scale); ``--write`` stores the best setting with both CFG
and TPG on (by adherence, then background accuracy) in the model's ``recommended.json``.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path
from typing import List, Optional

import torch

from dualguide.toy.data import evaluation_prompts
from dualguide.toy.judge import JUDGE_DIR, ShapeJudge, adherence
from dualguide.toy.model import RECOMMENDED_FILE, load_pipeline, load_recommended


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    formatter = argparse.ArgumentDefaultsHelpFormatter
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=formatter)
    p.add_argument("--model", default="dualguide/embedded")
    p.add_argument("--judge", default=str(JUDGE_DIR))
    p.add_argument("--cfg", type=float, nargs="+", default=[1.0, 4.0, 6.0], help="guidance scales (1: CFG off)")
    p.add_argument("--tpg", type=float, nargs="+", default=[0.0, 2.0, 3.0], help="TPG scales (0: TPG off)")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--write", action="store_true", help="store the best CFG+TPG setting in recommended.json")
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    judge = ShapeJudge.load(args.judge)
    recommended = load_recommended(args.model)
    prompts = evaluation_prompts(args.prompts)
    results = []
    for cfg, tpg in itertools.product(args.cfg, args.tpg):
        settings = {**recommended, "guidance_scale": cfg, "tpg_scale": tpg}
        images = pipe(prompts, generator=torch.Generator().manual_seed(args.seed), **settings).images
        result = adherence(images, prompts, judge)
        results.append((result, cfg, tpg))
        print(json.dumps({"guidance_scale": cfg, "tpg_scale": tpg, **vars(result)}), flush=True)
    dual = [r for r in results if r[1] > 1 and r[2] > 0]
    if args.write and dual:
        best, cfg, tpg = max(dual, key=lambda r: (r[0].adherence, r[0].background))
        recommended.update(guidance_scale=cfg, tpg_scale=tpg)
        (Path(args.model) / RECOMMENDED_FILE).write_text(json.dumps(recommended, indent=2), encoding="utf-8")
        print(f"recommended.json: guidance_scale={cfg}, tpg_scale={tpg} (adherence {best.adherence:.3f})")


if __name__ == "__main__":
    main()
