"""The explorer's controls -> one ``dualguide generate`` command per mode -> the pipeline arguments.

The command is the single source of truth: each mode's argument list is parsed by the command's
parser (built from ``dualguide.options``) and turned into pipeline arguments by
``generation.call_arguments`` over the model's recommended settings, so an image from the page equals the
image the shown command writes.
No torch, no gradio here.
"""

from __future__ import annotations

import argparse
import shlex
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from .. import options
from ..defaults import DEFAULT_LAYERS
from ..generation.errors import UsageError, one_line
from ..generation.images import slug
from ..generation.limits import Limits, check_settings
from ..generation.settings import PANEL_SCALE, call_arguments, cfg_argument, check_names, image_seed

DEFAULT_PROMPT = "a red circle on a blue background"
TERMS = ("cfg", "tpg", "pag", "nag")
TERM_NAMES = {"cfg": "CFG", "tpg": "TPG", "pag": "PAG", "nag": "NAG"}
OFF = {"cfg": 1.0, "tpg": 0.0, "pag": 0.0, "nag": 1.0}  # the scale that turns each term off
DEFAULT_PAG_LAYERS = DEFAULT_LAYERS["sdxl"]["pag"]  # the pipeline's own default, unless the model's family has another

# Modes compared side by side from the same seed: name -> the terms on.
MODES: Dict[str, Tuple[str, ...]] = {
    "none": (),
    "CFG": ("cfg",),
    "CFG+TPG": ("cfg", "tpg"),
    "CFG+NAG": ("cfg", "nag"),
    "CFG+TPG+NAG": ("cfg", "tpg", "nag"),
    "CFG+PAG": ("cfg", "pag"),
    "TPG": ("tpg",),
    "NAG": ("nag",),
    "TPG+NAG": ("tpg", "nag"),
    "CFG+TPG+PAG+NAG": ("cfg", "tpg", "pag", "nag"),
}
DEFAULT_MODES = ("none", "CFG", "CFG+TPG", "CFG+NAG", "CFG+TPG+NAG")

# What NAG is for: a negative prompt that NAG acts on with CFG off (where CFG's negative cannot act) and beside CFG.
# Each example: (prompt, CFG negative, NAG negative); the embedded model's leave the colour open and negate one
# colour with a partial prompt of its grammar ("a black shape": any black shape).
NAG_EXAMPLE_MODES = ("none", "CFG", "CFG+NAG", "NAG")  # in the order of MODES, which is the order they run
NAG_EXAMPLES = {
    "embedded": (
        ("a star on a white background", "", "a black shape"),
        ("a square on a green background", "", "a red shape"),
    ),
    "checkpoint": (("a portrait photo of a man, studio light", "", "glasses"), ("a bowl of fruit on a table", "", "apples")),
}


class SettingsError(ValueError):
    """A control value the command would refuse; the message is shown in the page."""


@dataclass
class Controls:
    """Every control of the page, as plain Python values."""

    prompt: str = DEFAULT_PROMPT
    negative: str = ""
    nag_negative: str = ""
    seed: object = 0
    steps: object = 25
    sampler: str = "euler"
    schedule: str = "model"
    size: str = "64x64"
    cfg: float = 5.0
    cfg_interval: Tuple[float, float] = (0.0, 1.0)
    tpg: float = 3.0
    tpg_layers: str = "d6-d23"
    tpg_interval: Tuple[float, float] = (0.0, 1.0)
    pag: float = PANEL_SCALE
    pag_layers: str = DEFAULT_PAG_LAYERS
    pag_beta: float = 1.0  # SoftPAG: 1 is PAG
    pag_interval: Tuple[float, float] = (0.0, 1.0)
    nag: float = PANEL_SCALE
    nag_tau: float = 2.5
    nag_alpha: float = 0.5
    nag_interval: Tuple[float, float] = (0.0, 1.0)
    modes: Sequence[str] = DEFAULT_MODES


