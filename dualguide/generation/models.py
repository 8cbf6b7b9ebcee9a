"""Which model a front end runs and how it loads: ``--model`` resolved to a hub id, a diffusers folder or a
single-file checkpoint, the folder's recommended settings, and the pipeline loaded as every front end loads it."""

from __future__ import annotations

import os
import re
from typing import Dict, NamedTuple, Optional, Tuple

from ..defaults import DEFAULT_LAYERS
from .errors import UsageError, describe_error, one_line

EMBEDDED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "embedded")
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")  # single-file checkpoints
DEFAULTS: Dict[str, object] = {
    "num_inference_steps": 25, "guidance_scale": 5.0, "tpg_scale": 3.0, "sampler": "euler", "sigma_schedule": "model",
}  # fmt: skip


class ChosenModel(NamedTuple):
    """``--model`` resolved: what to load, its recommended settings, and its family (None: a hub id not cached)."""

    path: str
    settings: Dict[str, object]
    family: Optional[str]


# A family's (or one of its models': ``flux-schnell``) pipeline arguments over DEFAULTS; None removes a default.
# Flux.1: ``--cfg`` is true CFG (``true_cfg_scale``, on with a negative prompt, as in diffusers), while
# ``guidance_scale`` is the distilled guidance embedding, left at the pipeline's default (dev and Kontext 3.5; schnell
# has no embedding: 0, as the official NAG Flux README runs it). NAG: the official NAG Flux settings (tau 2.5, alpha
# 0.25; Kontext ``nag_end`` 0.25); schnell takes 4 steps. TPG is experimental on Flux and off unless asked for.
# Chroma: ``guidance_scale`` is its CFG, as for SDXL; ChromaPipeline's 35 steps, NAG as on Flux.
FAMILY_DEFAULTS: Dict[str, Dict[str, object]] = {
    "flux": {"num_inference_steps": 28, "guidance_scale": None, "true_cfg_scale": 4.0, "tpg_scale": 0.0, "nag_tau": 2.5, "nag_alpha": 0.25},
    "flux-schnell": {"num_inference_steps": 4, "guidance_scale": 0.0},
    "flux-kontext": {"nag_end": 0.25},
    "chroma": {"num_inference_steps": 35, "nag_tau": 2.5, "nag_alpha": 0.25},
}  # fmt: skip


def family_defaults(family: Optional[str], variant: Optional[str] = None) -> Dict[str, object]:
    """``DEFAULTS`` with ``family``'s default TPG layers (SDXL's when the family is not known before loading) and its
    ``FAMILY_DEFAULTS``, then those of its model ``variant`` (``loading.model_variant``: Flux.1 schnell, Kontext)."""
    settings = {**DEFAULTS, "tpg_applied_layers_index": DEFAULT_LAYERS[family or "sdxl"]["tpg"]}
    settings.update(FAMILY_DEFAULTS.get(family or "", {}))
    settings.update(FAMILY_DEFAULTS.get(f"{family}-{variant}", {}))
    return {name: value for name, value in settings.items() if value is not None}


def recommended_settings(model_folder: Optional[str], family: Optional[str] = None, variant: Optional[str] = None) -> Dict[str, object]:
    """Pipeline arguments recommended for the model (``recommended.json`` beside its weights) over the defaults of
    its family and model (``FAMILY_DEFAULTS``)."""
    from ..loading import read_recommended

    return {**family_defaults(family, variant), **(read_recommended(model_folder) if model_folder else {})}


def model_family(path: str, allow_pickle: bool = False) -> Optional[str]:
    """The family of the model at ``path`` (``sdxl``, ``sd``, ``sd3``, ``flux``, ``chroma``) read from its files without loading it; None for a
    hub id that is not in the local cache. UsageError naming the supported families for any other model."""
    import pickle

    from ..loading import detect_family

    try:
        return detect_family(path, allow_pickle)
    except OSError:  # a hub id neither cached nor reachable: loading it will say so
        return None
    except pickle.UnpicklingError:
        raise refused_pickle(path) from None
    except ValueError as error:
        raise UsageError(f"--model {path}: {one_line(str(error))}") from None


def refused_pickle(path: str) -> UsageError:
    """The error for a pickle that ``torch.load(weights_only=True)`` refuses: it holds objects or code."""
    return UsageError(f"--model {path}: torch.load(weights_only=True) refused it: the file holds objects or code, not only "
                      "tensors; nothing of it was run. Convert it to .safetensors where you trust it")  # fmt: skip


