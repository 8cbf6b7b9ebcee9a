"""Drop-in diffusers use: CFG + TPG + NAG with the StableDiffusionXLTPGPipeline.

    python examples/basic_pipeline.py                                   # tiny random model, no download
    python examples/basic_pipeline.py --model stabilityai/stable-diffusion-xl-base-1.0 --device cuda
"""

import argparse

import torch

from dualguide.loading import default_dtype, load_pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="hub id, diffusers folder or .safetensors file")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--size", type=int, default=None, help="pixels (default: the model's)")
    parser.add_argument("--out", default="basic_pipeline.png")
    args = parser.parse_args()

    pipe = load_pipeline(args.model, device=args.device, dtype=default_dtype(args.device))
    image = pipe(
        "a photo of a red fox in the snow",
        num_inference_steps=args.steps,
        height=args.size,
        width=args.size,
        guidance_scale=5.0,
        tpg_scale=3.0,  # token perturbation guidance on d6-d23
        do_nag=True,  # normalized attention guidance on every cross-attention
        nag_negative_prompt="blurry, low quality",
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    image.save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