@dataclass
class ModeRun:
    """One mode of a run: what the command line and the pipeline call are."""

    label: str
    terms: Tuple[str, ...]
    argv: List[str]  # after ``dualguide``: ``generate ... -- PROMPT``
    kwargs: Dict[str, object]  # the pipeline arguments the command computes from ``argv``
    prompt: str
    seeds: List[int]
    softpag_beta: Optional[float] = None  # apply_softpag(pipe, beta) before the call
    notes: List[str] = field(default_factory=list)  # what the command line cannot say

    @property
    def steps(self) -> int:
        return int(self.kwargs.get("num_inference_steps", 25))


def controls_from_settings(settings: Dict[str, object], pag_layers: str = DEFAULT_PAG_LAYERS) -> Controls:
    """The page's initial controls: the model's recommended settings (as ``dualguide generate`` uses them)."""
    width, height = settings.get("width"), settings.get("height")
    controls = Controls(
        steps=int(settings.get("num_inference_steps", 25)),
        sampler=str(settings.get("sampler", "euler")),
        schedule=str(settings.get("sigma_schedule", "model")),
        size=f"{width}x{height}" if width and height else "1024x1024",
        cfg=float(settings.get(cfg_argument(settings), 5.0)),
        tpg=float(settings.get("tpg_scale", 3.0)),
        tpg_layers=str(settings.get("tpg_applied_layers_index", "d6-d23")),
        pag=float(settings.get("pag_scale") or PANEL_SCALE),
        pag_layers=str(settings.get("pag_applied_layers_index", pag_layers)),
        nag=float(settings["nag_scale"]) if float(settings.get("nag_scale", 1.0) or 1.0) > 1.0 else PANEL_SCALE,
        nag_tau=float(settings.get("nag_tau", 2.5)),
        nag_alpha=float(settings.get("nag_alpha", 0.5)),
    )
    for term in TERMS:
        interval = settings.get(f"{term}_interval")
        if interval is not None:
            setattr(controls, f"{term}_interval", (float(interval[0]), float(interval[1])))
    return controls


def nag_examples(embedded: bool) -> List[list]:
    """The page's example rows ``[prompt, negative, nag_negative, modes]`` that show what NAG's negative does."""
    rows = NAG_EXAMPLES["embedded" if embedded else "checkpoint"]
    return [[prompt, negative, nag_negative, list(NAG_EXAMPLE_MODES)] for prompt, negative, nag_negative in rows]


def _number(value) -> str:
    """A number as the command line writes it: ``4`` for 4.0, else ``repr`` (exact round trip)."""
    value = float(value)
    return str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)


def _whole(value, name: str) -> str:
    if value is None or (isinstance(value, str) and not value.strip()):
        raise SettingsError(f"{name}: enter a whole number")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise SettingsError(f"{name}: expected a whole number, got {value!r}") from None
    if not number.is_integer():
        raise SettingsError(f"{name}: expected a whole number, got {value!r}")
    return str(int(value)) if isinstance(value, int) else str(int(number))


class GenerateParser:
    """The parser of a ``dualguide generate`` command line, with errors raised as SettingsError for the page."""

    def __init__(self) -> None:
        self.parser = options.RaisingParser(prog="dualguide generate")
        options.add_generate_arguments(self.parser)

    def has_option(self, option: str) -> bool:
        return option in self.parser._option_string_actions

    def parse(self, argv: Sequence[str]) -> argparse.Namespace:
        """``argv`` as after ``dualguide``: ``generate``, then its options and prompt."""
        if not argv or argv[0] != "generate":
            raise SettingsError(f"not a generate command: {' '.join(argv[:1])!r}")
        try:
            return self.parser.parse_args(list(argv[1:]))
        except ValueError as error:
            raise SettingsError(one_line(str(error))) from None


def _interval_text(interval: Sequence[float]) -> str:
    return f"{_number(interval[0])}:{_number(interval[1])}"


