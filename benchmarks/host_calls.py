"""Python function calls per denoising step of each guidance mode, counted with ``cProfile`` on the tiny SDXL model.

    python benchmarks/host_calls.py [--out benchmarks/RESULTS.md]

On a fast GPU the host has to keep ahead of the kernels, so the Python work per step is a cost of its own.
Each mode runs the whole pipeline (32 px, ``output_type="latent"``) once with 8 steps and once with 2; the
difference divided by 6 is the calls per step, the per-call fixed costs (text encoding, set-up) cancelling.
The 8-step run's own count (calls per image) keeps them: a run's set-up is host work too.
The counts are deterministic (no timing); the table replaces this script's section of ``--out``.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
from typing import Callable, Dict, List, Tuple

import torch

from common import write_sections

REFERENCE = "diffusers SDXL (CFG)"
OURS = "ours CFG"
MODES: Dict[str, dict] = {
    OURS: dict(guidance_scale=5.0, tpg_scale=0.0),
    "ours CFG+TPG": dict(guidance_scale=5.0, tpg_scale=3.0),
    "ours CFG+NAG": dict(guidance_scale=5.0, tpg_scale=0.0, do_nag=True),
    "ours CFG+TPG+NAG": dict(guidance_scale=5.0, tpg_scale=3.0, do_nag=True),
    "ours CFG+PAG": dict(guidance_scale=5.0, tpg_scale=0.0, pag_scale=3.0),
    "ours TPG alone": dict(guidance_scale=1.0, tpg_scale=3.0),
}
PROMPT = "a red circle on a blue background"
SIZE, LONG, SHORT = 32, 8, 2


def total_calls(run: Callable[[], object]) -> int:
    """Python function calls (primitive and recursive) made by ``run()``."""
    profile = cProfile.Profile()
    profile.runcall(run)
    return pstats.Stats(profile).total_calls


def run_calls(pipe, arguments: dict) -> Tuple[int, int]:
    """Calls of a ``LONG``-step and of a ``SHORT``-step run of ``pipe(**arguments)``, after one warm-up run."""

    def run(steps: int) -> Callable[[], object]:
        return lambda: pipe(PROMPT, num_inference_steps=steps, height=SIZE, width=SIZE, output_type="latent",
                            generator=torch.Generator().manual_seed(0), **arguments)  # fmt: skip

    run(SHORT)()
    return total_calls(run(LONG)), total_calls(run(SHORT))


def measure() -> Dict[str, Tuple[int, int]]:
    """``run_calls`` of diffusers' SDXL pipeline with CFG and of each of our modes, over the same components."""
    from diffusers import StableDiffusionXLPipeline

    from dualguide import StableDiffusionXLTPGPipeline, build_tiny_sdxl

    components = build_tiny_sdxl(seed=0, sample_size=SIZE // 2)  # its VAE halves the side
    reference = StableDiffusionXLPipeline(**components, add_watermarker=False)
    ours = StableDiffusionXLTPGPipeline(**components, add_watermarker=False)
    for pipe in (reference, ours):
        pipe.set_progress_bar_config(disable=True)
    results = {REFERENCE: run_calls(reference, dict(guidance_scale=5.0))}
    results.update({name: run_calls(ours, arguments) for name, arguments in MODES.items()})
    return results


def table(results: Dict[str, Tuple[int, int]]) -> List[str]:
    """Per mode: calls per step (``(long - short) / (LONG - SHORT)``) and per image (the ``LONG``-step run), with ratios."""
    per_step = {mode: (long - short) / (LONG - SHORT) for mode, (long, short) in results.items()}
    lines = [f"| mode | calls per step | x ours CFG | x diffusers CFG | calls per image ({LONG} steps) | x ours CFG |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for mode, calls in per_step.items():
        image = results[mode][0]
        lines.append(f"| {mode} | {calls:,.0f} | {calls / per_step[OURS]:.3f} | {calls / per_step[REFERENCE]:.3f} "
                     f"| {image:,} | {image / results[OURS][0]:.3f} |")  # fmt: skip
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "RESULTS.md"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    lines = table(measure())
    print("\n".join(lines))
    note = (f"Python function calls per denoising step (`python benchmarks/host_calls.py`): cProfile's total calls of an "
            f"{LONG}-step minus a {SHORT}-step pipeline run, divided by {LONG - SHORT} (per image: the {LONG}-step run's), after a "
            f"warm-up run (a UNet's module tree is walked once per model); tiny SDXL-layout model, {SIZE} px, "
            "latent output, guidance scale 5, TPG/PAG scale 3, TPG on its default layers. Deterministic.")  # fmt: skip
    write_sections(args.out, ["\n".join(["## Host work: Python calls per step (tiny SDXL)", "", note, "", *lines])])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
