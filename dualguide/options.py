"""The command-line vocabulary the front ends share: option value types, the option groups of a generation
(model, guidance, task), one-line parse errors, and the parser of a bulk job line's settings.

The command builds its subcommands from these groups; the browser explorer parses ``dualguide generate``
command lines with them, so an image from the page equals the one its shown command writes; bulk jobs and
eval check each line's and mode's settings with the same value types. Loads nothing heavy.
"""

from __future__ import annotations

import argparse
import math
import re
from typing import Callable, List, Mapping, Optional, Tuple

from .generation.errors import one_line
from .generation.limits import Limits
from .generation.settings import SEED_MAX, TERMS

LINE_SETTINGS = ("steps", "size", "sampler", "schedule")  # with every guidance option: what a .jsonl line may set


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors: ``dualguide: error: <message>`` and status 2, no usage block."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"dualguide: error: {one_line(message)}\n")


class RaisingParser(argparse.ArgumentParser):
    """argparse whose errors raise ValueError (for settings read from files, modes and the page)."""

    def error(self, message: str):  # type: ignore[override]
        raise ValueError(message)


def whole(low: int, high: Optional[int] = None, describe: str = "") -> Callable[[str], int]:
    """An argparse type: an integer in ``low..high``."""
    wanted = describe or (f"a whole number >= {low}" if high is None else f"a whole number in {low}..{high}")

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}")
        return value

    return parse