def looks_like_hub_id(model: str) -> bool:
    """``name`` or ``owner/name`` in the hub's characters: not a path, not a checkpoint file name."""
    hub_like = re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?", model)
    return bool(hub_like) and not model.lower().endswith(CHECKPOINT_SUFFIXES)


def resolve_model(model: Optional[str]) -> Tuple[str, Optional[str]]:
    """``(what to load, folder holding recommended.json or None)``; UsageError for a path that holds no model.

    ``None`` is the embedded model.
    """
    if model is None:
        if not os.path.isfile(os.path.join(EMBEDDED, "model_index.json")):
            raise UsageError("the embedded model is not installed in this checkout; pass --model <hub id | folder | .safetensors>")
        return EMBEDDED, EMBEDDED
    path = os.path.expanduser(model)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "model_index.json")):
            raise UsageError(f"--model {model}: no diffusers model here (no model_index.json)")
        return path, path
    if os.path.isfile(path):
        if not path.lower().endswith(CHECKPOINT_SUFFIXES):
            suffixes = ", ".join(CHECKPOINT_SUFFIXES)
            raise UsageError(f"--model {model}: not a diffusers folder nor a single-file checkpoint ({suffixes})")
        return path, None
    if os.path.exists(path):
        raise UsageError(f"--model {model}: neither a folder nor a file")
    if not looks_like_hub_id(model):
        raise UsageError(f"--model: no such file or folder: {model}")
    return model, None


def model_and_settings(model: Optional[str], allow_pickle: bool = False) -> ChosenModel:
    """``--model`` resolved, with its recommended settings and family, read without loading the model; UsageError
    when its recommended.json is not JSON, its family is not supported, or it is a pickle-based checkpoint not
    allowed by ``--allow-pickle``."""
    from ..loading import is_pickle_checkpoint, model_variant

    path, folder = resolve_model(model)
    if is_pickle_checkpoint(path) and not allow_pickle:
        raise UsageError(f"--model {model}: a pickle-based checkpoint can run code when loaded; convert it to .safetensors, "
                         "or pass --allow-pickle for a file you trust (it then loads with torch.load(weights_only=True))")  # fmt: skip
    family = model_family(path, allow_pickle)
    try:
        return ChosenModel(path, recommended_settings(folder, family, model_variant(path)), family)
    except ValueError as error:  # json.JSONDecodeError
        raise UsageError(f"--model {path}: recommended.json is not valid JSON: {one_line(str(error))}") from None


def model_identity(model: Optional[str], path: str) -> str:
    """The model as a bulk job's manifest records it: ``embedded``, a real path, or a hub id."""
    if model is None:
        return "embedded"
    return os.path.realpath(path) if os.path.exists(path) else path


def load_model(path: str, device: str = "auto", dtype: str = "auto", compile: bool = False, allow_pickle: bool = False,
               family: Optional[str] = None):  # fmt: skip
    """The pipeline at ``path`` (from ``resolve_model``) on ``device`` (auto, cpu, cuda) in ``dtype`` (auto or a
    torch dtype name), its UNet compiled with the guidance hooks when ``compile``; a pickle-based file only with
    ``allow_pickle``. ``family`` (from ``model_and_settings``) spares reading it from the files again. UsageError
    when it cannot load."""
    import pickle

    import torch
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from ..loading import default_dtype, load_pipeline

    for library_logging in (diffusers_logging, transformers_logging):
        library_logging.disable_progress_bar()
        library_logging.set_verbosity_error()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available here; use --device cpu")
    torch_dtype = default_dtype(device, family) if dtype == "auto" else getattr(torch, dtype)
    local = os.path.exists(path)
    try:
        pipe = load_pipeline(path, device=device, dtype=torch_dtype, family=family, allow_pickle=allow_pickle)
    except OSError as error:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or "offline" in str(error).lower() or "cache" in str(error).lower()
        if offline and not local:
            raise UsageError(
                f"--model {path}: not in the local Hugging Face cache and this machine is offline; "
                f"on a machine with a network run `hf download {path}` (or copy the folder here)"
            ) from None
        raise UsageError(f"--model {path}: {describe_error(error)}") from None
    except pickle.UnpicklingError:
        raise refused_pickle(path) from None
    except (ValueError, TypeError, KeyError) as error:  # a folder or file that is not a loadable model
        raise UsageError(f"--model {path}: cannot load it: {describe_error(error)}") from None
    if compile:
        from ..compiled import compile_unet

        if getattr(pipe, "unet", None) is None:
            raise UsageError(f"--compile: compiling is available for UNet models, not yet for {pipe.family.title}")
        pipe.unet = compile_unet(pipe.unet)
    return pipe
