"""Flux.1 with a negative prompt: NAG, true CFG and both, each in one transformer call per step.

    python examples/flux_nag.py                                   # tiny random Flux.1-dev layout, no download
    python examples/flux_nag.py --model black-forest-labs/FLUX.1-dev --device cuda --size 1024
    python examples/flux_nag.py --model black-forest-labs/FLUX.1-schnell --device cuda --steps 4 --guidance 0

Flux.1 dev and schnell are guidance-distilled: ``guidance_scale`` is an embedding, not CFG, so a negative prompt
does nothing unless true CFG (``true_cfg_scale`` with ``negative_prompt``) pays for uncond rows. NAG brings the
negative prompt back inside the attention at the official NAG Flux settings (nag_scale 5, tau 2.5, alpha 0.25), at
a fraction of true CFG's cost; true CFG + NAG guides the cond rows of the same call. The grid shows the four from
one seed.
"""

import argparse

import torch

from dualguide import FluxTPGPipeline
from dualguide.generation.images import labelled_grid
from dualguide.loading import default_dtype


def load(model, device: str) -> FluxTPGPipeline:
    if model is None:
        from dualguide.tiny import build_tiny_flux

        return FluxTPGPipeline(**build_tiny_flux("dev")).to(device)
    return FluxTPGPipeline.from_pretrained(model, torch_dtype=default_dtype(device, "flux")).to(device)  # bfloat16 on CUDA


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a Flux.1 hub id or diffusers folder (default: a tiny random one)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--size", type=int, default=None, help="pixels, a multiple of 16 (default: the model's)")
    parser.add_argument("--guidance", type=float, default=3.5, help="the distilled guidance (schnell ignores it: 0)")
    parser.add_argument("--negative", default="glasses, hat")
    parser.add_argument("--out", default="flux_nag.png")
    args = parser.parse_args()

    pipe = load(args.model, args.device)
    common = dict(
        prompt="a portrait of a woman, studio light", num_inference_steps=args.steps, height=args.size, width=args.size,
        guidance_scale=args.guidance, tpg_scale=0.0,
    )  # fmt: skip
    nag = dict(nag_scale=5.0, nag_negative_prompt=args.negative)  # nag_scale > 1 turns NAG on, as in the official pipeline
    true_cfg = dict(true_cfg_scale=4.0, negative_prompt=args.negative)
    modes = {"no negative": {}, "NAG": nag, "true CFG": true_cfg, "true CFG + NAG": {**true_cfg, **nag}}
    images = [
        pipe(**common, **settings, generator=torch.Generator(args.device).manual_seed(0)).images[0] for settings in modes.values()
    ]
    labelled_grid(list(modes), [images]).save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
