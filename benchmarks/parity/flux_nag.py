"""Parity of this project's Flux NAG with the official NAG Flux pipeline, on tiny random Flux transformers.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/parity/flux_nag.py \\
        [--reference-python /work/nagref/venv/bin/python] [--official /work/nagref/official]

The official code (ChenDarYen/Normalized-Attention-Guidance, ``src/``) needs diffusers 0.34, so it runs out of tree
in its own environment (the reference venv) through ``official_flux_nag.py`` beside this file; this script builds
the models, saves them with the seeded inputs to a temporary folder, calls that script, runs the project's side here
and prints the largest absolute difference of the final latents per row. Reference venv, once::

    python3 -m venv /work/nagref/venv
    /work/nagref/venv/bin/pip install diffusers==0.34.0 transformers==4.53.3 huggingface_hub==0.34.4 \\
        tokenizers==0.21.4 torch==2.14.1 safetensors numpy sentencepiece protobuf accelerate
    mkdir -p /work/nagref/official && git -C <NAG repo> archive HEAD src | tar -x -C /work/nagref/official

Cases: a FLUX.1-dev-like transformer (guidance embedding, dynamically shifted schedule) and a FLUX.1-schnell-like
one (no guidance embedding, shift 1), ``dualguide.tiny``'s Flux configs cut to 2 double + 2 single blocks; batch 2,
8 text tokens, 128 px (8 x 8 packed tokens: FluxPipeline's ``vae_scale_factor`` is 8 without a VAE). Rows: diffusers' ``FluxPipeline`` of the
project venv against the official pipeline with NAG off and with its own two-call true CFG (sanity: the two
environments agree), then ``dualguide.FluxTPGPipeline`` with NAG off, true CFG and NAG (nag_end 1.0 and 0.5, 2-4
steps, and one row with tau low enough to clamp). "NAG effect" is how far the official NAG run lies from the
official run without NAG, so a row's difference can be read against it. Exits 1 when an available row differs by
more than 1e-4 or raises ("error"; the message is printed); a project row that cannot run yet reads "not available".

Official semantics a port has to match: ``nag_end`` turns NAG off from the first step whose scheduler timestep
``t < (1 - nag_end) * 1000`` (the shifted sigma, strict: schnell's t = 500 at nag_end 0.5 still guides); the NAG
negative rows carry their own pooled embeds in ``temb``, so in the single-stream blocks their image tokens (tiled
from the positive rows') diverge from the positive rows' after the first block, and each guided image token is
extrapolated against that diverged partner. The probe at the end shows it: the halves' image tokens differ from
the first single block on, and not at all when the negative pooled embeds equal the positive ones. The official
pipeline cannot combine NAG with its true CFG (the negative call fails: an assertion in the NAG processor at batch
1, a temb shape error at batch 2), so no row does.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from typing import Dict, List, Optional, Tuple

import torch
from safetensors.torch import load_file, save_file

TOLERANCE = 1e-4
HERE = os.path.dirname(os.path.abspath(__file__))
BATCH, TEXT_TOKENS, SIDE, VAE_SCALE_FACTOR = 2, 8, 128, 8  # FluxPipeline's factor without a VAE
GUIDANCE, TRUE_CFG = 3.5, 4.0
NAG = dict(nag_scale=3.0, nag_tau=2.5, nag_alpha=0.25)
NAG_CLAMP = dict(nag_scale=3.0, nag_tau=1.05, nag_alpha=0.5)
STEPS = (2, 3, 4)
NAG_ENDS = (1.0, 0.5)
CASES = {"dev-like": "dev", "schnell-like": "schnell"}  # the tiny Flux variant of each case


def build_case(case: str, seed: int):
    """The case's transformer (2 double + 2 single blocks, seeded random weights) and its variant's scheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    from dualguide.tiny import flux_scheduler_config, tiny_flux_transformer_config

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(**tiny_flux_transformer_config(CASES[case], num_layers=2, num_single_layers=2))
    return transformer.eval(), FlowMatchEulerDiscreteScheduler(**flux_scheduler_config(CASES[case]))


