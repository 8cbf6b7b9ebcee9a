"""The two sampling loops of the guided pipelines, sharing one guided prediction and one step protocol.

* ``scheduler_loop`` follows a diffusers scheduler exactly as diffusers' pipelines do
  (``scale_model_input``, ``step`` with ``eta`` / ``generator``), fed with the guided UNet output.
* ``kdiffusion_loop`` runs a k-diffusion sampler on ``GuidedDenoiser``'s x0 prediction.

Both report every step to ``StepEvents`` right after its update and before the next model call,
so that latents, embeddings or the guidance scale changed by ``callback_on_step_end`` take
effect from the very next model call, as in diffusers.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor

from ..conditioning import Conditioning
from ..control import ControlNetInput
from ..denoiser import GuidedDenoiser
from ..schedule import model_schedule

# k-diffusion samplers that evaluate the model twice per step, except on the step to sigma 0.
TWO_EVALUATIONS_PER_STEP = ("heun", "dpm_2", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde")
# Samplers on their own time grid: every model evaluation counts as a step.
EVALUATION_STEPS = ("dpm_fast", "dpm_adaptive")

# diffusers' names, plus the x0 prediction of the step: guided ("denoised") and of each branch.
CALLBACK_TENSOR_INPUTS = (
    "latents", "prompt_embeds", "add_text_embeds", "add_time_ids", "negative_prompt_embeds",
    "negative_pooled_prompt_embeds", "denoised", "denoised_uncond", "denoised_cond", "denoised_tpg", "denoised_pag",
)  # fmt: skip


class Interrupted(Exception):
    """Raised between steps when ``pipe.interrupt`` is set; carries the latents to decode."""

    def __init__(self, latents: Tensor) -> None:
        super().__init__("interrupted")
        self.latents = latents


@dataclass
class GuidanceInputs:
    """What each guided call is conditioned on; callbacks may replace parts of it between steps."""

    cond: Conditioning
    uncond: Optional[Conditioning] = None
    nag_negative: Optional[Tensor] = None
    concat: Optional[Tensor] = None  # extra UNet input channels (9-channel inpainting), k-diffusion path
    control: Optional[ControlNetInput] = None  # a ControlNet with its image, run on the uncond and cond rows

    def as_kwargs(self) -> Dict[str, object]:
        kwargs = {"cond": self.cond, "uncond": self.uncond, "nag_negative": self.nag_negative}
        if self.concat is not None:
            kwargs["concat"] = self.concat
        if self.control is not None:
            kwargs["control"] = self.control
        return kwargs


class StepEvents:
    """diffusers' per-step protocol for both loops: progress, ``callback_on_step_end``, interruption.

    The callback sees diffusers' tensors: with CFG active ``prompt_embeds``, ``add_text_embeds`` and
    ``add_time_ids`` are ``[negative, positive]`` along the batch; what it returns replaces them
    (a batch of one group is the positive only, as ``SDXLCFGCutoffCallback`` returns), and
    ``pipe._guidance_scale`` is read back into the denoiser (CFG off drops the uncond rows).
    """

    def __init__(self, pipe, denoiser: GuidedDenoiser, inputs: GuidanceInputs, callback, tensor_inputs: Sequence[str], progress_bar) -> None:
        self.pipe = pipe
        self.denoiser = denoiser
        self.inputs = inputs
        self.callback = callback
        self.tensor_inputs = list(tensor_inputs)
        self.progress_bar = progress_bar
        self._guidance_scale = float(pipe._guidance_scale)

    def at_timestep(self, timestep: Optional[Tensor]) -> None:
        """Before each model call (None after the last): the timestep diffusers' pipelines keep as
        ``pipe.current_timestep``, which diffusers' cache hooks (FasterCache, pyramid attention broadcast) read."""
        self.pipe._current_timestep = timestep

    def end_step(self, step: int, timestep: Tensor, latents: Tensor) -> Tensor:
        """Report step ``step`` done with ``latents``; returns the latents to continue from."""
        self.progress_bar.update()
        if self.callback is not None:
            outputs = self.callback(self.pipe, step, timestep, {name: self._tensor(name, latents) for name in self.tensor_inputs})
            latents = self._apply(outputs or {}, latents)
        if self.pipe.interrupt:
            raise Interrupted(latents)
        return latents

    def _cfg_pair(self) -> bool:
        return self.inputs.uncond is not None and self.denoiser.cfg.enabled

    def _tensor(self, name: str, latents: Tensor) -> Optional[Tensor]:
        if name == "latents":
            return latents
        if name.startswith("denoised"):
            return self.denoiser.last_predictions.get(name[len("denoised_") :] or "guided")
        cond, uncond = self.inputs.cond, self.inputs.uncond
        if name == "negative_prompt_embeds":
            return None if uncond is None else uncond.prompt_embeds
        if name == "negative_pooled_prompt_embeds":
            return None if uncond is None else uncond.pooled_embeds
        field = {"prompt_embeds": "prompt_embeds", "add_text_embeds": "pooled_embeds", "add_time_ids": "time_ids"}[name]
        if self._cfg_pair():
            return torch.cat([getattr(uncond, field), getattr(cond, field)])
        return getattr(cond, field)

    def _apply(self, outputs: Dict[str, Tensor], latents: Tensor) -> Tensor:
        cond, uncond = self.inputs.cond, self.inputs.uncond
        batch = cond.batch_size
        changes = {"cond": {}, "uncond": {}}
        for name, field in (("prompt_embeds", "prompt_embeds"), ("add_text_embeds", "pooled_embeds"), ("add_time_ids", "time_ids")):
            if name not in outputs:
                continue
            value = outputs[name]
            if value.shape[0] == 2 * batch and uncond is not None:
                changes["uncond"][field], changes["cond"][field] = value[:batch], value[batch:]
            else:
                changes["cond"][field] = value
        for name, field in (("negative_prompt_embeds", "prompt_embeds"), ("negative_pooled_prompt_embeds", "pooled_embeds")):
            if name in outputs and uncond is not None:
                changes["uncond"][field] = outputs[name]
        if changes["cond"]:
            self.inputs.cond = replace(cond, **changes["cond"])
        if changes["uncond"]:
            self.inputs.uncond = replace(uncond, **changes["uncond"])
        scale = float(self.pipe._guidance_scale)
        # A guidance-distilled backbone embeds the scale once per run (LCM's timestep_cond, Flux's guidance), as in diffusers.
        if scale != self._guidance_scale and self.pipe.guidance_scale_is_cfg:
            self._guidance_scale = scale
            if scale > 1.0 and self.inputs.uncond is None:
                raise ValueError(
                    "callback_on_step_end raised guidance_scale above 1 in a run that started without CFG; "
                    "start with guidance_scale > 1 to turn CFG off and on during the run"
                )
            self.denoiser.set_guidance_scale(scale)
        new_latents = outputs.get("latents")
        return latents if new_latents is None else new_latents


