"""FLOPs of one Flux.1-dev step at 1024 x 1024 with 512 text tokens, counted on the meta device through the public
pipelines (no weights, no data, no GPU), each relative to one unguided transformer call.

    python benchmarks/flux_flops.py [--size 1024] [--out benchmarks/RESULTS.md]

``FluxTPGPipeline`` and diffusers' ``FluxPipeline`` run on a meta-device ``FluxTransformer2DModel`` of the public
Flux.1-dev configuration with ``prompt_embeds`` / ``pooled_prompt_embeds`` (and the negatives) given,
``num_inference_steps=1``, ``output_type="latent"``; ``torch.utils.flop_counter.FlopCounterMode`` counts the
matrix multiplications and the attention (``scaled_dot_product_attention``, whose math path is counted on the meta
device). The official NAG Flux layout is counted from its rows: the official transformer runs the NAG negative's
text rows through every block and, from the first single-stream block on, one more full row (the tiled image
tokens) per guided row; this project's NAG has the same rows (the official semantics need them: the negative rows'
image tokens diverge in the single blocks through their own pooled ``temb``), so the two count the same. The
counts do not depend on the machine or its load. The results replace this script's section of ``--out``.
"""

from __future__ import annotations

import argparse
import os
from typing import Dict

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from torch.utils.flop_counter import FlopCounterMode

from common import write_sections
from dualguide import FluxTPGPipeline

# FLUX.1-dev's transformer configuration (public).
FLUX_DEV = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56),
)  # fmt: skip
SCHEDULER = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
TEXT_TOKENS, TEXT_WIDTH, POOLED = 512, 4096, 768


def embeds(prefix: str = "") -> Dict[str, torch.Tensor]:
    return {f"{prefix}prompt_embeds": torch.zeros(1, TEXT_TOKENS, TEXT_WIDTH, device="meta"),
            f"{prefix}pooled_prompt_embeds": torch.zeros(1, POOLED, device="meta")}  # fmt: skip


MODES: Dict[str, dict] = {
    "unguided (one call)": dict(),
    "NAG": dict(nag_scale=5.0, **embeds("nag_negative_")),
    "true CFG": dict(true_cfg_scale=4.0, **embeds("negative_")),
    "true CFG + NAG": dict(true_cfg_scale=4.0, nag_scale=5.0, **embeds("negative_"), **embeds("nag_negative_")),
    "TPG (j5-j18)": dict(tpg_scale=3.0),
    "true CFG + TPG + NAG": dict(true_cfg_scale=4.0, tpg_scale=3.0, nag_scale=5.0, **embeds("negative_"), **embeds("nag_negative_")),
}
TARGETS = {"NAG": 1.15, "true CFG": 2.00, "true CFG + NAG": 2.15}


def count(pipe, size: int, **options) -> int:
    """FLOPs of one pipeline step at ``size`` px."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        pipe(**embeds(), height=size, width=size, num_inference_steps=1, output_type="latent", **options)
    return counter.get_total_flops()


def table(size: int) -> str:
    with torch.device("meta"):
        transformer = FluxTransformer2DModel(**FLUX_DEV)
    scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULER)
    parts = dict(transformer=transformer, scheduler=scheduler, vae=None, text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None)
    ours = FluxTPGPipeline(**parts)
    base = count(FluxPipeline(**parts), size)
    diffusers_cfg = count(FluxPipeline(**parts), size, true_cfg_scale=4.0, **embeds("negative_"))
    lines = [
        f"## Flux.1-dev FLOPs per step ({size} px, {TEXT_TOKENS} text tokens, meta device, `benchmarks/flux_flops.py`)",
        "",
        f"diffusers' `FluxPipeline`, one unguided step: {base / 1e12:.1f} TFLOPs; its true CFG (two calls): "
        f"{diffusers_cfg / base:.3f}.",
        "",
        "Every row of a step through the whole transformer (`share_prefix=False`), then with the TPG / PAG rows run as",
        "the cond row until their first perturbed block (the default):",
        "",
        "| mode | TFLOPs | relative to unguided, every row whole | shared prefix (default) | target | transformer calls |",
        "|---|---|---|---|---|---|",
    ]
    for name, options in MODES.items():
        whole = count(ours, size, share_prefix=False, **options) / base
        flops = count(ours, size, **options)
        target = TARGETS.get(name)
        ratio = flops / base
        verdict = "" if target is None else f"<= {target:.2f} {'ok' if ratio <= target + 1e-9 else 'MISSED'}"
        lines.append(f"| {name} | {flops / 1e12:.1f} | {whole:.3f} | {ratio:.3f} | {verdict} | 1 |")
    lines += [
        "",
        "NAG's rows are the official NAG Flux layout's (same count: the official transformer runs the negative text rows",
        "through every block and tiles the image rows from the first single-stream block on; its true CFG + NAG cannot",
        "run). The 1.15 / 2.15 targets assume the negative rows need no image tokens of their own; in the official",
        "semantics they do: in the single-stream blocks each negative row's image tokens are modulated by its own",
        "pooled `temb` and diverge from the positive row's (0.11 after the first single block on the tiny dev layout,",
        "`benchmarks/parity/flux_nag.py`'s probe), and each guided image token is extrapolated against them, so the",
        "single blocks (2/3 of a step) run twice for the guided rows. Equal results (7.2e-7 against the official",
        "pipeline) and the 1.15 target exclude each other; this project keeps the official results.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--out", default=None, help="a Markdown file whose 'Flux.1-dev FLOPs' section this replaces")
    args = parser.parse_args()
    text = table(args.size)
    print(text)
    if args.out:
        write_sections(args.out, [text])


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
