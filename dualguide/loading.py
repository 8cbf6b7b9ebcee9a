"""Load a ``StableDiffusionXLTPGPipeline`` from a hub id, a local folder or a single .safetensors file."""

from __future__ import annotations

import os
from typing import Optional

import torch


def load_pipeline(model: Optional[str] = None, device: str = "cpu", dtype: Optional[torch.dtype] = None):
    """The pipeline for ``model``; ``None`` gives a random-weight tiny SDXL-layout model (no download).

    ``model`` may be a diffusers folder, a single-file checkpoint (``.safetensors``/``.ckpt``)
    or a hub id already in the local cache (or downloadable where a network exists).
    """
    from .pipeline import StableDiffusionXLTPGPipeline

    dtype = dtype or torch.float32
    if model is None:
        from .tiny import build_tiny_sdxl

        pipe = StableDiffusionXLTPGPipeline(**build_tiny_sdxl(), add_watermarker=False)
        if dtype != torch.float32:
            pipe.to(dtype=dtype)
    else:
        # float32 is what the loaders give by default; naming it only adds a deprecation warning.
        options = {} if dtype == torch.float32 else {"torch_dtype": dtype}
        load = StableDiffusionXLTPGPipeline.from_single_file if os.path.isfile(model) else StableDiffusionXLTPGPipeline.from_pretrained
        pipe = load(model, **options)
    return pipe.to(device)
