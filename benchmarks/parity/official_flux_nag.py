"""The official NAG Flux pipeline (ChenDarYen/Normalized-Attention-Guidance), run out of tree on a saved tiny model.

    <reference venv>/bin/python benchmarks/parity/official_flux_nag.py --official <repo root> --model <folder> \\
        --inputs <inputs.safetensors> --settings <settings.json> --out <out.safetensors>

Runs in a separate environment with the diffusers the official code was written for (0.34), never in the project's
venv; ``flux_nag.py`` beside this file writes the model, inputs and settings, calls this script and reads the output.
The model folder holds ``transformer/`` and ``scheduler/`` saved by diffusers; the text encoders, tokenizers and VAE
are left out (the pipeline gets embeddings and returns latents). ``settings`` is JSON::

    {"height": H, "width": W, "vae_scale_factor": 8,
     "runs": {NAME: {"kwargs": {pipeline scalars}, "tensors": {pipeline argument: inputs key}, "probe": false}}}

Each run passes ``latents`` (packed) from the inputs, its tensors and kwargs with ``output_type="latent"``; the output
holds the run's latents under NAME. With ``probe``, the output also holds ``NAME.probe``: for the first transformer
call, the largest absolute difference between the NAG-positive and NAG-negative halves' image tokens entering the
first single-stream block, then leaving each single-stream block.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Dict, List

import torch
from safetensors.torch import load_file, save_file


def load_pipeline(official: str, model: str, vae_scale_factor: int):
    """``NAGFluxPipeline`` over the official transformer class loaded from ``model``; no text encoders or VAE."""
    sys.path.insert(0, official)
    from diffusers import FlowMatchEulerDiscreteScheduler
    from src.pipeline_flux_nag import NAGFluxPipeline
    from src.transformer_flux import NAGFluxTransformer2DModel

    transformer, info = NAGFluxTransformer2DModel.from_pretrained(model, subfolder="transformer", output_loading_info=True)
    if info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]:
        raise ValueError(f"the saved transformer does not load cleanly into the official class: {info}")
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(model, subfolder="scheduler")
    pipe = NAGFluxPipeline(
        scheduler=scheduler, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
        transformer=transformer.eval(),
    )
    if pipe.vae_scale_factor != vae_scale_factor:
        raise ValueError(f"settings assume vae_scale_factor {vae_scale_factor}, the pipeline has {pipe.vae_scale_factor}")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def probe_single_blocks(transformer, batch_size: int, text_length: int, diffs: List[float]) -> list:
    """Hooks that append to ``diffs`` the halves' image-token difference around each single-stream block, first call only."""
    blocks = transformer.single_transformer_blocks

    def record(hidden_states: torch.Tensor, block_index: int) -> None:
        if len(diffs) == block_index and hidden_states.shape[0] == 2 * batch_size:
            image = hidden_states[:, text_length:]
            diffs.append((image[:batch_size] - image[batch_size:]).abs().max().item())

    first = blocks[0].register_forward_pre_hook(lambda module, args, kwargs: record(kwargs["hidden_states"], 0), with_kwargs=True)
    after = [block.register_forward_hook(lambda module, args, output, i=i: record(output, i + 1)) for i, block in enumerate(blocks)]
    return [first, *after]


def run(pipe, inputs: Dict[str, torch.Tensor], height: int, width: int, spec: dict) -> Dict[str, torch.Tensor]:
    """One pipeline call as ``spec`` says; its latents, and the probe when asked for."""
    tensors = {argument: inputs[key] for argument, key in spec.get("tensors", {}).items()}
    latents = inputs["latents"]
    diffs: List[float] = []
    handles = probe_single_blocks(pipe.transformer, latents.shape[0], inputs["prompt_embeds"].shape[1], diffs) if spec.get("probe") else []
    try:
        out = pipe(latents=latents, height=height, width=width, output_type="latent", return_dict=False, **tensors, **spec["kwargs"])[0]
    finally:
        for handle in handles:
            handle.remove()
    result = {"latents": out}
    if handles:
        result["probe"] = torch.tensor(diffs, dtype=torch.float64)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official", required=True, help="root of the official repository (holds src/)")
    parser.add_argument("--model", required=True, help="folder with transformer/ and scheduler/ saved by diffusers")
    parser.add_argument("--inputs", required=True, help="safetensors with latents and the embeddings the runs name")
    parser.add_argument("--settings", required=True, help="JSON: height, width, vae_scale_factor, runs")
    parser.add_argument("--out", required=True, help="safetensors to write, one entry per run")
    args = parser.parse_args()

    with open(args.settings) as f:
        settings = json.load(f)
    torch.use_deterministic_algorithms(True)
    pipe = load_pipeline(args.official, args.model, settings["vae_scale_factor"])
    inputs = load_file(args.inputs)
    out = {}
    for name, spec in settings["runs"].items():
        for key, value in run(pipe, inputs, settings["height"], settings["width"], spec).items():
            out[name if key == "latents" else f"{name}.{key}"] = value.contiguous()
    save_file(out, args.out)


if __name__ == "__main__":
    main()
