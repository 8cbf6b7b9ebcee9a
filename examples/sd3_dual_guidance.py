"""SD3 / SD3.5 with dual guidance: CFG + NAG (and TPG, experimental on MMDiT) in one transformer call per step.

    python examples/sd3_dual_guidance.py                     # tiny random SD3.5-layout model, no download
    python examples/sd3_dual_guidance.py --model stabilityai/stable-diffusion-3.5-medium --device cuda --size 1024

NAG keeps a negative prompt working in the joint attention (the official SD3 semantics, SD3.5 defaults
nag_alpha 0.125, nag_tau 2.5); the grid shows CFG alone, CFG + NAG and CFG + NAG + TPG from one seed.
"""

import argparse

import torch

from dualguide import StableDiffusion3TPGPipeline
from dualguide.generation.images import labelled_grid
from dualguide.loading import default_dtype


def load(model, device: str):
    if model is None:
        from dualguide.tiny import build_tiny_sd3

        return StableDiffusion3TPGPipeline(**build_tiny_sd3("sd3.5")).to(device)
    return StableDiffusion3TPGPipeline.from_pretrained(model, torch_dtype=default_dtype(device)).to(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="an SD3 / SD3.5 hub id or diffusers folder (default: a tiny random one)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--size", type=int, default=None, help="pixels (default: the model's)")
    parser.add_argument("--out", default="sd3_dual_guidance.png")
    args = parser.parse_args()

    pipe = load(args.model, args.device)
    common = dict(
        prompt="a portrait of a woman, studio light", negative_prompt="", num_inference_steps=args.steps,
        height=args.size, width=args.size, guidance_scale=4.5,
    )  # fmt: skip
    nag = dict(do_nag=True, nag_scale=5.0, nag_tau=2.5, nag_alpha=0.125, nag_negative_prompt="glasses, hat")
    modes = {"CFG": dict(tpg_scale=0.0), "CFG + NAG": dict(tpg_scale=0.0, **nag), "CFG + NAG + TPG": dict(tpg_scale=2.0, **nag)}
    images = [
        pipe(**common, **settings, generator=torch.Generator(args.device).manual_seed(0)).images[0] for settings in modes.values()
    ]
    labelled_grid(list(modes), [images]).save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
