"""Inpainting with raw k-diffusion: ``InpaintModel`` keeps the unmasked region on the noised original at
every model call, so ``sample_dpmpp_2m`` (or any k-diffusion sampler) inpaints with a 4-channel UNet.

    python examples/inpaint.py                         # tiny random SDXL-layout model, a random picture
    python examples/inpaint.py --model MODEL --image in.png --mask mask.png   # mask: white = repaint
"""

import argparse

import numpy as np
import PIL.Image
import torch
from k_diffusion.sampling import get_sigmas_karras, sample_dpmpp_2m

from dualguide import CFG, NAG, TPG, GuidedDenoiser, encode_nag_negative, encode_sdxl
from dualguide.loading import load_pipeline
from dualguide.workflows import InpaintModel, img2img_start


def load_image(path, size):
    if path is None:
        return PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8))
    return PIL.Image.open(path).convert("RGB").resize((size, size))


def load_mask(path, size):
    if path is None:  # repaint the centre square
        mask = np.zeros((size, size), dtype=np.uint8)
        mask[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 255
        return PIL.Image.fromarray(mask)
    return PIL.Image.open(path).convert("L").resize((size, size))


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--image", default=None)
    parser.add_argument("--mask", default=None)
    parser.add_argument("--strength", type=float, default=1.0)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--output", default=None, help="write the decoded image here (PNG)")
    args = parser.parse_args()

    pipe = load_pipeline(args.model)
    pixels = pipe.image_processor.preprocess(load_image(args.image, args.size)).to(pipe.vae.device, pipe.vae.dtype)
    init_latents = (pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor).float()
    mask = pipe.image_processor.pil_to_numpy(load_mask(args.mask, args.size))  # [1, H, W] in [0, 1]
    mask = torch.nn.functional.interpolate(torch.from_numpy(mask).float()[:, None], size=init_latents.shape[-2:])
    mask = (mask >= 0.5).float()  # 1 = repaint

    cond, uncond = encode_sdxl(pipe, "a red circle", negative_prompt="blurry", size=(args.size, args.size))
    nag_negative = encode_nag_negative(pipe, 1, 1, nag_negative_prompt="blurry")
    denoiser = GuidedDenoiser(pipe.unet, pipe.scheduler, cfg=CFG(5.0), tpg=TPG(3.0), nag=NAG(3.0), seed=0)
    sigmas = get_sigmas_karras(args.steps, denoiser.sigma_min, denoiser.sigma_max)
    noise = torch.randn(init_latents.shape, generator=torch.Generator().manual_seed(0))
    x, sigmas = img2img_start(init_latents, noise, sigmas, args.strength)
    model = InpaintModel(denoiser, init_latents, mask, noise)
    latents = sample_dpmpp_2m(
        model, x, sigmas, extra_args={"cond": cond, "uncond": uncond, "nag_negative": nag_negative}, disable=True
    )
    kept = float((latents - init_latents).mul(1 - mask).abs().max())
    print("final latents:", tuple(latents.shape), "finite:", bool(torch.isfinite(latents).all()))
    print(f"largest change outside the mask: {kept:.2e}")
    if args.output:
        pipe.decode(latents, "pil")[0].save(args.output)
        print("wrote", args.output)


if __name__ == "__main__":
    main()
