"""Image-to-image with raw k-diffusion: cut the schedule at ``strength``, start from the noised image latents,
run ``sample_dpmpp_2m`` on a GuidedDenoiser (CFG + TPG + NAG in one UNet call per step).

    python examples/img2img.py                         # tiny random SDXL-layout model, a random picture
    python examples/img2img.py --model MODEL --image in.png --strength 0.6
"""

import argparse

import numpy as np
import PIL.Image
import torch
from k_diffusion.sampling import get_sigmas_karras, sample_dpmpp_2m

from dualguide import CFG, NAG, TPG, GuidedDenoiser, encode_nag_negative, encode_sdxl
from dualguide.loading import load_pipeline
from dualguide.workflows import img2img_start


def load_image(path, size):
    if path is None:  # a random picture for the tiny model
        return PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8))
    return PIL.Image.open(path).convert("RGB").resize((size, size))


@torch.no_grad()
def encode_image(pipe, image):
    """VAE latents of a PIL image, scaled as the UNet expects them."""
    pixels = pipe.image_processor.preprocess(image).to(pipe.vae.device, pipe.vae.dtype)
    latents = pipe.vae.encode(pixels).latent_dist.mean
    return (latents * pipe.vae.config.scaling_factor).float()


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--image", default=None)
    parser.add_argument("--strength", type=float, default=0.6)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--output", default=None, help="write the decoded image here (PNG)")
    args = parser.parse_args()

    pipe = load_pipeline(args.model)
    init_latents = encode_image(pipe, load_image(args.image, args.size))
    cond, uncond = encode_sdxl(pipe, "a red circle", negative_prompt="blurry", size=(args.size, args.size))
    nag_negative = encode_nag_negative(pipe, 1, 1, nag_negative_prompt="blurry")

    denoiser = GuidedDenoiser(pipe.unet, pipe.scheduler, cfg=CFG(5.0), tpg=TPG(3.0), nag=NAG(3.0), seed=0)
    sigmas = get_sigmas_karras(args.steps, denoiser.sigma_min, denoiser.sigma_max)
    noise = torch.randn(init_latents.shape, generator=torch.Generator().manual_seed(0))
    x, sigmas = img2img_start(init_latents, noise, sigmas, args.strength)  # last int(steps * strength) steps
    latents = sample_dpmpp_2m(
        denoiser, x, sigmas, extra_args={"cond": cond, "uncond": uncond, "nag_negative": nag_negative}, disable=True
    )
    print(f"steps run: {len(sigmas) - 1} of {args.steps} (strength {args.strength})")
    print("final latents:", tuple(latents.shape), "finite:", bool(torch.isfinite(latents).all()))
    if args.output:
        pipe.decode(latents, "pil")[0].save(args.output)
        print("wrote", args.output)


if __name__ == "__main__":
    main()
