"""Every branch of a modular pipeline's guider in one backbone call per step: ``one_forward(pipe)``.

diffusers' modular loops call the backbone once per guider branch. ``one_forward`` gives the pipeline, with the same
components, loop-denoiser blocks that read the guider as the project's terms (``guider_terms``: CFG, TPG, NAG) and
run each step through ``GuidedDenoiser.predict``: every branch as rows of one backbone call, with the family adapter,
hooks, call state and guidance math of the project's pipelines. One ``GuidedDenoiser`` per run (built at step 0)
keeps the run's permutation streams and NAG K/V.

Loops that keep it: SDXL text-to-image, image-to-image and inpainting (the 9-channel UNet's mask channels ride as
the denoiser's ``concat``), with IP-Adapter embeds; SD3 text-to-image and image-to-image. The SDXL ControlNet loops
refuse it when they run (before any backbone call), naming their block.
"""

from __future__ import annotations

import copy
from typing import Optional, Tuple

import torch
from diffusers.guiders import ClassifierFreeGuidance
from diffusers.modular_pipelines import ModularPipeline
from diffusers.modular_pipelines.stable_diffusion_3.denoise import StableDiffusion3LoopDenoiser
from diffusers.modular_pipelines.stable_diffusion_xl.denoise import StableDiffusionXLControlNetLoopDenoiser, StableDiffusionXLLoopDenoiser
from torch import Tensor

from ..conditioning import Conditioning
from ..config import CFG, FAMILY_DEFAULT, NAG, TPG
from ..denoiser import GuidedDenoiser
from ..schedule import model_schedule
from .dual import DualGuidance
from .nag import NormalizedAttentionGuidance
from .tpg import TokenPerturbationGuidance

RUN = "dualguide_denoiser"  # the block state's attribute that holds the run's GuidedDenoiser


def guider_terms(guider) -> Tuple[CFG, TPG, NAG, object, Optional[Tensor]]:
    """``(cfg, tpg, nag, seed, nag_negative)`` of a guider (``DualGuidance``: its TPG and its NAG part), as the
    project's terms; its start/stop fractions become the terms' intervals (the same steps: ``int(start n) <= i < int(stop n)``). ``TypeError`` for a guider with no such
    terms, ``ValueError`` for diffusers' CFG in its original formulation."""
    kinds = (ClassifierFreeGuidance, TokenPerturbationGuidance, NormalizedAttentionGuidance)
    if not isinstance(guider, kinds):
        raise TypeError(
            f"one_forward runs a guider of the project's terms: ClassifierFreeGuidance, TokenPerturbationGuidance, "
            f"NormalizedAttentionGuidance or DualGuidance; the pipeline's guider is a {type(guider).__name__}"
        )
    if getattr(guider, "use_original_formulation", False):
        raise ValueError("one_forward: ClassifierFreeGuidance(use_original_formulation=True) has no one-call form; set it to False")
    on = guider._enabled
    cfg = CFG(scale=guider.guidance_scale if on else 1.0, rescale=guider.guidance_rescale, interval=(guider._start, guider._stop))
    tpg, nag, seed, negative = TPG(scale=0.0), NAG(scale=1.0), 0, None
    if isinstance(guider, TokenPerturbationGuidance):
        layers = FAMILY_DEFAULT if guider.tpg_layers is None else guider.tpg_layers
        tpg = TPG(scale=guider.tpg_scale if on else 0.0, layers=layers, interval=(guider.tpg_start, guider.tpg_stop))
        seed = guider.seed
    part = guider.nag_guidance if isinstance(guider, DualGuidance) else guider
    if isinstance(part, NormalizedAttentionGuidance):
        nag = NAG(scale=part.nag_scale if on else 1.0, tau=part.nag_tau, alpha=part.nag_alpha, use_l1=part.nag_use_l1,
                  interval=(part.nag_start, part.nag_stop))  # fmt: skip
        negative = part.nag_negative_prompt_embeds
    return cfg, tpg, nag, seed, negative


