"""The plan of a batch job: every image with a stable id, its seed and settings; the pipeline calls.

An image's id is ``LLLLL_III`` (the prompt's line in the file, the image's index on that line); its seed
is the line's ``seed`` + index when the line gives one, else ``--seed`` + the image's index in the whole
plan. So an image depends only on the file and the command line, never on the number of processes,
the batch size, or which process makes it. Every process computes the same plan.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Dict, List, Optional, Sequence

from ..generation.images import slug
from .prompts import PromptLine


def canonical(value) -> str:
    """Canonical JSON (sorted keys, no spaces; tuples as lists): equal settings give equal text."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


@dataclass(frozen=True)
class ImageJob:
    """One image to make: ``settings`` are pipeline arguments (the negative prompt apart, it may differ in a call)."""

    id: str
    line: int
    index: int
    prompt: str
    negative: Optional[str]
    seed: int
    settings: Dict[str, object]
    model: str
    file: str

    def spec(self) -> Dict[str, object]:
        """What the image is made from; a manifest line with another spec for this id is a conflict."""
        return {"prompt": self.prompt, "negative": self.negative, "seed": self.seed, "model": self.model, "settings": self.settings}

    @cached_property
    def call_key(self) -> str:
        """Images with equal keys may share one pipeline call (same settings; negative prompt present or not)."""
        return canonical([self.model, self.negative is None, self.settings])


def plan_images(
    lines: Sequence[PromptLine],
    seed: int,
    n: int,
    settings_for: Callable[[PromptLine], Dict[str, object]],
    negative: Optional[str],
    model: str,
) -> List["ImageJob"]:
    """All images of the job, in file order. ``settings_for(line)``: that line's pipeline arguments."""
    jobs: List[ImageJob] = []
    for line in lines:
        settings = settings_for(line)
        line_negative = line.negative if line.negative is not None else negative
        for index in range(line.n or n):
            image_seed = line.seed + index if line.seed is not None else seed + len(jobs)
            job_id = f"{line.line:05d}_{index:03d}"
            file = f"{job_id}_s{image_seed}_{slug(line.prompt)}.png"
            jobs.append(ImageJob(job_id, line.line, index, line.prompt, line_negative, image_seed, settings, model, file))
    return jobs


def image_calls(jobs: Sequence[ImageJob], batch_size: int) -> List[List[ImageJob]]:
    """Consecutive images with the same settings, in groups of up to ``batch_size``: one pipeline call each."""
    calls: List[List[ImageJob]] = []
    for job in jobs:
        if calls and len(calls[-1]) < batch_size and calls[-1][0].call_key == job.call_key:
            calls[-1].append(job)
        else:
            calls.append([job])
    return calls
