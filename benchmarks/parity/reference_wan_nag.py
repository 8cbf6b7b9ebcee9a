"""The reference for the project's Wan NAG: the NAG authors' Wan attention processor in a reconstructed WanPipeline loop.

    <reference venv>/bin/python benchmarks/parity/reference_wan_nag.py --official-wan <folder> --model <folder> \\
        --inputs <inputs.safetensors> --settings <settings.json> --out <out.safetensors>

Runs in the reference environment (diffusers 0.34, which the authors' code was written for), never in the project's
venv; ``wan_nag.py`` beside this file writes the model, inputs and settings, calls this script and reads the output.

What is theirs and what is reconstructed: ``--official-wan`` holds their ``attention_wan_nag.py``
(``NAGWanAttnProcessor2_0``, the only file of their Wan code available here) and a stand-in ``ftfy`` for its unused
import. Their ``pipeline_wan_nag.py`` / ``transformer_wan_nag.py`` are not available, so the transformer is diffusers
0.34's own ``WanTransformer3DModel`` (text-to-video: the doubled text batch passes through it unchanged) with their
processor on every block's ``attn2``, and the loop below is written to mirror diffusers 0.34 ``WanPipeline.__call__``'s
denoising: per step the cond call with ``encoder_hidden_states = cat([prompt_embeds, nag_negative_prompt_embeds])``
(the processor recognises the doubled batch), the uncond call on ``negative_prompt_embeds`` when
``guidance_scale > 1``, ``noise_uncond + g (noise_cond - noise_uncond)``, the scheduler step. ``settings`` is JSON::

    {"runs": {NAME: {"steps": n, "guidance_scale": g, "nag_scale": s, "nag_tau": t, "nag_alpha": a}}}

(``nag_scale`` 1: no NAG, diffusers' own processors). The output holds each run's final latents under NAME.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from safetensors.torch import load_file, save_file


def load(model: str):
    """diffusers 0.34's ``WanTransformer3DModel`` and ``FlowMatchEulerDiscreteScheduler`` config from ``model``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanTransformer3DModel

    transformer, info = WanTransformer3DModel.from_pretrained(model, subfolder="transformer", output_loading_info=True)
    if info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]:
        raise ValueError(f"the saved transformer does not load cleanly into diffusers 0.34: {info}")
    return transformer.eval(), FlowMatchEulerDiscreteScheduler.load_config(model, subfolder="scheduler")


@torch.no_grad()
def denoise(transformer, scheduler, inputs, run: dict) -> torch.Tensor:
    """One run of the reconstructed loop (see the module docstring)."""
    from attention_wan_nag import NAGWanAttnProcessor2_0

    nag = run["nag_scale"] > 1
    originals = [block.attn2.processor for block in transformer.blocks]
    if nag:
        for block in transformer.blocks:
            block.attn2.set_processor(NAGWanAttnProcessor2_0(run["nag_scale"], run["nag_tau"], run["nag_alpha"]))
    try:
        dtype = transformer.dtype
        positive = inputs["prompt_embeds"].to(dtype)
        if nag:
            positive = torch.cat([positive, inputs["nag_negative_prompt_embeds"].to(dtype)])
        negative = inputs["negative_prompt_embeds"].to(dtype)
        scheduler.set_timesteps(run["steps"])
        latents = inputs["latents"].to(torch.float32)
        for t in scheduler.timesteps:
            timestep = t.expand(latents.shape[0])
            noise = transformer(hidden_states=latents.to(dtype), timestep=timestep, encoder_hidden_states=positive, return_dict=False)[0]
            if run["guidance_scale"] > 1:
                uncond = transformer(hidden_states=latents.to(dtype), timestep=timestep, encoder_hidden_states=negative, return_dict=False)[0]
                noise = uncond + run["guidance_scale"] * (noise - uncond)
            latents = scheduler.step(noise, t, latents, return_dict=False)[0]
        return latents
    finally:
        for block, processor in zip(transformer.blocks, originals):
            block.attn2.set_processor(processor)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name in ("--official-wan", "--model", "--inputs", "--settings", "--out"):
        parser.add_argument(name, required=True)
    args = parser.parse_args()
    sys.path.insert(0, args.official_wan)
    from diffusers import FlowMatchEulerDiscreteScheduler

    torch.use_deterministic_algorithms(True)
    transformer, scheduler_config = load(args.model)
    inputs = load_file(args.inputs)
    with open(args.settings) as f:
        runs = json.load(f)["runs"]
    out = {name: denoise(transformer, FlowMatchEulerDiscreteScheduler.from_config(scheduler_config), inputs, run).contiguous() for name, run in runs.items()}
    save_file(out, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
