"""NAG's negative as text: ``pipe(..., nag_negative_prompt="...")`` on a modular pipeline, encoded by the pipeline's
own text-encoder step and set as the guider's ``nag_negative_prompt_embeds``.

A guider cannot reach the text encoders, so a block placed right after the pipeline's text-encoder step runs that
same step again on a state of its own, with the negative texts as its ``prompt``, its other inputs as the run gives
them and no negative texts: the family's own encoding (CLIP windows, T5, clip_skip, LoRA scale), not a copy of it.
That step encodes ``prompt`` whatever the guider's conditions, so NAG with CFG off (one condition, no CFG negative)
gets its negative too. The embeds get one row per image, repeated ``num_images_per_prompt`` (Wan:
``num_videos_per_prompt``) times as the pipeline's input step repeats the prompt embeds.

``with_nag_negative_prompt(blocks)`` gives a copy of ``blocks`` with the block inserted after the text encoder (on
Wan, diffusers' text encoder step is swapped for ``WanOneConditionTextEncoderStep``, which runs with CFG off).
"""

from __future__ import annotations

import copy
from typing import List, Optional, Type

import torch
from diffusers.modular_pipelines import ModularPipelineBlocks, PipelineState, SequentialPipelineBlocks
from diffusers.modular_pipelines.modular_pipeline_utils import InputParam, OutputParam
from diffusers.modular_pipelines.stable_diffusion_3.encoders import StableDiffusion3TextEncoderStep
from diffusers.modular_pipelines.stable_diffusion_xl.encoders import StableDiffusionXLTextEncoderStep
from diffusers.modular_pipelines.wan.encoders import WanTextEncoderStep
from torch import Tensor

from ..conditioning.base import nag_negative_texts, rows_per_image
from .nag import NEGATIVE, RuntimeNegative

TEXT = "nag_negative_prompt"  # the pipeline input, and the step's name in the blocks


def encodes_prompts(block: ModularPipelineBlocks) -> bool:
    """Whether ``block`` is a text-encoder step: it takes ``prompt`` and gives ``prompt_embeds``."""
    return "prompt" in block.input_names and "prompt_embeds" in block.intermediate_output_names


class NAGNegativePromptStep(ModularPipelineBlocks):
    """Encodes ``nag_negative_prompt`` with the pipeline's text-encoder step ``encoder`` and sets the embeds (one row per
    image) as the guider's ``nag_negative_prompt_embeds``; without ``nag_negative_prompt`` the guider keeps its own.

    The negative stays set on the guider after the run (a later run without ``nag_negative_prompt`` reuses it).
    Bad input is refused before anything is encoded: ``nag_negative_prompt`` not a string or a list of strings
    (``TypeError``), a list whose length is not the number of prompts, or a guider without NAG (``ValueError``).

    Args:
        encoder: the text-encoder step to run on the negative (the family's own step by default).
        per_prompt: the pipeline input that repeats each prompt's embeds (``num_images_per_prompt`` by default).
    """

    encoder_class: Optional[Type[ModularPipelineBlocks]] = None  # a family's text-encoder step
    per_prompt = "num_images_per_prompt"

    def __init__(self, encoder: Optional[ModularPipelineBlocks] = None, per_prompt: Optional[str] = None) -> None:
        super().__init__()
        if encoder is None and self.encoder_class is None:
            raise TypeError("NAGNegativePromptStep needs the pipeline's text-encoder step: NAGNegativePromptStep(encoder=...)")
        encoder = self.encoder_class() if encoder is None else encoder
        if not isinstance(encoder, ModularPipelineBlocks) or not encodes_prompts(encoder):
            raise TypeError(f"encoder must be a text-encoder step (taking prompt, giving prompt_embeds), got {type(encoder).__name__}")
        self._encoder = encoder
        self._per_prompt = per_prompt or self.per_prompt

    @property
    def description(self) -> str:
        return (
            f"Encodes {TEXT} with {type(self._encoder).__name__} and sets it as the guider's {NEGATIVE} "
            "(NormalizedAttentionGuidance, DualGuidance; dualguide)."
        )

    @property
    def expected_components(self):
        return self._encoder.expected_components

    @property
    def expected_configs(self):
        return self._encoder.expected_configs

    def _encoder_inputs(self) -> List[InputParam]:
        """The encoder's inputs that the negative's encoding takes from the run: all but its prompt texts."""
        return [param for param in self._encoder.inputs if param.name is None or "prompt" not in param.name]

    @property
    def inputs(self) -> List[InputParam]:
        return [
            InputParam(TEXT, type_hint=str, description="NAG's negative prompt or prompts (one per prompt); sets the guider's nag_negative_prompt_embeds."),
            InputParam(self._per_prompt, default=1),
            InputParam("prompt_embeds", type_hint=Tensor, description="The text encoder's prompt embeds (their rows: the prompts)."),
            *self._encoder_inputs(),
        ]  # fmt: skip

    @property
    def intermediate_outputs(self) -> List[OutputParam]:
        return [OutputParam(NEGATIVE, type_hint=Tensor, description="The guider's NAG negative for this run (None without one).")]

    def encode(self, components, state: PipelineState, text, prompts: int, per_prompt: int) -> Tensor:
        """``text`` (one string, or one per prompt) encoded by the encoder step, one row per image."""
        texts = nag_negative_texts(prompts, text, None)  # TypeError / ValueError naming nag_negative_prompt
        own = PipelineState()
        for param in self._encoder_inputs():
            if param.name is not None:
                own.set(param.name, state.get(param.name), param.kwargs_type)
            else:
                for name, value in state.get_by_kwargs(param.kwargs_type).items():
                    own.set(name, value, param.kwargs_type)
        own.set("prompt", texts)
        _, own = self._encoder(components, own)
        return rows_per_image(own.get("prompt_embeds"), prompts, per_prompt, TEXT)

    @torch.no_grad()
    def __call__(self, components, state: PipelineState):
        block_state = self.get_block_state(state)
        guider = getattr(components, "guider", None)
        text = getattr(block_state, TEXT)
        if text is not None:
            if not isinstance(guider, RuntimeNegative):
                raise ValueError(
                    f"{TEXT} needs a guider with NAG (NormalizedAttentionGuidance or DualGuidance); the pipeline's guider is a {type(guider).__name__}"
                )
            if not isinstance(block_state.prompt_embeds, Tensor):
                raise ValueError(f"{TEXT}: the step reads the prompts' count from prompt_embeds; place it after the text-encoder step")
            prompts, per_prompt = block_state.prompt_embeds.shape[0], getattr(block_state, self._per_prompt) or 1
            guider.nag_negative_prompt_embeds = self.encode(components, state, text, prompts, per_prompt)
        setattr(block_state, NEGATIVE, getattr(guider, NEGATIVE, None))
        self.set_block_state(state, block_state)
        return components, state


