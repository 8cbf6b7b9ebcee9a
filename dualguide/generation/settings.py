"""Generation settings: option values (named as the command's flags) -> pipeline arguments, checked names,
per-image seeds and generators, and the guidance modes of a comparison."""

from __future__ import annotations

from typing import Dict, List, Mapping, Sequence, Tuple

from .errors import UsageError

SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed takes 0 .. 2**64-1
TERMS = ("cfg", "tpg", "pag", "nag")
# Option (the flag's dest) -> pipeline argument of the same setting.
OPTION_ARGUMENTS = {
    "steps": "num_inference_steps", "cfg": "guidance_scale", "tpg": "tpg_scale", "tpg_layers": "tpg_applied_layers_index",
    "pag": "pag_scale", "nag": "nag_scale", "nag_tau": "nag_tau", "nag_alpha": "nag_alpha", "sampler": "sampler",
    "schedule": "sigma_schedule", "negative": "negative_prompt", "nag_negative": "nag_negative_prompt",
    "distilled_guidance": "guidance_scale",
}  # fmt: skip
# Where the model's settings hold ``true_cfg_scale`` (Flux.1: ``guidance_scale`` is its distilled guidance
# embedding, which only ``--distilled-guidance`` sets), ``--cfg`` sets true CFG.
TRUE_CFG_ARGUMENTS = {"cfg": "true_cfg_scale"}
PANEL_SCALE = 3.0  # PAG / NAG scale of the comparison panels when neither the model nor the command sets one
TRUE_CFG_NAG_SCALE = 5.0  # NAG scale of the true-CFG (Flux.1) panels: the official NAG Flux examples' (schnell, Kontext)
TRUE_CFG_PANEL_SCALE = 4.0  # true CFG scale of those panels when the settings leave it off


def cfg_argument(settings: Mapping[str, object]) -> str:
    """The pipeline argument ``--cfg`` sets: ``true_cfg_scale`` where ``settings`` (the model's) have one, else
    ``guidance_scale``."""
    return "true_cfg_scale" if "true_cfg_scale" in settings else "guidance_scale"


def call_arguments(options: Mapping[str, object], settings: Mapping[str, object]) -> Dict[str, object]:
    """Pipeline arguments: ``settings`` (the model's recommended ones), overridden by the options given.

    ``options`` maps flag dests (``steps``, ``size``, ``cfg``, ``tpg_layers``, ``nag_interval``, ...) to values;
    ``None`` or a missing key leaves the setting as it is. UsageError for ``--distilled-guidance`` on a model without
    true CFG (``cfg_argument``).
    """
    kwargs = dict(settings)
    true_cfg = cfg_argument(settings) == "true_cfg_scale"
    if options.get("distilled_guidance") is not None and not true_cfg:
        raise UsageError("--distilled-guidance: only guidance-distilled models (Flux.1) have a distilled guidance; use --cfg")
    for option, argument in OPTION_ARGUMENTS.items():
        value = options.get(option)
        if value is not None:
            kwargs[TRUE_CFG_ARGUMENTS.get(option, argument) if true_cfg else argument] = value
    size = options.get("size")
    if size:
        kwargs.update(width=size[0], height=size[1])
    if options.get("nag") is not None or "do_nag" not in settings:  # settings may hold NAG's scale with NAG off
        kwargs["do_nag"] = float(kwargs.get("nag_scale", 1.0)) > 1.0
    for term in TERMS:
        interval = options.get(f"{term}_interval")
        if interval is not None:
            kwargs[f"{term}_interval"] = interval
    if "nag_interval" in kwargs:  # the pipelines take nag_end or nag_interval, not both
        kwargs.pop("nag_end", None)
    return kwargs


def check_names(kwargs: Mapping[str, object]) -> None:
    """UsageError naming ``--sampler`` / ``--schedule`` when the pipeline arguments name an unknown one."""
    import samplers

    if kwargs["sampler"] not in samplers.names():
        raise UsageError(f"--sampler: unknown sampler {kwargs['sampler']!r}; valid: {', '.join(samplers.names())}")
    if kwargs["sigma_schedule"] not in samplers.SCHEDULE_NAMES:
        raise UsageError(f"--schedule: unknown schedule {kwargs['sigma_schedule']!r}; valid: {', '.join(samplers.SCHEDULE_NAMES)}")


def check_seeds(seed: int, images: int) -> None:
    """The images get seeds ``seed .. seed+images-1``; all must fit a generator seed (0..2**64-1)."""
    if seed + images - 1 > SEED_MAX:
        raise UsageError(
            f"--seed {seed}: the {images} images take seeds {seed}..{seed + images - 1}, "
            f"past 2**64-1; use a seed <= {SEED_MAX - images + 1}"
        )


