"""NAG's settings on a trained toy pipeline: negated rate and adherence over held-out negative prompts, for a grid
of nag_scale x nag_alpha x nag_tau, with CFG + TPG (the recommended scales) and with CFG off.

    python -m training.evaluate_nag --model dualguide/embedded --write   # the negative-prompt measure of docs/eval.md

The prompts are ``data.tuning_negative_prompts``: partial prompts that leave one attribute open, each with a
negative naming one value of it, as ``dualguide eval --negative-prompts`` builds them, but none of the prompts
eval measures. Each NAG setting runs beside the same guidance without NAG (its baseline: CFG's negative only
with CFG + TPG, no negative with CFG off), same seeds. Prints one JSON line per (guidance, setting). ``--write``
stores the chosen setting's nag_scale / nag_alpha / nag_tau in ``recommended.json``: among the settings whose
adherence and shape accuracy stay within ``--tolerance`` of their baseline in both guidances, the one with the
lowest mean negated rate (then the higher adherence); if none does, the one with the highest adherence.
"""

from __future__ import annotations

import argparse
import itertools
import json
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from dualguide.evaluation.adherence import attribute_hits, negated_hits
from dualguide.loading import write_recommended
from dualguide.toy.data import tuning_negative_prompts
from dualguide.toy.judge import JUDGE_DIR, ShapeJudge

from .evaluate import judged_model

GUIDANCES = ("cfg+tpg", "nag-alone")  # NAG beside the recommended CFG + TPG, and NAG with CFG off
NAG_KEYS = ("nag_scale", "nag_alpha", "nag_tau")
Setting = Tuple[float, float, float]  # (nag_scale, nag_alpha, nag_tau)


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    formatter = argparse.ArgumentDefaultsHelpFormatter
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=formatter)
    p.add_argument("--model", default="dualguide/embedded")
    p.add_argument("--judge", default=str(JUDGE_DIR))
    p.add_argument("--nag-scale", type=float, nargs="+", default=[1.5, 2.0, 3.0], help="NAG scales (> 1)")
    p.add_argument("--nag-alpha", type=float, nargs="+", default=[0.25, 0.5], help="NAG blends (0..1]")
    p.add_argument("--nag-tau", type=float, nargs="+", default=[2.5], help="NAG norm ratio caps (> 0)")
    p.add_argument("--prompts", type=int, default=48)
    p.add_argument("--seeds", type=int, default=2, help="seeds per prompt (seed, seed+1, ...)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=6, help="sampling steps (docs/eval.md's tables take 6)")
    p.add_argument("--tolerance", type=float, default=0.05,
                   help="how far adherence and shape accuracy may fall below the baseline for --write's choice")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--write", action="store_true", help="store the chosen nag_scale / nag_alpha / nag_tau in recommended.json")
    args = p.parse_args(argv)
    if min(args.nag_scale) <= 1:
        p.error(f"--nag-scale takes scales > 1 (NAG on), got {args.nag_scale}")
    if not all(0 < alpha <= 1 for alpha in args.nag_alpha) or min(args.nag_tau) <= 0:
        p.error(f"--nag-alpha takes values in (0, 1] and --nag-tau values > 0, got {args.nag_alpha} and {args.nag_tau}")
    if args.prompts < 1 or args.seeds < 1 or args.steps < 1:
        p.error(f"--prompts, --seeds and --steps take counts >= 1, got {args.prompts}, {args.seeds}, {args.steps}")
    return args


def guidance_settings(recommended: dict, guidance: str, negatives: Sequence[str], nag: Optional[Setting]) -> dict:
    """Pipeline arguments of ``guidance`` (``GUIDANCES``) with NAG at ``nag`` (None: off): with CFG + TPG the
    negative goes to CFG, and to NAG too when on; with CFG off only NAG has it (the baseline has none)."""
    settings = dict(recommended, do_nag=nag is not None)
    if guidance == "cfg+tpg":
        settings["negative_prompt"] = list(negatives)
    else:
        settings.update(guidance_scale=1.0, tpg_scale=0.0)
    if nag is not None:
        settings.update(dict(zip(NAG_KEYS, nag)), nag_negative_prompt=list(negatives))
    return settings


def scores(images: list, prompts: Sequence[str], negatives: Sequence[str], judge: ShapeJudge) -> Dict[str, float]:
    """Negated rate (lower is better), adherence and shape accuracy (of what the prompts name) over ``images``."""
    hits = attribute_hits(images, prompts, judge)
    negated = negated_hits(images, negatives, judge)["negated"]
    return {"negated": float(negated.mean()), "adherence": float(np.nanmean(hits["overall"])),
            "shape": float(np.nanmean(hits["shape"]))}  # fmt: skip


def choose(results: Dict[str, Dict[Optional[Setting], Dict[str, float]]], tolerance: float) -> Setting:
    """The rule of the module's docstring over ``results[guidance][setting]`` (``None``: the baseline)."""
    settings = [s for s in results[GUIDANCES[0]] if s is not None]

    def mean(setting: Setting, name: str) -> float:
        return float(np.mean([results[g][setting][name] for g in GUIDANCES]))

    def keeps(setting: Setting) -> bool:
        return all(results[g][setting][name] >= results[g][None][name] - tolerance
                   for g in GUIDANCES for name in ("adherence", "shape"))  # fmt: skip

    kept = [s for s in settings if keeps(s)]
    if kept:
        return min(kept, key=lambda s: (mean(s, "negated"), -mean(s, "adherence")))
    return max(settings, key=lambda s: mean(s, "adherence"))


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    pipe, judge, recommended = judged_model(args)
    pairs = tuning_negative_prompts(args.prompts)
    prompts = [prompt for prompt, _ in pairs] * args.seeds
    negatives = [negative for _, negative in pairs] * args.seeds
    seeds = [args.seed + k // len(pairs) for k in range(len(prompts))]  # the same seeds in every run
    base = {**recommended, "num_inference_steps": args.steps}
    grid: List[Optional[Setting]] = [None, *itertools.product(args.nag_scale, args.nag_alpha, args.nag_tau)]
    results: Dict[str, Dict[Optional[Setting], Dict[str, float]]] = {}
    for guidance in GUIDANCES:
        results[guidance] = {}
        for nag in grid:
            settings = guidance_settings(base, guidance, negatives, nag)
            images = pipe(prompts, generator=[torch.Generator().manual_seed(s) for s in seeds], **settings).images
            results[guidance][nag] = scores(images, prompts, negatives, judge)
            named = dict(zip(NAG_KEYS, nag)) if nag is not None else {"nag_scale": None}
            line = {"guidance": guidance, **named, **{k: round(v, 4) for k, v in results[guidance][nag].items()}}
            print(json.dumps(line), flush=True)
    chosen = dict(zip(NAG_KEYS, choose(results, args.tolerance)))
    print(f"chosen: {chosen}")
    if args.write:
        recommended.update(chosen, do_nag=False)  # the scale NAG takes when turned on; off unless asked for
        write_recommended(args.model, recommended)
        print(f"recommended.json: {chosen}")


if __name__ == "__main__":
    main()
