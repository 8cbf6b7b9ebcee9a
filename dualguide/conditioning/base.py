"""What every family's prompt encoding shares: the ``Conditioning`` rows, one encoding at a time across threads,
prompt batch sizes, given embeds as rows per image and the NAG negative's text choice."""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass, replace
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

PromptLike = Optional[Union[str, Sequence[str]]]


@dataclass(frozen=True)
class Conditioning:
    """What a backbone (UNet or transformer) is conditioned on, one row per image.

    SDXL rows carry all three tensors; Stable Diffusion 1.x / 2.x and Chroma rows only ``prompt_embeds``
    (``pooled_embeds`` and ``time_ids`` None); SD3 and Flux rows ``prompt_embeds`` and ``pooled_embeds``.
    ``attention_mask`` ``[B, L]`` (1 keep, 0 hide) hides the padding windows of rows whose prompts need fewer
    windows than the longest of their batch, so that each row gets what it gets alone (Chroma: T5's padding);
    ``image_embeds`` are the IP-Adapter image embeddings (one tensor per adapter). ``to(dtype=...)`` casts the
    embeddings only: the mask and ``guidance`` keep their dtype (``guidance`` float32, as diffusers' Flux pipelines
    pass it; the transformer casts it to its hidden states' dtype itself, so a cast here would change nothing).
    """

    prompt_embeds: Tensor  # [B, L, D]: the text encoders' hidden states (SDXL: both, concatenated)
    pooled_embeds: Optional[Tensor] = None  # [B, P]: pooled text embeds (SDXL: text_encoder_2's projection; Flux: CLIP's)
    time_ids: Optional[Tensor] = None  # [B, 6]: SDXL's original size, crop top-left, target size
    attention_mask: Optional[Tensor] = None  # [B, L]
    image_embeds: Optional[List[Tensor]] = None
    guidance: Optional[Tensor] = None  # [B]: the distilled guidance scale of a guidance-embedding model (Flux.1 dev), one per row
    reference_latents: Optional[Tensor] = None  # [B, C, h, w]: Flux Kontext's reference image latents, never guided

    def __post_init__(self) -> None:
        if self.guidance is not None and self.guidance.ndim != 1:
            raise ValueError(f"Conditioning: guidance must be one scale per row, [B], got shape {list(self.guidance.shape)}")
        tensors = {"prompt_embeds": self.prompt_embeds, "pooled_embeds": self.pooled_embeds, "time_ids": self.time_ids,
                   "guidance": self.guidance, "reference_latents": self.reference_latents}  # fmt: skip
        sizes = {name: t.shape[0] for name, t in tensors.items() if t is not None}
        if len(set(sizes.values())) != 1:
            raise ValueError(
                f"Conditioning: {', '.join(sizes)} must have the same batch size, got {', '.join(map(str, sizes.values()))}"
            )

    @property
    def batch_size(self) -> int:
        return self.prompt_embeds.shape[0]

    def added_cond_kwargs(self) -> Optional[dict]:
        """The UNet's added text conditioning of these rows (SDXL's ``text_embeds`` / ``time_ids``); None without."""
        if self.pooled_embeds is None or self.time_ids is None:
            return None
        return {"text_embeds": self.pooled_embeds, "time_ids": self.time_ids}

    def _map(self, function) -> "Conditioning":
        def optional(t: Optional[Tensor]) -> Optional[Tensor]:
            return None if t is None else function(t)

        return Conditioning(
            function(self.prompt_embeds), optional(self.pooled_embeds), optional(self.time_ids),
            optional(self.attention_mask), None if self.image_embeds is None else [function(e) for e in self.image_embeds],
            optional(self.guidance), optional(self.reference_latents),
        )  # fmt: skip

    def to(self, device=None, dtype=None) -> "Conditioning":
        """These rows on ``device``, their embeddings in ``dtype``; the mask and ``guidance`` keep their dtype."""
        moved = self._map(lambda t: t.to(device=device, dtype=dtype))
        kept = {name: getattr(self, name).to(device=device) for name in ("attention_mask", "guidance") if getattr(self, name) is not None}
        return replace(moved, **kept) if kept else moved

    def select(self, rows: slice) -> "Conditioning":
        """The rows ``rows`` (views, no copy)."""
        return self._map(lambda t: t[rows])

    def repeat(self, times: int) -> "Conditioning":
        """Each row repeated ``times`` times in a row (``repeat_interleave``), as ``num_images_per_prompt`` does."""
        return self._map(lambda t: t.repeat_interleave(times, dim=0))

    def with_image_embeds(self, image_embeds: Optional[List[Tensor]]) -> "Conditioning":
        return replace(self, image_embeds=image_embeds)

    @staticmethod
    def cat(parts: Sequence["Conditioning"]) -> "Conditioning":
        """Rows of ``parts`` one after another (a part without a mask keeps every token); ``guidance`` must be
        given for every part or none."""
        if len({p.guidance is None for p in parts}) > 1:
            raise ValueError("Conditioning.cat: guidance is given for some parts and not others; give every row its guidance scale")
        masks = None
        if any(p.attention_mask is not None for p in parts):
            masks = torch.cat([p.prompt_embeds.new_ones(p.prompt_embeds.shape[:2]) if p.attention_mask is None else p.attention_mask for p in parts])
        images = None
        if all(p.image_embeds is not None for p in parts):
            images = [torch.cat(group) for group in zip(*(p.image_embeds for p in parts))]
        def stacked(field: str) -> Optional[Tensor]:
            tensors = [getattr(p, field) for p in parts]
            return None if any(t is None for t in tensors) else torch.cat(tensors)

        return Conditioning(
            torch.cat([p.prompt_embeds for p in parts]), stacked("pooled_embeds"), stacked("time_ids"), masks, images, stacked("guidance"),
            stacked("reference_latents"),
        )


