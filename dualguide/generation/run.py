"""Running generations: check the settings and the files they name, load the task's pipeline, make a prompt's
images from per-image seeds."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence

from . import models
from .errors import UsageError, one_line
from .images import check_output_folder
from .limits import Limits, check_counts, check_settings
from .progress import StepProgress
from .settings import call_arguments, check_names, check_seeds, generators
from .tasks import Task, TaskError, read_task, task_arguments, task_pipeline


@dataclass
class Prepared:
    """A loaded pipeline ready for a run: the model as named, its pipeline arguments, the pipeline, the task."""

    model: str
    kwargs: Dict[str, object]
    pipe: object
    task: Task


def prepare(options: Mapping[str, object], images: int = 1, per_call: int = 1, call_option: str = "--n",
            seeds: Optional[int] = None) -> Prepared:  # fmt: skip
    """Check the options (named as the command's flags: ``model``, ``seed``, ``out``, ``image``, ``steps``, ...)
    and the files they name, then load the model; UsageError before any load for anything wrong.

    ``images`` is the number of images of the run, ``per_call`` the most of them in one pipeline call (set by
    ``call_option``); both are held to the bounds of ``Limits.from_options(options)``, as are size and steps.
    ``seeds`` images take seeds ``seed, seed+1, ...`` (default: every image its own).

    The pipeline is the task's (img2img, inpainting, ControlNet) when ``image`` / ``control`` name one.
    """
    limits = Limits.from_options(options)
    check_counts(limits, per_call, images, call_option)
    check_seeds(options["seed"], images if seeds is None else seeds)
    check_output_folder(options["out"])
    try:
        task = read_task(options.get("image"), options.get("mask"), options.get("strength"), options.get("control"),
                         options.get("controlnet"), options.get("control_scale"))  # fmt: skip
    except TaskError as error:
        raise UsageError(str(error)) from None
    allow_pickle = bool(options.get("allow_pickle"))
    model, settings, family = models.model_and_settings(options.get("model"), allow_pickle)
    kwargs = call_arguments(options, settings)
    check_names(kwargs)
    check_settings(limits, kwargs)
    pipe = models.load_model(model, options.get("device", "auto"), options.get("dtype", "auto"), bool(options.get("compile")),
                             allow_pickle, family)  # fmt: skip
    try:
        return Prepared(model, kwargs, task_pipeline(pipe, task), task)
    except TaskError as error:
        raise UsageError(str(error)) from None


def generate_images(pipe, prompt: str, seeds: Sequence[int], kwargs: Dict[str, object], task: Task,
                    progress: Optional[StepProgress] = None, label: str = "") -> List[object]:  # fmt: skip
    """The images of ``prompt``, one per seed (image ``k`` from its own generator seeded ``seeds[k]``), moving
    ``progress`` (the run's one bar, showing ``label``) step by step; the pipeline's own bar stays off.

    A ValueError/TypeError of the pipeline (bad settings) becomes a UsageError.
    """
    pipe.set_progress_bar_config(disable=True)
    arguments = task_arguments(task, kwargs, pipe)
    if progress is not None:
        arguments = {**arguments, **progress.call_arguments(label or prompt, len(seeds))}
    try:
        images = pipe(prompt=prompt, generator=generators(seeds), num_images_per_prompt=len(seeds), **arguments).images
    except (ValueError, TypeError) as error:
        raise UsageError(one_line(str(error))) from None
    if progress is not None:
        progress.call_done()
    return images
