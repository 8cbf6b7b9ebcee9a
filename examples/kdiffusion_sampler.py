"""Raw k-diffusion: wrap the UNet in a GuidedDenoiser and call ``sample_dpmpp_2m``.

    python examples/kdiffusion_sampler.py            # tiny random SDXL-layout model
"""

import argparse

import torch
from k_diffusion.sampling import get_sigmas_karras, sample_dpmpp_2m

from dualguide import CFG, NAG, TPG, GuidedDenoiser, encode_nag_negative, encode_sdxl
from dualguide.loading import load_pipeline


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()

    pipe = load_pipeline(args.model)
    cond, uncond = encode_sdxl(pipe, "a red circle", negative_prompt="blurry", size=(args.size, args.size))
    nag_negative = encode_nag_negative(pipe, 1, 1, nag_negative_prompt="blurry")

    denoiser = GuidedDenoiser(pipe.unet, pipe.scheduler, cfg=CFG(5.0), tpg=TPG(3.0), nag=NAG(3.0), seed=0)
    sigmas = get_sigmas_karras(args.steps, denoiser.sigma_min, denoiser.sigma_max)
    latent = args.size // pipe.vae_scale_factor
    x = torch.randn(1, 4, latent, latent, generator=torch.Generator().manual_seed(0)) * sigmas[0]
    with denoiser.hooks():  # install the hooks once for the whole run (optional)
        latents = sample_dpmpp_2m(
            denoiser, x, sigmas, extra_args={"cond": cond, "uncond": uncond, "nag_negative": nag_negative}, disable=True
        )
    print("branches per step:", denoiser.last_branches)
    print("final latents:", tuple(latents.shape), "finite:", bool(torch.isfinite(latents).all()))


if __name__ == "__main__":
    main()