# Text encoding touches state the pipelines of several threads share: a fast tokenizer keeps its padding and
# truncation settings from call to call, and a LoRA scale is set on the text encoders for the call. One encoding
# at a time keeps each thread's prompts its own (encoding is a small part of a run).
_text_encoding = threading.RLock()


def one_encoding_at_a_time(encode: Callable) -> Callable:
    """Decorate a prompt encoder so that calls from several threads encode one after the other."""

    @functools.wraps(encode)
    def serialized(*args, **kwargs):
        with _text_encoding:
            return encode(*args, **kwargs)

    return serialized


def prompt_batch_size(prompt: PromptLike, parameter: str = "prompt") -> int:
    """Number of prompts in ``prompt`` (a string counts as one)."""
    if isinstance(prompt, str):
        return 1
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
        return len(prompt)
    raise TypeError(f"{parameter} must be a string or a non-empty list of strings, got {prompt!r}")


def as_list(prompt: PromptLike, batch: int, parameter: str) -> List[str]:
    prompts = [prompt] * batch if isinstance(prompt, str) else list(prompt)
    if len(prompts) != batch:
        raise ValueError(f"{parameter} has {len(prompts)} entries but prompt has {batch}; give one per prompt or a single string")
    return prompts


def rows_per_image(embeds: Tensor, batch: int, num_images_per_prompt: int, parameter: str) -> Tensor:
    """Given embeds as rows per image: ``batch`` rows (one per prompt) are repeated ``num_images_per_prompt`` times;
    ``batch * num_images_per_prompt`` rows are taken as they are; ValueError naming ``parameter`` otherwise."""
    if embeds.shape[0] == batch:
        embeds = embeds.repeat_interleave(num_images_per_prompt, dim=0)
    if embeds.shape[0] != batch * num_images_per_prompt:
        raise ValueError(
            f"{parameter} has batch {embeds.shape[0]}; expected {batch} (one per prompt) or {batch * num_images_per_prompt}"
        )
    return embeds


def nag_negative_texts(batch: int, nag_negative_prompt: PromptLike, negative_prompt: PromptLike) -> List[str]:
    """NAG's negative text per prompt: ``nag_negative_prompt``, else ``negative_prompt``, else the empty string."""
    if nag_negative_prompt is not None:
        source, parameter = nag_negative_prompt, "nag_negative_prompt"
    elif negative_prompt is not None:
        source, parameter = negative_prompt, "negative_prompt"
    else:
        source, parameter = "", "nag_negative_prompt"
    prompt_batch_size(source, parameter)
    return as_list(source, batch, parameter)


def nag_negative_texts_per_encoder(
    batch: int, nag_negative_prompt: PromptLike, negative_prompt: PromptLike, negative_others: Sequence[Tuple[PromptLike, str]],
    nag_others: Optional[Sequence[Tuple[PromptLike, str]]] = None,
) -> List[Optional[List[str]]]:  # fmt: skip
    """NAG's negative texts for each text encoder, ``[texts, texts_2, ...]``, as the official NAG SD3 and Flux
    pipelines choose them: the first ``nag_negative_texts``; the others, ``(text, parameter)`` pairs, go with the
    text chosen: ``negative_others`` (``negative_prompt_2``, ...) with ``negative_prompt``, else ``nag_others``
    (``nag_negative_prompt_2``, ...; None for a pipeline without them). None where not given: diffusers then
    encodes the first text there too."""
    from_negative = nag_negative_prompt is None and negative_prompt is not None
    others = negative_others if from_negative else nag_others or [(None, name) for _, name in negative_others]
    first = nag_negative_texts(batch, nag_negative_prompt, negative_prompt)
    return [first] + [None if text is None else as_list(text, batch, name) for text, name in others]


def reuses_cfg_negative(nag_negative_prompt: PromptLike, negative_prompt: PromptLike, cfg_negative: Optional[object]) -> bool:
    """The official NAG SD3 and Flux pipelines' rule: without ``nag_negative_prompt``, a ``negative_prompt`` that CFG
    encoded (``cfg_negative``: what CFG encoded, None without CFG) is NAG's negative as CFG encoded it."""
    return nag_negative_prompt is None and negative_prompt is not None and cfg_negative is not None


def check_max_sequence_length(max_sequence_length: int) -> None:
    if isinstance(max_sequence_length, bool) or not isinstance(max_sequence_length, int) or not 1 <= max_sequence_length <= 512:
        raise ValueError(f"max_sequence_length must be an integer from 1 to 512 (T5's window), got {max_sequence_length!r}")
