"""Prompt encoding, one module per family -> ``Conditioning`` rows.

``base``: the ``Conditioning`` rows and what every family shares; ``clip``: the CLIP long-prompt windowing that
``sdxl`` (prompt embeds, pooled embeds, time ids) and ``sd`` (Stable Diffusion 1.x / 2.x, prompt embeds only) use;
``sd3``: Stable Diffusion 3 / 3.5 (the joint CLIP + T5 prompt embeds and the two CLIPs' pooled embeds), ``flux``:
Flux.1 (T5's prompt embeds, CLIP's pooled embeds) and ``chroma`` (T5's prompt embeds and attention mask), each
through diffusers' ``encode_prompt``, without windowing.
"""

from .base import Conditioning, PromptLike, one_encoding_at_a_time, prompt_batch_size
from .chroma import encode_chroma, encode_chroma_nag_negative
from .flux import encode_flux, encode_flux_nag_negative
from .sd import encode_sd
from .sd3 import encode_sd3, encode_sd3_nag_negative
from .sdxl import encode_nag_negative, encode_sdxl, time_ids

__all__ = [
    "Conditioning", "PromptLike", "encode_chroma", "encode_chroma_nag_negative", "encode_flux", "encode_flux_nag_negative",
    "encode_nag_negative", "encode_sd", "encode_sd3", "encode_sd3_nag_negative", "encode_sdxl", "one_encoding_at_a_time",
    "prompt_batch_size", "time_ids",
]  # fmt: skip