def scheduler_loop(
    scheduler,
    denoiser: GuidedDenoiser,
    latents: Tensor,
    timesteps: Tensor,
    inputs: GuidanceInputs,
    events: StepEvents,
    extra_step_kwargs: Dict[str, object],
    model_input_channels: Optional[Callable[[Tensor], Optional[Tensor]]] = None,
    after_step: Optional[Callable[[int, Tensor], Tensor]] = None,
    begin_index: int = 0,
) -> Tensor:
    """Denoise ``latents`` over ``timesteps`` with ``scheduler.step``, as diffusers' SDXL pipelines do.

    ``model_input_channels(model_input)`` may return channels to concatenate to the UNet input
    (9-channel inpainting); ``after_step(i, latents)`` may post-process the latents of step ``i``
    (the 4-channel inpainting blend). ``begin_index``: the scheduler index of ``timesteps[0]``
    (img2img / inpainting start part-way, as diffusers' ``get_timesteps`` sets it).
    """
    denoiser.set_schedule(scheduler_levels(scheduler, timesteps, begin_index))
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(begin_index)
    scale_input = getattr(scheduler, "scale_model_input", None)  # flow-matching schedulers have none
    for i, t in enumerate(timesteps):
        model_input = latents if scale_input is None else scale_input(latents, t)
        kwargs = inputs.as_kwargs()
        if model_input_channels is not None:
            extra = model_input_channels(model_input)
            if extra is not None:
                kwargs["concat"] = extra  # the denoiser appends them to the UNet input
        sigma = scheduler_sigma(scheduler, denoiser, t)
        events.at_timestep(t)
        output = denoiser.predict(model_input, t, **kwargs, sigma=sigma)
        latents_dtype = latents.dtype
        latents = scheduler.step(output.to(latents_dtype), t, latents, **extra_step_kwargs, return_dict=False)[0]
        if after_step is not None:
            latents = after_step(i, latents)
        latents = events.end_step(i, t, latents)
    events.at_timestep(None)
    return latents


