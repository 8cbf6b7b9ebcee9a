"""Dual guidance: CFG + TPG + NAG in one UNet call per step, and ``apply_nag`` for later calls.

    python examples/dual_guidance_nag.py               # tiny random model, writes dual_*.png
"""

import argparse

import torch

from dualguide import apply_nag
from dualguide.loading import default_dtype, load_pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()

    pipe = load_pipeline(args.model, device=args.device, dtype=default_dtype(args.device))
    common = dict(num_inference_steps=args.steps, height=args.size, width=args.size)

    # Per call: every NAG setting is an argument.
    image = pipe(
        "a cat playing piano", guidance_scale=5.0, tpg_scale=3.0, do_nag=True, nag_scale=3.0, nag_tau=2.5,
        nag_alpha=0.5, nag_use_l1=True, nag_negative_prompt="blurry, deformed", generator=torch.Generator().manual_seed(1),
        **common,
    ).images[0]  # fmt: skip
    image.save("dual_cfg_tpg_nag.png")

    # Once for all later calls: apply_nag sets the defaults (a call can still pass do_nag=False).
    apply_nag(pipe, nag_scale=3.0, nag_alpha=0.5, nag_negative_prompt="blurry, deformed")
    image = pipe("a cat playing piano", guidance_scale=1.0, tpg_scale=0.0, generator=torch.Generator().manual_seed(1), **common).images[0]
    image.save("dual_nag_only.png")
    print("wrote dual_cfg_tpg_nag.png and dual_nag_only.png")


if __name__ == "__main__":
    main()
