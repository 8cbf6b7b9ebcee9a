"""Few-step checkpoints (LCM, TCD, Lightning, DMD2): CFG off, NAG on, through the checkpoint's own scheduler.

    python examples/few_step_nag.py                    # tiny random model with an LCM scheduler, writes few_step_*.png
    python examples/few_step_nag.py --model <an LCM/TCD/Lightning SDXL folder> --scheduler tcd --device cuda

Few-step models are distilled without CFG (guidance_scale=1 gives one UNet row per step); NAG
restores negative-prompt control at no extra rows. Without ``sampler=`` the pipeline follows
``pipe.scheduler`` exactly as diffusers does.
"""

import argparse

import torch
from diffusers import LCMScheduler, TCDScheduler

from dualguide.loading import default_dtype, load_pipeline

SCHEDULERS = {"lcm": LCMScheduler, "tcd": TCDScheduler}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--scheduler", choices=sorted(SCHEDULERS), default="lcm")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()

    pipe = load_pipeline(args.model, device=args.device, dtype=default_dtype(args.device))
    pipe.scheduler = SCHEDULERS[args.scheduler].from_config(pipe.scheduler.config)
    common = dict(num_inference_steps=args.steps, height=args.size, width=args.size, guidance_scale=1.0, tpg_scale=0.0)
    for name, nag in (("plain", {}), ("nag", dict(do_nag=True, nag_scale=3.0, nag_negative_prompt="blurry, low quality"))):
        image = pipe("a lighthouse at dawn", generator=torch.Generator().manual_seed(0), **common, **nag).images[0]
        image.save(f"few_step_{name}.png")
    print("wrote few_step_plain.png and few_step_nag.png")


if __name__ == "__main__":
    main()
