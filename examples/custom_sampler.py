"""A custom sampler on the GuidedDenoiser: Euler that logs each branch's x0 prediction.

Any function ``sampler(model, x, sigmas, extra_args, callback, disable, seed)`` can be passed
to the pipeline as ``sampler=``; ``denoiser.last_predictions`` holds the last call's
per-branch x0 predictions ("uncond", "cond", "tpg", "pag", "guided").

    python examples/custom_sampler.py
"""

import argparse

import torch

from dualguide.loading import load_pipeline


@torch.no_grad()
def euler_with_branch_log(model, x, sigmas, extra_args=None, callback=None, disable=None, seed=None):
    """Plain Euler in k-diffusion's convention, printing how far TPG pulls from the cond prediction."""
    extra_args = extra_args or {}
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * x.new_ones(x.shape[0]), **extra_args)
        branches = model.last_predictions
        if "tpg" in branches:
            gap = (branches["cond"] - branches["tpg"]).abs().mean().item()
            print(f"step {i}: sigma {float(sigmas[i]):7.3f}  |D_cond - D_tpg| = {gap:.4f}")
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        x = x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
    return x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    pipe = load_pipeline(None)
    pipe.set_progress_bar_config(disable=True)
    latents = pipe(
        "a red circle", num_inference_steps=args.steps, height=args.size, width=args.size, guidance_scale=5.0, tpg_scale=3.0,
        sampler=euler_with_branch_log, generator=torch.Generator().manual_seed(0), output_type="latent",
    ).images  # fmt: skip
    print("final latents:", tuple(latents.shape), "finite" if torch.isfinite(latents).all() else "NOT finite")


if __name__ == "__main__":
    main()