def _default_interval(settings: Dict[str, object], term: str) -> Tuple[float, float]:
    interval = settings.get(f"{term}_interval")
    return (0.0, 1.0) if interval is None else (float(interval[0]), float(interval[1]))


def _size_tuple(text: str) -> Optional[Tuple[int, int]]:
    try:
        return options.size(text.strip())
    except argparse.ArgumentTypeError:
        return None  # the parser reports it


def plan(controls: Controls, settings: Dict[str, object], server_flags: Sequence[str] = (),
         pag_layers: str = DEFAULT_PAG_LAYERS) -> List[ModeRun]:  # fmt: skip
    """One ``ModeRun`` per selected mode (in ``MODES`` order); ``SettingsError`` for anything the command refuses.

    ``server_flags`` are the model options the server was started with (``--model``, ``--device``, ...),
    repeated in every command; ``pag_layers`` is the PAG default of the model's family.
    """
    selected = [name for name in MODES if name in set(controls.modes or ())]
    unknown = [name for name in (controls.modes or ()) if name not in MODES]
    if unknown:
        raise SettingsError(f"unknown mode(s) {', '.join(unknown)}; valid: {', '.join(MODES)}")
    if not selected:
        raise SettingsError("choose at least one mode to compare")
    parser = GenerateParser()
    seed = _whole(controls.seed, "seed")
    common: List[str] = ["--seed", seed, *server_flags]
    steps = _whole(controls.steps, "steps")
    if steps != str(settings.get("num_inference_steps")):
        common += ["--steps", steps]
    size = (controls.size or "").strip()
    if _size_tuple(size) != ((settings.get("width"), settings.get("height")) if settings.get("width") else None):
        common += ["--size", size]
    for option, value, default in (
        ("--sampler", (controls.sampler or "").strip(), settings.get("sampler")),
        ("--schedule", (controls.schedule or "").strip(), settings.get("sigma_schedule")),
    ):
        if value != default:
            common += [option, value]
    if controls.negative:
        common += ["--negative", controls.negative]
    runs = []
    for name in selected:
        runs.append(_mode_run(parser, name, MODES[name], controls, settings, common, int(seed), pag_layers))
    return runs


def _mode_run(parser: GenerateParser, label: str, terms: Tuple[str, ...], controls: Controls, settings: Dict[str, object],
              common: List[str], seed: int, pag_default: str) -> ModeRun:  # fmt: skip
    flags: List[str] = list(common)
    notes: List[str] = []
    softpag_beta = None
    default_on = {
        "cfg": float(settings.get(cfg_argument(settings), 5.0)) > 1.0,
        "tpg": float(settings.get("tpg_scale", 3.0)) > 0.0,
        "pag": float(settings.get("pag_scale") or 0.0) > 0.0,
        "nag": bool(settings.get("do_nag", float(settings.get("nag_scale", 1.0) or 1.0) > 1.0)),
    }
    extra: Dict[str, object] = {}
    for term in TERMS:
        if term not in terms:
            if default_on[term]:
                flags += [f"--{term}", _number(OFF[term])]
            continue
        flags += [f"--{term}", _number(getattr(controls, term))]
        interval = tuple(float(v) for v in getattr(controls, f"{term}_interval"))
        if interval != _default_interval(settings, term):
            flags += [f"--{term}-interval", _interval_text(interval)]
    if "tpg" in terms and controls.tpg_layers.strip() != settings.get("tpg_applied_layers_index"):
        flags += ["--tpg-layers", controls.tpg_layers.strip()]
    if "pag" in terms:
        layers = controls.pag_layers.strip()
        if layers != settings.get("pag_applied_layers_index", pag_default):
            if parser.has_option("--pag-layers"):
                flags += ["--pag-layers", layers]
            else:
                extra["pag_applied_layers_index"] = layers
                notes.append(f"PAG layers {layers}: no command-line option; the Python call sets pag_applied_layers_index")
        beta = float(controls.pag_beta)
        if beta < 1.0:
            softpag_beta = beta
            notes.append(f"SoftPAG beta {beta:g}: no command-line option; the Python call uses apply_softpag(pipe, beta={beta!r})")
    if "nag" in terms:
        if float(controls.nag_tau) != float(settings.get("nag_tau", 2.5)):
            flags += ["--nag-tau", _number(controls.nag_tau)]
        if float(controls.nag_alpha) != float(settings.get("nag_alpha", 0.5)):
            flags += ["--nag-alpha", _number(controls.nag_alpha)]
        if controls.nag_negative:
            flags += ["--nag-negative", controls.nag_negative]
    argv = ["generate", *flags, "--", controls.prompt]
    args = parser.parse(argv)
    kwargs = call_arguments(vars(args), settings)
    try:
        check_names(kwargs)
        check_settings(Limits.from_options(vars(args)), kwargs)
    except UsageError as error:
        raise SettingsError(str(error)) from None
    kwargs.update(extra)
    seeds = [image_seed(seed, 0, 0, 1)]
    return ModeRun(label, terms, argv, kwargs, controls.prompt, seeds, softpag_beta, notes)


