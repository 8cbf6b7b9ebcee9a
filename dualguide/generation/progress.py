"""One progress bar over a run's images x steps, on a terminal only: piped or logged stderr keeps nothing but a
failure's one line. The pipelines' own per-call bars stay off; each call moves this bar through
``callback_on_step_end`` and names the image (and mode) under way."""

from __future__ import annotations

import inspect
import sys
from typing import Dict, Mapping, Optional

DEFAULT_STEPS = 50  # diffusers' SDXL default, for a pipeline whose call does not say


def planned_steps(pipe, kwargs: Mapping[str, object]) -> int:
    """The steps of each call: ``num_inference_steps`` when given, else the default of the pipeline's call."""
    if kwargs.get("num_inference_steps") is not None:
        return int(kwargs["num_inference_steps"])
    parameter = inspect.signature(pipe.__call__).parameters.get("num_inference_steps")
    return parameter.default if parameter is not None and isinstance(parameter.default, int) else DEFAULT_STEPS


class StepProgress:
    """``images`` images of ``steps`` steps each (``total`` steps in all when calls differ in steps);
    ``call_arguments`` before each pipeline call, ``call_done`` after."""

    def __init__(self, images: int, steps: int, show: Optional[bool] = None, total: Optional[int] = None):
        self.steps, self.total = steps, images * steps if total is None else total
        self.show = sys.stderr.isatty() if show is None else show
        self.bar = None
        self.planned = 0  # where the bar stands once the calls begun so far are done

    def __enter__(self) -> "StepProgress":
        if self.show:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, unit="step", dynamic_ncols=True)
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()

    def call_arguments(self, label: str, images: int, steps: Optional[int] = None) -> Dict[str, object]:
        """The pipeline argument that moves the bar ``images`` per step of a call shown as ``label`` ({} off a terminal),
        a call of ``steps`` steps (default: the run's)."""
        if self.bar is None:
            return {}
        bar, end = self.bar, self.planned + images * (self.steps if steps is None else steps)
        self.planned = end
        bar.set_description(label)

        def on_step_end(pipe, step, timestep, tensors) -> Dict[str, object]:
            bar.update(max(0, min(images, end - bar.n)))  # an adaptive sampler's extra steps stay in this call's share
            return {}

        return {"callback_on_step_end": on_step_end}

    def call_done(self) -> None:
        """Move the bar to the end of the call (img2img's ``strength`` runs fewer steps than planned)."""
        if self.bar is not None and self.bar.n < self.planned:
            self.bar.update(self.planned - self.bar.n)