def number(low: float = -math.inf, high: float = math.inf, low_open: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite float in ``[low, high]`` (``(low, high]`` when ``low_open``); NaN and inf refused."""
    if high < math.inf:
        wanted = f"a number in {'(' if low_open else '['}{low:g}, {high:g}]"
    else:
        wanted = f"a finite number {'>' if low_open else '>='} {low:g}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}") from None
        too_low = value <= low if low_open else value < low
        if not math.isfinite(value) or too_low or value > high:
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}")
        return value

    return parse


def interval(text: str) -> Tuple[float, float]:
    """An argparse type: ``START:END`` fractions of the schedule with ``0 <= START <= END <= 1``."""
    wanted = f"START:END fractions with 0 <= START <= END <= 1, such as 0:0.5, got {text!r}"
    try:
        start, end = (float(part) for part in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {wanted}") from None
    if not (math.isfinite(start) and math.isfinite(end) and 0.0 <= start <= end <= 1.0):
        raise argparse.ArgumentTypeError(f"expected {wanted}")
    return start, end


def size(text: str) -> Tuple[int, int]:
    """An argparse type: ``64`` or ``WIDTHxHEIGHT`` in pixels, each >= 1."""
    wanted = f"expected a size in pixels such as 64 or 64x96 (WIDTHxHEIGHT, each >= 1), got {text!r}"
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        raise argparse.ArgumentTypeError(wanted) from None
    if len(parts) not in (1, 2) or min(parts) < 1:
        raise argparse.ArgumentTypeError(wanted)
    return (parts[0], parts[-1])


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    """``--model``, ``--device``, ``--dtype``, ``--allow-pickle``: which model, how it loads and where it runs."""
    parser.add_argument("--model", default=None, help="hub id, diffusers folder or .safetensors file (default: the embedded model)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"), default="auto")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="load a pickle-based --model file (.ckpt, .pt, .pth, .bin), which can run code: only a file you trust")  # fmt: skip


def add_limit_arguments(parser: argparse.ArgumentParser) -> None:
    """The upper bounds a run is held to (checked before any model loads)."""
    bounds = Limits()
    limits = parser.add_argument_group("bounds (checked before the model loads)")
    limits.add_argument("--max-side", type=whole(1), default=None, metavar="PX", help=f"largest image side (default {bounds.max_side})")
    limits.add_argument("--max-steps", type=whole(1), default=None, metavar="N", help=f"most sampling steps (default {bounds.max_steps})")
    limits.add_argument("--max-batch", type=whole(1), default=None, metavar="N",
                        help=f"most images in one pipeline call (default {bounds.max_batch})")  # fmt: skip
    limits.add_argument("--max-images", type=whole(1), default=None, metavar="N", help=f"most images in one run (default {bounds.max_images})")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The model, sampling, seed, output and bound options of every generating subcommand."""
    add_device_arguments(parser)
    parser.add_argument("--sampler", default=None, help="k-diffusion sampler name (see `dualguide samplers`)")
    parser.add_argument("--schedule", default=None, help="sigma schedule: model, karras, exponential")
    parser.add_argument("--steps", type=whole(1), default=None, help="sampling steps (>= 1)")
    parser.add_argument("--size", type=size, default=None, help="pixels, e.g. 64 or 1024x768")
    parser.add_argument("--seed", type=whole(0, SEED_MAX, "a whole number in 0..2**64-1"), default=0,
                        help="seed of the first image; the others get seed+1, seed+2, ... (default 0)")
    parser.add_argument("--negative", default=None, help="negative prompt (CFG)")
    parser.add_argument("--out", default="outputs", help="output folder (made if missing)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the UNet, guidance hooks included: each new setting compiles first (minutes); for long GPU jobs")
    add_limit_arguments(parser)


def add_guidance_arguments(parser: argparse.ArgumentParser) -> None:
    """The scales, layers, NAG settings and active intervals of the guidance terms."""
    parser.add_argument("--cfg", type=number(0.0), default=None,
                        help="CFG scale (<= 1: off); on Flux.1 true CFG (true_cfg_scale), on with --negative")  # fmt: skip
    parser.add_argument("--distilled-guidance", type=number(0.0), default=None, metavar="SCALE",
                        help="Flux.1's distilled guidance embedding (guidance_scale; default: the model's, dev 3.5)")  # fmt: skip
    parser.add_argument("--tpg", type=number(0.0), default=None, help="TPG scale (0: off)")
    parser.add_argument("--tpg-layers", default=None, help="TPG layer ids, e.g. d6-d23 or u0-u3,m0")
    parser.add_argument("--pag", type=number(0.0), default=None, help="PAG scale (0: off)")
    parser.add_argument("--nag", type=number(0.0), default=None, help="NAG scale (<= 1: off)")
    parser.add_argument("--nag-negative", default=None, help="NAG negative prompt")
    parser.add_argument("--nag-tau", type=number(0.0, low_open=True), default=None, help="NAG norm ratio cap (> 0)")
    parser.add_argument("--nag-alpha", type=number(0.0, 1.0), default=None, help="NAG blend (0..1)")
    for term in TERMS:
        parser.add_argument(f"--{term}-interval", type=interval, default=None, metavar="START:END",
                            help=f"fractions of the schedule where {term.upper()} is on (default 0:1)")  # fmt: skip


def add_task_arguments(parser: argparse.ArgumentParser) -> None:
    """img2img, inpainting and ControlNet inputs (absent: text to image)."""
    task = parser.add_argument_group("img2img, inpainting, ControlNet (default: text to image)")
    task.add_argument("--image", default=None, metavar="PATH", help="start from this picture (img2img; inpainting with --mask)")
    task.add_argument("--strength", type=number(0.0, 1.0, low_open=True), default=None,
                      help="how much of --image to redo, in (0, 1] (default: the pipeline's, 0.3 img2img, 0.9999 inpainting)")  # fmt: skip
    task.add_argument("--mask", default=None, metavar="PATH", help="inpainting mask of --image's size: white is repainted")
    task.add_argument("--control", default=None, metavar="PATH", help="ControlNet conditioning picture (with --controlnet)")
    task.add_argument("--controlnet", default=None, metavar="MODEL", help="ControlNet: diffusers folder or hub id")
    task.add_argument("--control-scale", type=number(0.0), default=None, help="controlnet_conditioning_scale (default 1.0)")


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    """Everything ``dualguide generate`` takes: prompts, ``--n``, model, guidance and task options."""
    parser.add_argument("prompt", nargs="+")
    parser.add_argument("--n", type=whole(1), default=1, help="images per prompt (>= 1)")
    add_model_arguments(parser)
    add_guidance_arguments(parser)
    add_task_arguments(parser)


def add_job_arguments(parser: argparse.ArgumentParser, out_help: str) -> None:
    """The options of a bulk job (``batch``, ``eval``): ``--batch-size``, ``--overwrite``, the model and guidance
    options, and a required ``--out`` (a job's folder holds its records, so it has no default)."""
    parser.add_argument("--batch-size", type=whole(1), default=1, help="images with the same settings per pipeline call (>= 1)")
    parser.add_argument("--overwrite", action="store_true", help="remake images made before in --out with other settings")
    add_model_arguments(parser)
    add_guidance_arguments(parser)
    for action in parser._actions:
        if action.dest == "out":
            action.required, action.default, action.help = True, None, out_help


def line_option_parser() -> Tuple[argparse.ArgumentParser, List[str]]:
    """The parser of a bulk job line's (or an eval mode's) settings, and their names (dests such as ``tpg_layers``)."""
    guidance = RaisingParser(add_help=False)
    add_guidance_arguments(guidance)
    parser = RaisingParser(add_help=False)
    add_model_arguments(parser)
    add_guidance_arguments(parser)
    names = list(LINE_SETTINGS) + [action.dest for action in guidance._actions if action.dest != "negative"]
    return parser, names


def parse_setting(parser: argparse.ArgumentParser, name: str, text: str) -> object:
    """The value of setting ``name`` (a dest) written as ``text``, parsed as its flag; ValueError with the reason."""
    try:
        return getattr(parser.parse_args([f"--{name.replace('_', '-')}={text}"]), name)
    except ValueError as error:
        raise ValueError(re.sub(r"^argument [^:]*: ", "", str(error))) from None


def with_settings(options: Mapping[str, object], settings: Mapping[str, str], parser: argparse.ArgumentParser) -> argparse.Namespace:
    """``options`` with the written ``settings`` (dest -> text) parsed over them; ValueError naming the first bad one."""
    merged = argparse.Namespace(**options)
    for name, text in settings.items():
        try:
            setattr(merged, name, parse_setting(parser, name, text))
        except ValueError as error:
            raise ValueError(f"{name.replace('_', '-')}: {error}") from None
    return merged


__all__ = [
    "ArgumentParser", "LINE_SETTINGS", "RaisingParser", "add_device_arguments", "add_generate_arguments", "add_limit_arguments",
    "add_guidance_arguments", "add_job_arguments", "add_model_arguments", "add_task_arguments", "interval",
    "line_option_parser", "number", "parse_setting", "size", "whole", "with_settings",
]  # fmt: skip