def image_seed(seed: int, prompt_index: int, image_index: int, images_per_prompt: int) -> int:
    """Image ``k = prompt_index * n + image_index`` of a ``generate`` command gets seed ``seed + k``."""
    return seed + prompt_index * images_per_prompt + image_index


def generators(seeds: Sequence[int]) -> List[object]:
    """One CPU ``torch.Generator`` per image, seeded with its seed."""
    import torch

    return [torch.Generator().manual_seed(seed) for seed in seeds]


def panel_count(with_pag: bool, nag_alone: bool = False) -> int:
    """How many panels ``compare_modes`` gives: none, CFG, CFG+TPG, CFG+NAG, CFG+TPG+NAG, NAG with CFG off
    ``nag_alone`` and CFG+PAG ``with_pag`` (at most; a true-CFG model has fewer)."""
    return 5 + nag_alone + with_pag


def compare_modes(
    kwargs: Mapping[str, object], with_pag: bool, nag_alone: bool = False
) -> List[Tuple[str, Dict[str, object]]]:
    """The panels of a comparison: (label, pipeline arguments), all from the same settings and seed.

    ``nag_alone`` (the command gives it for a NAG negative prompt): a "NAG (CFG off)" panel follows "no
    guidance", NAG's negative acting where CFG's cannot, the NAG paper's headline use. A true-CFG model (Flux.1)
    has the panels of ``true_cfg_modes``."""
    if cfg_argument(kwargs) == "true_cfg_scale":
        return true_cfg_modes(kwargs, with_pag)
    cfg, tpg = kwargs["guidance_scale"], kwargs["tpg_scale"]
    nag = kwargs["nag_scale"] if float(kwargs.get("nag_scale", 1.0)) > 1.0 else PANEL_SCALE  # on, or the model's
    pag = kwargs.get("pag_scale") or PANEL_SCALE
    off = dict(kwargs, guidance_scale=1.0, tpg_scale=0.0, pag_scale=0.0, do_nag=False)
    modes = [("no guidance", off)]
    if nag_alone:
        modes.append((f"NAG {nag:g} (CFG off)", dict(off, do_nag=True, nag_scale=nag)))
    modes += [
        (f"CFG {cfg:g}", dict(off, guidance_scale=cfg)),
        (f"CFG+TPG {tpg:g}", dict(off, guidance_scale=cfg, tpg_scale=tpg)),
        (f"CFG+NAG {nag:g}", dict(off, guidance_scale=cfg, do_nag=True, nag_scale=nag)),
        ("CFG+TPG+NAG", dict(off, guidance_scale=cfg, tpg_scale=tpg, do_nag=True, nag_scale=nag)),
    ]
    if with_pag:
        modes.append((f"CFG+PAG {pag:g}", dict(off, guidance_scale=cfg, pag_scale=pag)))
    assert len(modes) == panel_count(with_pag, nag_alone)
    return modes


def true_cfg_modes(kwargs: Mapping[str, object], with_pag: bool) -> List[Tuple[str, Dict[str, object]]]:
    """The panels of a guidance-distilled model (Flux.1), where a negative prompt acts only through NAG or true CFG:
    none, NAG, true CFG, true CFG+NAG (and true CFG+PAG ``with_pag``); the distilled guidance as set in every one.

    The negatives: true CFG's is ``negative_prompt``, else the NAG one; NAG's is ``nag_negative_prompt``, else the CFG
    one (the official rule); neither given, the empty prompt. Scales: the settings', else ``TRUE_CFG_PANEL_SCALE`` and
    ``TRUE_CFG_NAG_SCALE``."""
    given = float(kwargs["true_cfg_scale"])
    cfg = given if given > 1.0 else TRUE_CFG_PANEL_SCALE
    nag = kwargs["nag_scale"] if kwargs["do_nag"] else TRUE_CFG_NAG_SCALE
    pag = kwargs.get("pag_scale") or PANEL_SCALE
    negative = kwargs.get("negative_prompt") or kwargs.get("nag_negative_prompt") or ""
    nag_negative = kwargs.get("nag_negative_prompt") or negative
    off = dict(kwargs, true_cfg_scale=1.0, negative_prompt=None, tpg_scale=0.0, pag_scale=0.0, do_nag=False)
    with_nag = dict(do_nag=True, nag_scale=nag, nag_negative_prompt=nag_negative)
    with_cfg = dict(true_cfg_scale=cfg, negative_prompt=negative)
    modes = [
        ("none", off),
        (f"NAG {nag:g}", dict(off, **with_nag)),
        (f"true CFG {cfg:g}", dict(off, **with_cfg)),
        ("true CFG+NAG", dict(off, **with_cfg, **with_nag)),
    ]
    if with_pag:
        modes.append((f"true CFG+PAG {pag:g}", dict(off, **with_cfg, pag_scale=pag)))
    return modes