def run_levels(scheduler, timesteps: Tensor) -> Tensor:
    """The noise level of each step of the run, then 0 (the schedule the terms' fractions refer to): the scheduler's
    own ``sigmas`` at each timestep where it keeps them, else the training schedule's."""
    if getattr(scheduler, "order", 1) != 1:
        raise ValueError(f"one_forward takes a first-order scheduler (one model call per step); scheduler {type(scheduler).__name__} has order {scheduler.order}")
    sigmas = getattr(scheduler, "sigmas", None)
    if isinstance(sigmas, Tensor) and hasattr(scheduler, "index_for_timestep"):
        levels = torch.stack([sigmas[scheduler.index_for_timestep(t)] for t in timesteps]).float().cpu()
    else:
        levels = model_schedule(scheduler).t_to_sigma(timesteps.float().cpu())
    return torch.cat([levels, torch.zeros(1)])


class OneForwardStep:
    """What the one-forward loop denoisers share: the run's ``GuidedDenoiser`` and one guided prediction per step.
    A subclass says where its loop keeps the backbone, its input and the conditioning (``step_inputs``)."""

    backbone_name = "unet"

    def step_inputs(self, block_state) -> Tuple[Tensor, Optional[Tensor], Conditioning, Optional[Conditioning], Optional[dict]]:
        """``(model input, extra input channels or None, cond, uncond or None, attention kwargs)`` of this step."""
        raise NotImplementedError

    def guided_step(self, components, block_state, i: int, t: Tensor):
        guider, backbone = components.guider, getattr(components, self.backbone_name)
        model_input, concat, cond, uncond, attention_kwargs = self.step_inputs(block_state)
        cfg, tpg, nag, seed, negative = guider_terms(guider)
        # The guider checks its inputs as in diffusers' loop (naming its parameters), before any backbone call.
        guider.set_state(step=i, num_inference_steps=block_state.num_inference_steps, timestep=t)
        guider.prepare_inputs({"prompt_embeds": (cond.prompt_embeds, None if uncond is None else uncond.prompt_embeds)})
        if cfg.enabled and uncond is None:
            raise ValueError(f"{type(guider).__name__}(guidance_scale={cfg.scale:g}) needs negative_prompt_embeds, and the pipeline gave none")
        if i == 0 or getattr(block_state, RUN, None) is None:
            levels = run_levels(components.scheduler, block_state.timesteps)
            denoiser = GuidedDenoiser(backbone, components.scheduler, cfg=cfg, tpg=tpg, nag=nag, seed=seed, sigmas=levels,
                                      cross_attention_kwargs=attention_kwargs, timestep_cond=getattr(block_state, "timestep_cond", None))  # fmt: skip
            setattr(block_state, RUN, (denoiser, levels))
        denoiser, levels = getattr(block_state, RUN)
        block_state.noise_pred = denoiser.predict(model_input, t, cond, uncond, negative if nag.enabled else None, sigma=levels[i], concat=concat)
        return components, block_state


class StableDiffusionXLOneForwardDenoiser(OneForwardStep, StableDiffusionXLLoopDenoiser):
    """``StableDiffusionXLLoopDenoiser`` (same inputs and components) with all the guider's branches in one UNet call."""

    @property
    def description(self) -> str:
        return "Step within the denoising loop that denoises the latents with every branch of the guider in one UNet call (dualguide)."

    def step_inputs(self, block_state):
        def pair(name: str, negative: str):
            return getattr(block_state, name, None), getattr(block_state, negative, None)

        embeds, time_ids, pooled, images = (
            pair("prompt_embeds", "negative_prompt_embeds"), pair("add_time_ids", "negative_add_time_ids"),
            pair("pooled_prompt_embeds", "negative_pooled_prompt_embeds"), pair("ip_adapter_embeds", "negative_ip_adapter_embeds"),
        )  # fmt: skip

        def side(k: int) -> Optional[Conditioning]:
            if embeds[k] is None:
                return None
            image_embeds = images[k] if images[k] is None or isinstance(images[k], list) else [images[k]]
            return Conditioning(embeds[k], pooled[k], time_ids[k], image_embeds=image_embeds)

        scaled, channels = block_state.scaled_latents, block_state.latents.shape[1]
        concat = scaled[:, channels:] if scaled.shape[1] > channels else None  # the inpainting UNet's mask channels
        return scaled[:, :channels], concat, side(0), side(1), block_state.cross_attention_kwargs

    @torch.no_grad()
    def __call__(self, components, block_state, i: int, t: int):
        return self.guided_step(components, block_state, i, t)


