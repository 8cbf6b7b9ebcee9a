"""ControlNet with raw k-diffusion: ``sample_dpmpp_2m`` on a GuidedDenoiser (CFG + TPG + NAG in one UNet call
per step) with a ``ControlNetInput`` in ``extra_args``. The ControlNet runs on the uncond and cond rows only;
the TPG rows reuse the cond rows' residuals.

    python examples/controlnet.py                      # tiny random SDXL-layout model and ControlNet, a drawn circle
    python examples/controlnet.py --model MODEL --controlnet CONTROLNET --control edges.png --output out.png
"""

import argparse

import numpy as np
import PIL.Image
import PIL.ImageDraw
import torch
from k_diffusion.sampling import get_sigmas_karras, sample_dpmpp_2m

from dualguide import CFG, NAG, TPG, ControlNetInput, GuidedDenoiser, encode_nag_negative, encode_sdxl
from dualguide.loading import load_pipeline
from dualguide.tiny import build_tiny_controlnet


def load_control(path, size):
    """The control image as ControlNets take it: ``[1, 3, H, W]`` in [0, 1]."""
    if path is None:  # a white circle on black, an edge map's kind of picture
        image = PIL.Image.new("RGB", (size, size))
        PIL.ImageDraw.Draw(image).ellipse((size // 4, size // 4, 3 * size // 4, 3 * size // 4), outline="white", width=max(1, size // 16))
    else:
        image = PIL.Image.open(path).convert("RGB").resize((size, size))
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]


class Rows:
    """Rows of every forward call of a module."""

    def __init__(self, module):
        self.rows = []
        self.handle = module.register_forward_pre_hook(lambda m, args: self.rows.append(args[0].shape[0]))


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--controlnet", default=None, help="a diffusers ControlNet folder or hub id (tiny random one by default)")
    parser.add_argument("--control", default=None, help="the control image (an edge map, a depth map, ...)")
    parser.add_argument("--scale", type=float, default=0.8, help="controlnet_conditioning_scale")
    parser.add_argument("--end", type=float, default=0.8, help="control_guidance_end: the ControlNet stops after this fraction")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--output", default=None, help="write the decoded image here (PNG)")
    args = parser.parse_args()

    pipe = load_pipeline(args.model)
    if args.controlnet is None:
        controlnet = build_tiny_controlnet(pipe.unet)
    else:
        from diffusers import ControlNetModel

        controlnet = ControlNetModel.from_pretrained(args.controlnet)
    controlnet = controlnet.to(pipe.unet.device)
    control = ControlNetInput(controlnet, load_control(args.control, args.size), scale=args.scale, end=args.end)

    cond, uncond = encode_sdxl(pipe, "a red circle", negative_prompt="blurry", size=(args.size, args.size))
    nag_negative = encode_nag_negative(pipe, 1, 1, nag_negative_prompt="blurry")
    denoiser = GuidedDenoiser(pipe.unet, pipe.scheduler, cfg=CFG(5.0), tpg=TPG(3.0), nag=NAG(3.0), seed=0)
    sigmas = get_sigmas_karras(args.steps, denoiser.sigma_min, denoiser.sigma_max)
    denoiser.set_schedule(sigmas)  # the control window is a fraction of these steps
    latent_size = args.size // pipe.vae_scale_factor
    x = torch.randn(1, 4, latent_size, latent_size, generator=torch.Generator().manual_seed(0)) * sigmas[0]
    control_rows, unet_rows = Rows(controlnet), Rows(pipe.unet)
    latents = sample_dpmpp_2m(
        denoiser, x, sigmas, extra_args={"cond": cond, "uncond": uncond, "nag_negative": nag_negative, "control": control}, disable=True
    )
    print(f"rows per model call: ControlNet {control_rows.rows}, UNet {unet_rows.rows}")
    print("final latents:", tuple(latents.shape), "finite:", bool(torch.isfinite(latents).all()))
    if args.output:
        pipe.decode(latents, "pil")[0].save(args.output)
        print("wrote", args.output)


if __name__ == "__main__":
    main()