class StableDiffusionXLNAGNegativePromptStep(NAGNegativePromptStep):
    """``NAGNegativePromptStep`` over modular SDXL's ``StableDiffusionXLTextEncoderStep``."""

    model_name = "stable-diffusion-xl"
    encoder_class = StableDiffusionXLTextEncoderStep


class StableDiffusion3NAGNegativePromptStep(NAGNegativePromptStep):
    """``NAGNegativePromptStep`` over modular SD3's ``StableDiffusion3TextEncoderStep``."""

    model_name = "stable-diffusion-3"
    encoder_class = StableDiffusion3TextEncoderStep


class WanOneConditionTextEncoderStep(WanTextEncoderStep):
    """diffusers' ``WanTextEncoderStep`` that also runs with a one-condition guider (NAG or TPG with CFG off).

    With such a guider, diffusers 0.42.1's step leaves its negative embeds unbound (``UnboundLocalError``), and its
    Wan denoise step requires them anyway; this step always encodes the negative (``negative_prompt``, else the empty
    text), which the loop then leaves unused: one more text-encoder pass per run. ``with_nag_negative_prompt`` puts it
    in place of ``WanTextEncoderStep``."""

    @staticmethod
    def encode_prompt(components, prompt, device=None, prepare_unconditional_embeds: bool = True, negative_prompt=None,
                      max_sequence_length: int = 512):  # fmt: skip
        return WanTextEncoderStep.encode_prompt(components, prompt, device, True, negative_prompt, max_sequence_length)


class WanNAGNegativePromptStep(NAGNegativePromptStep):
    """``NAGNegativePromptStep`` over modular Wan's text encoder (``WanOneConditionTextEncoderStep``, so that NAG with
    CFG off runs; rows repeated ``num_videos_per_prompt`` times)."""

    model_name = "wan"
    encoder_class = WanOneConditionTextEncoderStep
    per_prompt = "num_videos_per_prompt"


FAMILY_STEPS = (StableDiffusionXLNAGNegativePromptStep, StableDiffusion3NAGNegativePromptStep, WanNAGNegativePromptStep)
# Text-encoder steps that ``with_nag_negative_prompt`` replaces (diffusers' step -> the project's that runs CFG off).
ONE_CONDITION_ENCODERS = {WanTextEncoderStep: WanOneConditionTextEncoderStep}


def step_for(encoder: ModularPipelineBlocks, blocks: ModularPipelineBlocks) -> NAGNegativePromptStep:
    """The family's step over ``encoder``, or the generic one (repeating by whichever per-prompt input ``blocks`` take)."""
    for kind in FAMILY_STEPS:
        if type(encoder) is kind.encoder_class:
            return kind(encoder)
    per_prompt = "num_videos_per_prompt" if "num_videos_per_prompt" in blocks.input_names else "num_images_per_prompt"
    return NAGNegativePromptStep(encoder, per_prompt)


def with_nag_negative_prompt(blocks: SequentialPipelineBlocks) -> SequentialPipelineBlocks:
    """A copy of ``blocks`` (e.g. ``StableDiffusionXLAutoBlocks()``) that takes ``nag_negative_prompt``: the NAG
    negative-text step inserted right after its text-encoder step (the first top-level block taking ``prompt`` and
    giving ``prompt_embeds``); ``blocks`` is left as it is, and blocks that have the step are copied as they are.
    ``TypeError`` for blocks with no such step."""
    if not isinstance(blocks, SequentialPipelineBlocks):
        raise TypeError(f"blocks must be diffusers SequentialPipelineBlocks (e.g. StableDiffusionXLAutoBlocks()), got {type(blocks).__name__}")
    blocks = copy.deepcopy(blocks)
    if any(isinstance(block, NAGNegativePromptStep) for block in blocks.sub_blocks.values()):
        return blocks
    for index, (name, block) in enumerate(blocks.sub_blocks.items()):
        if encodes_prompts(block):
            if type(block) in ONE_CONDITION_ENCODERS:  # diffusers' step that fails with CFG off: the project's in its place
                block = blocks.sub_blocks[name] = ONE_CONDITION_ENCODERS[type(block)]()
            blocks.sub_blocks.insert(TEXT, step_for(block, blocks), index + 1)
            return blocks
    raise TypeError(f"{type(blocks).__name__} has no top-level text-encoder step (a block taking prompt and giving prompt_embeds)")
