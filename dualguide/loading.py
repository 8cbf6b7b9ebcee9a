"""Load a ``StableDiffusionXLTPGPipeline`` from a hub id, a local folder or a single .safetensors file,
and the ``recommended.json`` sampling settings a model folder may hold beside its weights."""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Dict, Optional, Union

if TYPE_CHECKING:  # torch loads with the first model: reading recommended.json stays fast
    import torch

RECOMMENDED_FILE = "recommended.json"


def default_dtype(device: Union[str, "torch.device"]) -> "torch.dtype":
    """float16 on CUDA, float32 elsewhere: the dtype the command and the examples use unless told."""
    import torch

    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


def read_recommended(folder: Union[str, os.PathLike]) -> Dict[str, object]:
    """The pipeline arguments in ``folder``'s ``recommended.json``; ``{}`` when it has none."""
    path = os.path.join(folder, RECOMMENDED_FILE)
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_recommended(folder: Union[str, os.PathLike], settings: Dict[str, object]) -> None:
    """Store ``settings`` (pipeline arguments) as ``folder``'s ``recommended.json``."""
    with open(os.path.join(folder, RECOMMENDED_FILE), "w", encoding="utf-8") as f:
        json.dump(settings, f, indent=2)


def load_pipeline(model: Optional[str] = None, device: str = "cpu", dtype: Optional["torch.dtype"] = None):
    """The pipeline for ``model``; ``None`` gives a random-weight tiny SDXL-layout model (no download).

    ``model`` may be a diffusers folder, a single-file checkpoint (``.safetensors``/``.ckpt``)
    or a hub id already in the local cache (or downloadable where a network exists).
    """
    import torch

    from .pipelines import StableDiffusionXLTPGPipeline

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
