"""Parity of this project's Wan NAG (``NormalizedAttentionGuidance`` in diffusers' modular Wan loop) with the NAG
authors' Wan attention processor, on a tiny random Wan transformer.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/parity/wan_nag.py \\
        [--reference-python /work/nagref/venv/bin/python] [--official-wan /work/nagref/official_wan]

The reference runs out of tree in the reference venv (diffusers 0.34) through ``reference_wan_nag.py`` beside this
file: the authors' ``NAGWanAttnProcessor2_0`` (their ``nag/attention_wan_nag.py``, saved in ``--official-wan`` with
a stand-in ``ftfy`` for its unused import) on every ``attn2`` of diffusers 0.34's ``WanTransformer3DModel``, in a
loop reconstructed from diffusers 0.34 ``WanPipeline.__call__`` (their Wan pipeline and transformer files are not
available; see that script). This script builds the transformer (``dualguide.tiny``'s Wan config, 4 blocks, seeded
random weights) and a flow-matching Euler scheduler, saves it with the seeded latents and embeddings to a temporary folder, calls that script, runs
diffusers 0.42.1's modular ``WanCoreDenoiseStep`` here with the project's guider, and prints the largest absolute
difference of the final latents, float32, batch 2, 9 frames of 32 x 32 (latents 3 x 4 x 4: 12 video tokens).

Rows: ``cfg`` (no NAG: diffusers' ``ClassifierFreeGuidance`` against the reference loop with diffusers' processors,
so the two environments agree), NAG with CFG (guidance_scale 5) and CFG off (1 and 0), 2-4 steps, at nag_scale 3
and 11, and ``clamp`` (tau 1.05, where most tokens clip). "NAG effect" is how far the reference NAG run lies from
the reference run without NAG, "clamp effect" how far the clamp run lies from the same run with tau 1e6 (no token
clips). "calls/step" counts the project's transformer calls per step (rows each). Exits 1 when a row differs by more
than 1e-4.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from typing import Dict, List, Optional

import torch
from safetensors.torch import load_file, save_file

TOLERANCE = 1e-4
HERE = os.path.dirname(os.path.abspath(__file__))
BATCH, TEXT_TOKENS, LAYERS = 2, 8, 4
FRAMES, SIDE, LATENT_SHAPE = 9, 32, (3, 4, 4)  # without a VAE the modular pipeline's factors are 4 (time) and 8
NAG = dict(nag_scale=3.0, nag_tau=2.5, nag_alpha=0.25)
NAG_STRONG = dict(nag_scale=11.0, nag_tau=2.5, nag_alpha=0.25)
NAG_CLAMP = dict(nag_scale=3.0, nag_tau=1.05, nag_alpha=0.5)
NO_NAG = dict(nag_scale=1.0, nag_tau=2.5, nag_alpha=0.25)


def runs() -> Dict[str, dict]:
    """Every compared run by name: steps, guidance_scale and NAG settings."""
    table = {"cfg/3": dict(steps=3, guidance_scale=5.0, **NO_NAG)}
    for steps in (2, 4):
        table[f"nag-cfg/{steps}"] = dict(steps=steps, guidance_scale=5.0, **NAG)
        table[f"nag-no-cfg/{steps}"] = dict(steps=steps, guidance_scale=1.0, **NAG)
    table["nag-g0/3"] = dict(steps=3, guidance_scale=0.0, **NAG)
    table["nag11-cfg/3"] = dict(steps=3, guidance_scale=5.0, **NAG_STRONG)
    table["nag11-no-cfg/3"] = dict(steps=3, guidance_scale=1.0, **NAG_STRONG)
    table["clamp-cfg/3"] = dict(steps=3, guidance_scale=5.0, **NAG_CLAMP)
    table["clamp-no-cfg/3"] = dict(steps=3, guidance_scale=1.0, **NAG_CLAMP)
    return table


def reference_runs() -> Dict[str, dict]:
    """The compared runs, each NAG run's counterpart without NAG (``.off``) and each clamp run's with tau 1e6 (``.free``)."""
    table = dict(runs())
    for name, run in runs().items():
        if run["nag_scale"] > 1:
            table[f"{name}.off"] = {**run, **NO_NAG}
        if name.startswith("clamp"):
            table[f"{name}.free"] = {**run, "nag_tau": 1e6}
    return table


def build(seed: int):
    """The tiny Wan transformer (``LAYERS`` blocks, seeded random weights) and a flow-matching Euler scheduler (shift
    3, Wan2.1's 480p flow shift). Not Wan's UniPC: diffusers 0.34's and 0.42.1's UniPC flow sigmas differ (3 steps:
    timesteps 999, 856, 599 against 999, 857, 600), which would hide NAG's differences; their Euler schedules agree."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanTransformer3DModel

    from dualguide.tiny import tiny_wan_transformer_config

    torch.manual_seed(seed)
    return WanTransformer3DModel(**tiny_wan_transformer_config(num_layers=LAYERS)).eval(), FlowMatchEulerDiscreteScheduler(shift=3.0)


def make_inputs(text_dim: int, seed: int) -> Dict[str, torch.Tensor]:
    """Initial latents and the positive, CFG-negative and NAG-negative prompt embeds, all from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    inputs = {"latents": torch.randn(BATCH, 16, *LATENT_SHAPE, generator=generator)}
    for name in ("prompt_embeds", "negative_prompt_embeds", "nag_negative_prompt_embeds"):
        inputs[name] = torch.randn(BATCH, TEXT_TOKENS, text_dim, generator=generator)
    return inputs


def run_reference(python: str, official_wan: str, folder: str) -> Dict[str, torch.Tensor]:
    """The reference loop's latents for ``reference_runs`` (model and inputs already in ``folder``), from the reference venv."""
    settings = os.path.join(folder, "settings.json")
    with open(settings, "w") as f:
        json.dump({"runs": reference_runs()}, f)
    out = os.path.join(folder, "reference.safetensors")
    command = [python, os.path.join(HERE, "reference_wan_nag.py"), "--official-wan", official_wan, "--model", folder,
               "--inputs", os.path.join(folder, "inputs.safetensors"), "--settings", settings, "--out", out]  # fmt: skip
    subprocess.run(command, check=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    return load_file(out)


def guider_for(run: dict, inputs: Dict[str, torch.Tensor]):
    """diffusers' CFG guider without NAG, else the project's ``NormalizedAttentionGuidance`` with the run's settings."""
    from diffusers.guiders import ClassifierFreeGuidance

    from dualguide.guiders import NormalizedAttentionGuidance

    if run["nag_scale"] <= 1:
        return ClassifierFreeGuidance(guidance_scale=run["guidance_scale"])
    nag = {key: run[key] for key in NAG}
    return NormalizedAttentionGuidance(guidance_scale=run["guidance_scale"], nag_negative_prompt_embeds=inputs["nag_negative_prompt_embeds"], **nag)


def run_modular(pipeline, scheduler_config, run: dict, inputs: Dict[str, torch.Tensor]):
    """Final latents of diffusers' modular Wan core denoise step with the run's guider, and the rows of each
    transformer call."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipeline.update_components(guider=guider_for(run, inputs), scheduler=FlowMatchEulerDiscreteScheduler.from_config(scheduler_config))
    rows: List[int] = []
    handle = pipeline.transformer.register_forward_pre_hook(lambda module, args, kwargs: rows.append(kwargs["hidden_states"].shape[0]), with_kwargs=True)
    try:
        latents = pipeline(
            prompt_embeds=inputs["prompt_embeds"], negative_prompt_embeds=inputs["negative_prompt_embeds"], latents=inputs["latents"],
            num_inference_steps=run["steps"], height=SIDE, width=SIDE, num_frames=FRAMES, output="latents",
        )  # fmt: skip
    finally:
        handle.remove()
    return latents, rows


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference-python", default="/work/nagref/venv/bin/python", help="python of the reference venv")
    parser.add_argument("--official-wan", default="/work/nagref/official_wan", help="folder of the authors' attention_wan_nag.py and the ftfy stand-in")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from diffusers.modular_pipelines.wan.modular_blocks_wan import WanCoreDenoiseStep

    torch.use_deterministic_algorithms(True)
    transformer, scheduler = build(args.seed)
    inputs = make_inputs(transformer.config.text_dim, args.seed + 1)
    with tempfile.TemporaryDirectory() as folder:
        transformer.save_pretrained(os.path.join(folder, "transformer"))
        scheduler.save_pretrained(os.path.join(folder, "scheduler"))
        save_file(inputs, os.path.join(folder, "inputs.safetensors"))
        reference = run_reference(args.reference_python, args.official_wan, folder)
    pipeline = WanCoreDenoiseStep().init_pipeline()
    pipeline.update_components(transformer=transformer)
    pipeline.set_progress_bar_config(disable=True)

    print(f"{'run':<16} {'g':>4} {'s':>5} {'tau':>5} {'alpha':>5}  {'max |diff|':<11} {'NAG effect':<11} {'clamp effect':<12} calls/step")
    failed = False
    for name, run in runs().items():
        with torch.no_grad():
            latents, rows = run_modular(pipeline, scheduler.config, run, inputs)
        diff = (latents - reference[name]).abs().max().item()
        failed = failed or not diff <= TOLERANCE
        effect = f"{(reference[name] - reference[f'{name}.off']).abs().max().item():.3g}" if f"{name}.off" in reference else ""
        clamp = f"{(reference[name] - reference[f'{name}.free']).abs().max().item():.3g}" if f"{name}.free" in reference else ""
        calls = f"{len(rows) // run['steps']} x {rows[0]}"
        print(f"{name:<16} {run['guidance_scale']:>4g} {run['nag_scale']:>5g} {run['nag_tau']:>5g} {run['nag_alpha']:>5g}  "
              f"{diff:<11.3g} {effect:<11} {clamp:<12} {calls}")  # fmt: skip
    if failed:
        print(f"FAILED: a row differs by more than {TOLERANCE}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