class StableDiffusion3OneForwardDenoiser(OneForwardStep, StableDiffusion3LoopDenoiser):
    """``StableDiffusion3LoopDenoiser`` (same inputs and components) with all the guider's branches in one transformer
    call; NAG's negative is extra text rows of that call (the family adapter appends them)."""

    backbone_name = "transformer"

    @property
    def description(self) -> str:
        return "Step within the denoising loop that denoises the latents with every branch of the guider in one transformer call (dualguide)."

    def step_inputs(self, block_state):
        cond = Conditioning(block_state.prompt_embeds, block_state.pooled_prompt_embeds)
        negative = block_state.negative_prompt_embeds
        uncond = None if negative is None else Conditioning(negative, block_state.negative_pooled_prompt_embeds)
        return block_state.latents, None, cond, uncond, block_state.joint_attention_kwargs

    @torch.no_grad()
    def __call__(self, components, block_state, i: int, t: torch.Tensor):
        return self.guided_step(components, block_state, i, t)


class StableDiffusionXLControlNetRefusedDenoiser(StableDiffusionXLControlNetLoopDenoiser):
    """``StableDiffusionXLControlNetLoopDenoiser``'s place in a one-forward pipeline: it refuses to run."""

    @torch.no_grad()
    def __call__(self, components, block_state, i: int, t: int):
        raise ValueError(
            "one_forward: the ControlNet loop (StableDiffusionXLControlNetLoopDenoiser) has no one-call form in modular "
            "pipelines; run it per branch (the pipeline before one_forward) or use StableDiffusionXLControlNetTPGPipeline"
        )


SWAPS = {
    StableDiffusionXLLoopDenoiser: StableDiffusionXLOneForwardDenoiser,
    StableDiffusion3LoopDenoiser: StableDiffusion3OneForwardDenoiser,
    StableDiffusionXLControlNetLoopDenoiser: StableDiffusionXLControlNetRefusedDenoiser,
}


def _swap(blocks) -> int:
    """Swap every known loop denoiser under ``blocks`` in place; how many were swapped."""
    swapped = 0
    for name, block in list(getattr(blocks, "sub_blocks", {}).items()):
        if type(block) in SWAPS:
            blocks.sub_blocks[name] = SWAPS[type(block)]()
            swapped += 1
        else:
            swapped += _swap(block)
    return swapped


def one_forward(pipe: ModularPipeline) -> ModularPipeline:
    """A modular SDXL / SD3 pipeline like ``pipe`` (the same components, its own blocks) that runs every branch of
    its guider (CFG, TPG, NAG: ``ClassifierFreeGuidance``, ``TokenPerturbationGuidance``,
    ``NormalizedAttentionGuidance``) in one backbone call per step; ``pipe`` is left as it is.

    ``TypeError`` for a pipeline with no SDXL / SD3 loop denoiser. The ControlNet loops refuse to run (a
    ``ValueError`` naming their block); the guider is read at each run, so ``update_components(guider=...)`` works."""
    if not isinstance(pipe, ModularPipeline):
        raise TypeError(f"pipe must be a diffusers ModularPipeline (modular SDXL or SD3), got {type(pipe).__name__}")
    blocks = copy.deepcopy(pipe.blocks)
    if not _swap(blocks):
        raise TypeError(
            f"pipe has no loop denoiser that one_forward knows ({', '.join(kind.__name__ for kind in SWAPS)}): "
            f"its blocks are {type(pipe.blocks).__name__}"
        )
    packed = blocks.init_pipeline(components_manager=pipe._components_manager, collection=pipe._collection)
    # The same objects under the same specs (update_components would re-derive specs some components cannot give).
    components = {name: value for name, value in pipe.components.items() if name in packed._component_specs}
    packed._component_specs.update({name: pipe.get_component_spec(name) for name in components})
    packed.register_components(**components)
    packed.update_components(**{name: pipe.config[name] for name in pipe._config_specs if name in pipe.config})
    if hasattr(pipe, "_progress_bar_config"):
        packed.set_progress_bar_config(**pipe._progress_bar_config)
    return packed