def make_inputs(config, seed: int) -> Dict[str, torch.Tensor]:
    """Packed initial latents and the positive, CFG-negative and NAG-negative embeddings for a transformer of
    ``config``, all from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    tokens = (SIDE // (2 * VAE_SCALE_FACTOR)) ** 2

    def draw(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator)

    inputs = {"latents": draw(BATCH, tokens, config.in_channels)}
    for prefix in ("", "negative_", "nag_negative_"):
        inputs[f"{prefix}prompt_embeds"] = draw(BATCH, TEXT_TOKENS, config.joint_attention_dim)
        inputs[f"{prefix}pooled_prompt_embeds"] = draw(BATCH, config.pooled_projection_dim)
    return inputs


POSITIVE = {"prompt_embeds": "prompt_embeds", "pooled_prompt_embeds": "pooled_prompt_embeds"}
CFG_NEGATIVE = {"negative_prompt_embeds": "negative_prompt_embeds", "negative_pooled_prompt_embeds": "negative_pooled_prompt_embeds"}
NAG_NEGATIVE = {"nag_negative_prompt_embeds": "nag_negative_prompt_embeds",
                "nag_negative_pooled_prompt_embeds": "nag_negative_pooled_prompt_embeds"}  # fmt: skip


def runs() -> Dict[str, dict]:
    """Every row's pipeline call, keyed by its name: scalar kwargs and the input tensors it passes."""
    table = {}
    for steps in STEPS:
        table[f"off/{steps}"] = dict(kwargs=dict(num_inference_steps=steps, guidance_scale=GUIDANCE, nag_scale=1.0), tensors=POSITIVE)
        for end in NAG_ENDS:
            table[f"nag/{end}/{steps}"] = dict(kwargs=dict(num_inference_steps=steps, guidance_scale=GUIDANCE, nag_end=end, **NAG),
                                               tensors={**POSITIVE, **NAG_NEGATIVE})  # fmt: skip
    table["cfg/3"] = dict(kwargs=dict(num_inference_steps=3, guidance_scale=GUIDANCE, true_cfg_scale=TRUE_CFG, nag_scale=1.0),
                          tensors={**POSITIVE, **CFG_NEGATIVE})  # fmt: skip
    table["clamp/1.0/3"] = dict(kwargs=dict(num_inference_steps=3, guidance_scale=GUIDANCE, nag_end=1.0, **NAG_CLAMP),
                                tensors={**POSITIVE, **NAG_NEGATIVE})  # fmt: skip
    return table


def probe_runs() -> Dict[str, dict]:
    """One-step NAG runs whose single-stream halves the official script records: with the NAG-negative pooled
    embeds, and with the positive pooled embeds in their place."""
    kwargs = dict(num_inference_steps=1, guidance_scale=GUIDANCE, **NAG)
    same_pooled = {**POSITIVE, **NAG_NEGATIVE, "nag_negative_pooled_prompt_embeds": "pooled_prompt_embeds"}
    return {"probe/negative-pooled": dict(kwargs=kwargs, tensors={**POSITIVE, **NAG_NEGATIVE}, probe=True),
            "probe/positive-pooled": dict(kwargs=kwargs, tensors=same_pooled, probe=True)}  # fmt: skip