def scheduler_levels(scheduler, timesteps: Tensor, begin_index: int = 0) -> Tensor:
    """The noise level of each distinct step of the run, then 0: the schedule that intervals given as
    fractions (and ControlNet windows) refer to. Each level is the one ``scheduler_sigma`` reports at
    that step, so a step's level is found in it exactly; repeated levels of second-order schedulers
    count once."""
    sigmas = getattr(scheduler, "sigmas", None)
    if timesteps.device.type == "meta":  # shapes only (FLOP counting): no levels to read, 1 .. 0 stand in for them
        return torch.linspace(1.0, 0.0, len(timesteps) + 1)
    if not (isinstance(sigmas, Tensor) and len(sigmas) >= begin_index + len(timesteps)):
        sigmas = model_schedule(scheduler).t_to_sigma(timesteps.reshape(-1).float().cpu())
        begin_index = 0
    levels: List[float] = []
    for i in range(len(timesteps)):
        level = float(sigmas[begin_index + i])
        if not levels or level != levels[-1]:
            levels.append(level)
    return torch.tensor(levels + [0.0])


def scheduler_sigma(scheduler, denoiser: GuidedDenoiser, timestep: Tensor) -> Tensor:
    """The sigma of the scheduler's current step: its own ``sigmas[step_index]`` where it keeps them,
    else the training schedule's sigma at ``timestep``."""
    sigmas = getattr(scheduler, "sigmas", None)
    index = getattr(scheduler, "step_index", None)
    if index is None:
        index = getattr(scheduler, "begin_index", None)
    if isinstance(sigmas, Tensor) and index is not None and index < len(sigmas):
        return sigmas[index].float()
    return denoiser.schedule.t_to_sigma(torch.as_tensor(timestep).float().reshape(1).cpu())


class StepTracker:
    """A k-diffusion model that reports each finished step right before the next step's first model call.

    ``evaluations(i)`` is how many model calls step ``i`` makes (one per call for samplers on
    their own time grid). Latents returned by the callback are written into the sampler's state.
    """

    def __init__(self, denoiser: GuidedDenoiser, inputs: GuidanceInputs, events: StepEvents, sigmas: Tensor, evaluations: Callable[[int], int]) -> None:
        self.denoiser = denoiser
        self.inputs = inputs
        self.events = events
        self.sigmas = sigmas
        self.evaluations = evaluations
        self.step = -1
        self.left = 0

    def __call__(self, x: Tensor, sigma: Tensor, **unused) -> Tensor:
        if self.left == 0:
            if self.step >= 0:
                self._report(x)
            self.step += 1
            self.left = self.evaluations(self.step)
        self.left -= 1
        self.events.at_timestep(self.denoiser.sigma_to_t(sigma.reshape(-1)[:1].float())[0])
        return self.denoiser(x, sigma, **self.inputs.as_kwargs())

    def __getattr__(self, name: str):
        """Everything else is the denoiser's (``last_predictions``, ``sigma_to_t``, ...), for custom samplers."""
        return getattr(self.denoiser, name)

    def finish(self, x: Tensor) -> Tensor:
        if self.step >= 0:
            self._report(x)
        self.events.at_timestep(None)
        return x

    def _report(self, x: Tensor) -> None:
        index = min(self.step, len(self.sigmas) - 2)
        timestep = self.denoiser.sigma_to_t(self.sigmas[index : index + 1].float())[0]
        latents = self.events.end_step(self.step, timestep, x)
        if latents is not x:
            x.copy_(latents)


def evaluations_per_step(sampler_name: Optional[str], sigmas: Tensor) -> Callable[[int], int]:
    """How many model calls step ``i`` of ``sampler_name`` makes over ``sigmas`` (None: a custom sampler,
    taken to call the model once per step)."""
    last = len(sigmas) - 2
    final_is_zero = float(sigmas[-1]) == 0.0
    if sampler_name in TWO_EVALUATIONS_PER_STEP:
        return lambda i: 1 if (i >= last and final_is_zero) else 2
    return lambda i: 1


def kdiffusion_loop(
    sampler: Callable,
    sampler_name: Optional[str],
    denoiser: GuidedDenoiser,
    x: Tensor,
    sigmas: Tensor,
    inputs: GuidanceInputs,
    events: StepEvents,
    seed,
) -> Tensor:
    """Run a k-diffusion sampler (uniform calling convention of ``samplers.get``) on the guided denoiser."""
    denoiser.set_schedule(sigmas)
    tracker = StepTracker(denoiser, inputs, events, sigmas, evaluations_per_step(sampler_name, sigmas))
    with denoiser.hooks():
        x = sampler(tracker, x, sigmas, extra_args={}, callback=None, disable=True, seed=seed)
    return tracker.finish(x)
