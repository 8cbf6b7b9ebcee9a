"""Upper bounds a front end enforces before any model loads: image side, steps, images per pipeline call and per
run. Each bound has a flag (``--max-side`` ...) that raises it; a request over a bound is a UsageError naming the
flag and the bound."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Mapping, Optional

from .errors import UsageError


@dataclass(frozen=True)
class Limits:
    """The bounds; the defaults suit one GPU and a bulk job over many."""

    max_side: int = 4096  # pixels, width and height each
    max_steps: int = 500
    max_batch: int = 64  # images in one pipeline call
    max_images: int = 100_000  # images in one run of a command

    @classmethod
    def from_options(cls, options: Mapping[str, object]) -> "Limits":
        """The bounds the options set (``max_side`` ... as the flags' dests), the defaults for the others."""
        return cls(**{f.name: options[f.name] for f in fields(cls) if options.get(f.name) is not None})


def flag(name: str) -> str:
    """``max_side`` -> ``--max-side``."""
    return "--" + name.replace("_", "-")


def check_settings(limits: Limits, kwargs: Mapping[str, object], where: str = "") -> None:
    """UsageError when the pipeline arguments ask for a side or a step count over the bounds; ``where`` prefixes
    the message (a prompt file's ``file:line: ``)."""
    for key in ("width", "height"):
        side: Optional[object] = kwargs.get(key)
        if side is not None and int(side) > limits.max_side:
            raise UsageError(f"{where}--size: {key} {side} px is over the bound {flag('max_side')} {limits.max_side}; "
                             f"pass {flag('max_side')} to raise it")  # fmt: skip
    steps = kwargs.get("num_inference_steps")
    if steps is not None and int(steps) > limits.max_steps:
        raise UsageError(f"{where}--steps {steps}: over the bound {flag('max_steps')} {limits.max_steps}; pass {flag('max_steps')} to raise it")


def check_counts(limits: Limits, per_call: int, per_run: int, call_option: str) -> None:
    """UsageError when a pipeline call would make more than ``max_batch`` images (``call_option`` is the flag that
    sets that count, e.g. ``--n``) or the run more than ``max_images``."""
    if per_call > limits.max_batch:
        raise UsageError(f"{call_option}: {per_call} images in one pipeline call is over the bound {flag('max_batch')} "
                         f"{limits.max_batch}; pass {flag('max_batch')} to raise it")  # fmt: skip
    if per_run > limits.max_images:
        raise UsageError(f"this run would make {per_run} images, over the bound {flag('max_images')} {limits.max_images}; "
                         f"pass {flag('max_images')} to raise it")  # fmt: skip
