"""Seconds per image of each guidance mode against diffusers' SDXL pipelines, on the tiny SDXL-layout model.

    python benchmarks/bench_guidance.py [--repeats 5] [--sizes 64 128] [--steps 8]

Baseline: diffusers' StableDiffusionXLPipeline with CFG (guidance_scale 5, Euler). Also timed:
diffusers' StableDiffusionXLPAGPipeline (mid layers) and this project's modes. Every mode is timed
in pairs with the baseline (full pipeline calls: text encoding, sampling, VAE decode), all in this
one process; each ratio is the median over rounds of the pair's ratio. Ratios and targets go to
stdout and benchmarks/RESULTS.md, where this script replaces its own parts (the text before the first
section and one section per size) and keeps every other section (the batch job's, notes).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from common import (
    BASELINE, TABLE_HEAD, Timings, comparison_pipelines, comparison_runs, environment, paired_timings, ratio_rows, write_sections,
)

TARGETS = {
    64: {"CFG": 1.03, "CFG+TPG": 1.30, "CFG+NAG": 1.15, "CFG+TPG+NAG": 1.45, "CFG+PAG": 1.25,
         "CFG+TPG (TPG first half)": 1.18},
    128: {"CFG+TPG": 1.55, "CFG+NAG": 1.15, "CFG+TPG+NAG": 1.65, "CFG+TPG (TPG first half)": 1.30},
}  # fmt: skip
PROMPT = "a red circle on a blue background"


def time_size(components, size: int, steps: int, repeats: int) -> Timings:
    pipes = comparison_pipelines(components)
    common = dict(prompt=PROMPT, num_inference_steps=steps, height=size, width=size)

    def call(name, **kwargs):
        return lambda: pipes[name](generator=torch.Generator().manual_seed(0), **common, **kwargs)

    runs = comparison_runs(call)
    timings = paired_timings(runs, BASELINE, repeats)
    for name, value in timings.seconds.items():
        print(f"  {size}px  {name:34s} {value:.3f} s  ratio {timings.ratios[name]:.3f}", flush=True)
    return timings


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5, help="rounds of pairs (at least 1)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "RESULTS.md"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from dualguide.tiny import build_tiny_sdxl

    preamble = "\n".join(["# Benchmark: seconds per image, tiny SDXL-layout model", "", f"Machine: {environment()}.", "",
             f"{args.steps} Euler steps, one image, float32, full pipeline call; after a warm-up call of each, {args.repeats} rounds",
             "in which every mode runs in a pair with the baseline (diffusers' StableDiffusionXLPipeline with CFG), the order",
             "alternating by round: s/image is the median over rounds, the ratio the median over rounds of mode / baseline."])  # fmt: skip
    sections = []
    with torch.inference_mode():
        for size in args.sizes:
            components = build_tiny_sdxl(seed=0, sample_size=size // 2)
            timings = time_size(components, size, args.steps, args.repeats)
            targets = {f"ours {k}": v for k, v in TARGETS.get(size, {}).items()}
            rows, misses = ratio_rows(timings, targets)
            sections.append("\n".join([f"## {size}x{size} pixels ({size // 2}x{size // 2} latents)", "", *TABLE_HEAD, *rows, "",
                                       "Missed targets: " + ("none" if not misses else "; ".join(misses))]))  # fmt: skip
    print(preamble, *sections, sep="\n\n")
    write_sections(args.out, sections, preamble)
    print(f"wrote its sections of {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