def command_line(run: ModeRun) -> str:
    """The ``dualguide generate`` command of ``run``, ready to paste into a shell."""
    argv = list(run.argv)
    if argv[-2] == "--" and not argv[-1].startswith("-"):
        del argv[-2]  # ``--`` is only needed before a prompt that looks like an option
    return shlex.join(["dualguide", *argv])


def commands_text(runs: Sequence[ModeRun]) -> str:
    lines = []
    for run in runs:
        lines.append(f"# {run.label}")
        lines += [f"# note: {note}" for note in run.notes]
        lines.append(command_line(run))
    return "\n".join(lines)


def python_text(runs: Sequence[ModeRun], model: str, device: str, dtype: Optional[str], allow_pickle: bool = False) -> str:
    """Python that computes the same images: load as the command does, one call per mode."""
    softpag = any(run.softpag_beta is not None for run in runs)
    lines = ["import torch", "from dualguide.loading import load_pipeline"]
    if softpag:
        lines.append("from dualguide import apply_softpag")
    dtype_argument = f", dtype=torch.{dtype}" if dtype else ""
    pickle_argument = ", allow_pickle=True" if allow_pickle else ""
    lines += ["", f"pipe = load_pipeline({model!r}, device={device!r}{dtype_argument}{pickle_argument})"]
    for run in runs:
        lines += ["", f"# {run.label}"]
        kwargs = dict(run.kwargs)
        if run.softpag_beta is not None:
            lines.append(f"apply_softpag(pipe, beta={run.softpag_beta!r})  # later calls default to pag_scale 3 on SoftPAG")
        elif softpag and "pag" not in run.terms:
            kwargs.setdefault("pag_scale", 0.0)  # apply_softpag above turned PAG on by default
        arguments = ", ".join(f"{key}={value!r}" for key, value in kwargs.items())
        generators = ", ".join(f"torch.Generator().manual_seed({seed})" for seed in run.seeds)
        lines.append(
            f"images = pipe({run.prompt!r}, generator=[{generators}], num_images_per_prompt={len(run.seeds)}, {arguments}).images"
        )
        lines.append(f"images[0].save({image_file_name(run, run.seeds[0])!r})")
    return "\n".join(lines)


def image_file_name(run: ModeRun, seed: int) -> str:
    label = "".join(c if c.isalnum() else "_" for c in run.label.lower()) or "mode"
    return f"{label}_s{seed}_{slug(run.prompt)}.png"


def metadata(run: ModeRun, model: str, seed: int) -> Dict[str, object]:
    """The PNG's ``parameters`` chunk, as ``dualguide generate`` writes it."""
    return {"prompt": run.prompt, "seed": seed, "model": model, **run.kwargs}