def run_official(python: str, official: str, folder: str, specs: Dict[str, dict]) -> Dict[str, torch.Tensor]:
    """The official pipeline's outputs for ``specs`` (model and inputs already in ``folder``), from the reference venv."""
    settings = os.path.join(folder, "settings.json")
    with open(settings, "w") as f:
        json.dump(dict(height=SIDE, width=SIDE, vae_scale_factor=VAE_SCALE_FACTOR, runs=specs), f)
    out = os.path.join(folder, "official.safetensors")
    command = [python, os.path.join(HERE, "official_flux_nag.py"), "--official", official, "--model", folder,
               "--inputs", os.path.join(folder, "inputs.safetensors"), "--settings", settings, "--out", out]  # fmt: skip
    subprocess.run(command, check=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    return load_file(out)


def project_pipelines(transformer, scheduler) -> Dict[str, object]:
    """The project-side pipelines by side: diffusers' FluxPipeline and, when importable,
    ``dualguide.FluxTPGPipeline``; a missing one maps to "not available" (the reason is printed)."""
    from diffusers import FluxPipeline

    components = dict(scheduler=scheduler, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                      tokenizer_2=None, transformer=transformer)  # fmt: skip
    found: Dict[str, object] = {"diffusers": FluxPipeline(**components)}
    try:
        from dualguide import FluxTPGPipeline

        found["dualguide"] = FluxTPGPipeline(**components)
    except (ImportError, TypeError) as error:
        print(f"dualguide.FluxTPGPipeline: not available ({type(error).__name__}: {error})")
        found["dualguide"] = "not available"
    for pipe in found.values():
        if not isinstance(pipe, str):
            if pipe.vae_scale_factor != VAE_SCALE_FACTOR:
                raise ValueError(f"the inputs assume vae_scale_factor {VAE_SCALE_FACTOR}, {type(pipe).__name__} has {pipe.vae_scale_factor}")
            pipe.set_progress_bar_config(disable=True)
    return found


def call(pipe, inputs: Dict[str, torch.Tensor], spec: dict, project: bool) -> torch.Tensor:
    """``pipe`` on the spec's tensors and kwargs; diffusers' pipeline gets no NAG arguments, ours gets tpg_scale=0."""
    kwargs = dict(spec["kwargs"])
    if project:
        kwargs["tpg_scale"] = 0.0
    else:
        kwargs = {key: value for key, value in kwargs.items() if not key.startswith("nag_")}
    tensors = {argument: inputs[key] for argument, key in spec["tensors"].items()}
    return pipe(latents=inputs["latents"], height=SIDE, width=SIDE, output_type="latent", return_dict=False, **tensors, **kwargs)[0]


def difference(pipe, inputs: Dict[str, torch.Tensor], spec: dict, project: bool, reference: torch.Tensor) -> object:
    """The largest absolute difference of ``pipe``'s latents from ``reference``, or "error" when the call raises
    (printed; it fails the run as a difference would)."""
    try:
        with torch.no_grad():
            return (call(pipe, inputs, spec, project) - reference).abs().max().item()
    except Exception as error:  # noqa: BLE001 - one row's failure is reported in the table, the other rows still run
        print(f"{type(pipe).__name__} {spec['kwargs']}: {type(error).__name__}: {error}")
        return "error"


def rows_for(name: str) -> List[str]:
    """Which project sides a run is compared on: diffusers only where NAG is off."""
    return ["diffusers", "dualguide"] if name.startswith(("off/", "cfg/")) else ["dualguide"]


def compare_case(case: str, seed: int, python: str, official: str) -> Tuple[List[tuple], tuple]:
    """This case's table rows (case, side, run, steps, nag_end, difference or reason, NAG effect) and the probes:
    the two probe runs' half differences and how far apart their latents lie."""
    transformer, scheduler = build_case(case, seed)
    inputs = make_inputs(transformer.config, seed + 1)
    specs = {**runs(), **probe_runs()}
    with tempfile.TemporaryDirectory() as folder:
        transformer.save_pretrained(os.path.join(folder, "transformer"))
        scheduler.save_pretrained(os.path.join(folder, "scheduler"))
        save_file(inputs, os.path.join(folder, "inputs.safetensors"))
        reference = run_official(python, official, folder, specs)
    pipes = project_pipelines(transformer, scheduler)
    rows = []
    for name, spec in runs().items():
        kind, *_ = name.split("/")
        steps = spec["kwargs"]["num_inference_steps"]
        end = spec["kwargs"].get("nag_end", "")
        effect = ""
        if kind in ("nag", "clamp"):
            effect = f"{(reference[name] - reference[f'off/{steps}']).abs().max().item():.3g}"
        for side in rows_for(name):
            pipe = pipes[side]
            result = pipe if isinstance(pipe, str) else difference(pipe, inputs, spec, side == "dualguide", reference[name])
            rows.append((case, side, kind, steps, end, result, effect))
    negative, positive = (reference[f"{name}.probe"].tolist() for name in probe_runs())
    pooled_effect = (reference["probe/negative-pooled"] - reference["probe/positive-pooled"]).abs().max().item()
    return rows, (negative, positive, pooled_effect)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference-python", default="/work/nagref/venv/bin/python", help="python of the reference venv")
    parser.add_argument("--official", default="/work/nagref/official", help="root of the official repository (holds src/)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.use_deterministic_algorithms(True)
    rows, probes = [], {}
    for index, case in enumerate(CASES):
        case_rows, probes[case] = compare_case(case, args.seed + 10 * index, args.reference_python, args.official)
        rows.extend(case_rows)

    print(f"{'case':<13} {'project side':<12} {'run':<6} {'steps':>5} {'nag_end':>7}  {'max |diff|':<12} NAG effect")
    failed = False
    for case, side, kind, steps, end, result, effect in rows:
        if isinstance(result, float):
            failed = failed or not result <= TOLERANCE
            result = f"{result:.3g}"
        failed = failed or result == "error"
        print(f"{case:<13} {side:<12} {kind:<6} {steps:>5} {end!s:>7}  {result:<12} {effect}")
    print("\nofficial single-stream blocks, first step: max |positive half - negative half| of the image tokens "
          "(entering block 0, then leaving each block); with the NAG-negative pooled embeds / with the positive pooled "
          "embeds in their place; max |latent difference| of the two one-step runs:")  # fmt: skip
    for case, (negative, positive, pooled_effect) in probes.items():
        halves = " / ".join(" ".join(f"{d:.3g}" for d in diffs) for diffs in (negative, positive))
        print(f"  {case:<13} {halves:<40} {pooled_effect:.3g}")
    if failed:
        print(f"FAILED: a row differs by more than {TOLERANCE} or raised")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
