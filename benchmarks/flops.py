"""FLOPs of one guided step on SDXL's full-size UNet configuration, counted on the meta device (no weights, no
data, no GPU), each relative to diffusers' CFG (one UNet call of 2 rows).

    python benchmarks/flops.py [--sizes 1024 768 512] [--out benchmarks/RESULTS.md]

``torch.utils.flop_counter.FlopCounterMode`` counts the matrix multiplications and convolutions of one call of
``GuidedDenoiser`` (TPG on d6-d23, PAG on the mid block, NAG on every cross-attention), as one pipeline step
makes it, with shared prefix rows (the default) and without (``share_prefix=False``: every row through the whole
UNet). The counts do not depend on the machine or its load. The results replace this script's section of ``--out``.
"""

from __future__ import annotations

import argparse
import os
from typing import Dict, List

import torch
from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
from torch.utils.flop_counter import FlopCounterMode

from common import SDXL_BASE_UNET, write_sections
from dualguide import CFG, NAG, PAG, TPG, Conditioning, GuidedDenoiser

MODES: Dict[str, dict] = {
    "CFG": dict(cfg=CFG(5.0)),
    "CFG + TPG (d6-d23)": dict(cfg=CFG(5.0), tpg=TPG(3.0)),
    "CFG + PAG (mid)": dict(cfg=CFG(5.0), pag=PAG(3.0)),
    "CFG + TPG + PAG": dict(cfg=CFG(5.0), tpg=TPG(3.0), pag=PAG(3.0)),
    "CFG + NAG": dict(cfg=CFG(5.0), nag=NAG(3.0)),
    "CFG + TPG + NAG": dict(cfg=CFG(5.0), tpg=TPG(3.0), nag=NAG(3.0)),
    "TPG alone": dict(tpg=TPG(3.0)),
}
TEXT_TOKENS, TEXT_WIDTH, POOLED = 77, 2048, 1280


def count(function) -> int:
    """FLOPs of ``function()``."""
    counter = FlopCounterMode(display=False)
    with counter:
        function()
    return counter.get_total_flops()


def conditioning(device: str) -> Conditioning:
    return Conditioning(torch.zeros(1, TEXT_TOKENS, TEXT_WIDTH, device=device), torch.zeros(1, POOLED, device=device),
                        torch.zeros(1, 6, device=device))  # fmt: skip


BASE = "diffusers CFG (2 rows)"


@torch.no_grad()
def step_flops(unet, scheduler, size: int, share_prefix: bool) -> Dict[str, int]:
    """FLOPs of one step at ``size`` px: diffusers' CFG (2 rows) and each of this project's modes."""
    latent = size // 8
    x = torch.zeros(1, 4, latent, latent, device="meta")
    sigma = torch.full((1,), 5.0, device="meta")
    cond = conditioning("meta")
    negative = torch.zeros(1, TEXT_TOKENS, TEXT_WIDTH, device="meta")
    added = {"text_embeds": torch.zeros(2, POOLED, device="meta"), "time_ids": torch.zeros(2, 6, device="meta")}
    results = {BASE: count(lambda: unet(x.repeat(2, 1, 1, 1), torch.full((2,), 500.0, device="meta"),
                                                            cond.prompt_embeds.repeat(2, 1, 1), added_cond_kwargs=added))}  # fmt: skip
    for name, terms in MODES.items():
        denoiser = GuidedDenoiser(unet, scheduler, share_prefix=share_prefix, **terms)
        results[name] = count(lambda: denoiser(x, sigma, cond=cond, uncond=cond, nag_negative=negative))
    return results


def table(rows: Dict[int, Dict[str, int]]) -> List[str]:
    sizes = sorted(rows, reverse=True)
    lines = ["| mode | " + " | ".join(f"{s}x{s}: TFLOPs (x CFG)" for s in sizes) + " |", "|---" * (len(sizes) + 1) + "|"]
    for mode in rows[sizes[0]]:
        cells = [f"{rows[s][mode] / 1e12:.2f} ({rows[s][mode] / rows[s][BASE]:.3f})" for s in sizes]
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 768, 512])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "RESULTS.md"))
    args = parser.parse_args()
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_BASE_UNET)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="leading")
    lines = []
    for share_prefix, title in ((True, "Shared prefix rows (the default)"), (False, "Without sharing (`share_prefix=False`)")):
        lines += [f"**{title}**", "", *table({size: step_flops(unet, scheduler, size, share_prefix) for size in args.sizes}), ""]
    print("\n".join(lines))
    note = ("Counted with `torch.utils.flop_counter.FlopCounterMode` on the meta device (`python benchmarks/flops.py`): one "
            "denoiser call per step, SDXL base's UNet configuration, one image; machine-independent. With shared prefix "
            "rows a TPG or PAG row runs as the cond row until its term's first perturbed block (conv_in, down blocks 0-1, "
            "the first resnet and two transformer blocks of down block 2 for TPG on d6; every down block and the mid "
            "block's first resnet for PAG on the mid block).")  # fmt: skip
    write_sections(args.out, ["\n".join(["## FLOPs per step (SDXL UNet, meta device)", "", note, "", *lines])])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
