"""The TPG modes of the original pipeline: layer selection, TPG alone, CFG + TPG (and CFG alone).

    python examples/tpg_modes.py                       # tiny random model, writes tpg_modes_*.png
    python examples/tpg_modes.py --model <sdxl> --device cuda --steps 25
"""

import argparse

import torch

from dualguide.loading import default_dtype, load_pipeline

MODES = {
    "cfg_only": dict(guidance_scale=5.0, tpg_scale=0.0),
    "tpg_only": dict(guidance_scale=0.0, tpg_scale=3.0),
    "cfg_tpg": dict(guidance_scale=5.0, tpg_scale=3.0),
    "cfg_tpg_up_layers": dict(guidance_scale=5.0, tpg_scale=3.0, tpg_applied_layers_index=["u0-u3", "m0"]),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()

    pipe = load_pipeline(args.model, device=args.device, dtype=default_dtype(args.device))
    for name, settings in MODES.items():
        image = pipe(
            "a corgi wearing sunglasses on the beach", num_inference_steps=args.steps, height=args.size,
            width=args.size, generator=torch.Generator().manual_seed(42), **settings,
        ).images[0]  # fmt: skip
        image.save(f"tpg_modes_{name}.png")
        print(f"{name:18s} -> tpg_modes_{name}.png  {settings}")


if __name__ == "__main__":
    main()
