"""Load the guided pipeline of a model's family (SDXL, Stable Diffusion 1.x / 2.x, Stable Diffusion 3 / 3.5, Flux.1,
Chroma) from a hub id, a local folder or a single-file checkpoint (.safetensors; pickle-based files only when allowed;
none yet for the transformer families), and the ``recommended.json`` sampling settings a model folder may hold beside
its weights. ``detect_family`` tells the family without loading anything, ``model_variant`` which of its models."""

from __future__ import annotations

import json
import os
import struct
from typing import TYPE_CHECKING, Dict, Optional, Union

if TYPE_CHECKING:  # torch loads with the first model: reading recommended.json stays fast
    import torch

RECOMMENDED_FILE = "recommended.json"

# diffusers' pipeline classes (``model_index.json``'s ``_class_name``) of each family: every SDXL class name
# starts with SDXL_CLASS_PREFIX, every SD3 / SD3.5 one with SD3_CLASS_PREFIX; the SD 1.x / 2.x ones are listed
# (other "StableDiffusion..." classes are other families).
SDXL_CLASS_PREFIX = "StableDiffusionXL"
SD3_CLASS_PREFIX = "StableDiffusion3"
SD_CLASSES = (
    "StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline",
    "StableDiffusionControlNetPipeline", "StableDiffusionControlNetImg2ImgPipeline",
    "StableDiffusionControlNetInpaintPipeline", "StableDiffusionPAGPipeline", "StableDiffusionTPGPipeline",
    "StableDiffusionTPGImg2ImgPipeline", "StableDiffusionTPGInpaintPipeline", "StableDiffusionControlNetTPGPipeline",
)  # fmt: skip
# A single-file checkpoint's text-encoder keys -> its family (the first prefix found decides).
FAMILY_KEYS = (
    ("conditioner.embedders.1.", "sdxl"),  # SDXL: CLIP ViT-L and OpenCLIP ViT-bigG
    ("cond_stage_model.model.", "sd"),  # SD 2.x: OpenCLIP ViT-H
    ("cond_stage_model.transformer.", "sd"),  # SD 1.x: CLIP ViT-L
)
# A single-file checkpoint with an MMDiT (SD3 / SD3.5: its joint blocks, in the original layout with or without
# the LDM prefix) has no loader here yet.
MMDIT_KEYS = ("model.diffusion_model.joint_blocks.", "joint_blocks.")
FAMILY_PIPELINES = {
    "sdxl": "StableDiffusionXLTPGPipeline", "sd": "StableDiffusionTPGPipeline", "sd3": "StableDiffusion3TPGPipeline",
    "flux": "FluxTPGPipeline", "chroma": "ChromaTPGPipeline",
}  # fmt: skip
# The families whose classes (diffusers' and this project's) are named one by one: ``_class_name`` -> (family, the
# guided pipeline that loads the folder). A Kontext folder loads as the editing pipeline; an img2img folder as its
# family's text-to-image one (the front ends move it to img2img with ``from_pipe``). A class whose guided pipeline is
# not in ``dualguide.pipelines`` yet is refused as unsupported, so a new pipeline plugs in by its name here.
CLASS_PIPELINES = {
    "FluxPipeline": ("flux", "FluxTPGPipeline"), "FluxTPGPipeline": ("flux", "FluxTPGPipeline"),
    "FluxImg2ImgPipeline": ("flux", "FluxTPGPipeline"), "FluxTPGImg2ImgPipeline": ("flux", "FluxTPGPipeline"),
    "FluxKontextPipeline": ("flux", "FluxKontextTPGPipeline"), "FluxKontextTPGPipeline": ("flux", "FluxKontextTPGPipeline"),
    "ChromaPipeline": ("chroma", "ChromaTPGPipeline"), "ChromaTPGPipeline": ("chroma", "ChromaTPGPipeline"),
    "ChromaImg2ImgPipeline": ("chroma", "ChromaTPGPipeline"), "ChromaTPGImg2ImgPipeline": ("chroma", "ChromaTPGPipeline"),
}  # fmt: skip
KONTEXT_CLASSES = ("FluxKontextPipeline", "FluxKontextTPGPipeline")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")  # single-file checkpoints whose loading unpickles


def is_pickle_checkpoint(model: Union[str, os.PathLike]) -> bool:
    """True for a single-file checkpoint in a pickle-based format (``.ckpt``, ``.pt``, ``.pth``, ``.bin``)."""
    return os.path.isfile(model) and os.fspath(model).lower().endswith(PICKLE_SUFFIXES)


def check_checkpoint(model: Union[str, os.PathLike], allow_pickle: bool) -> None:
    """ValueError naming ``allow_pickle`` for a pickle-based checkpoint that was not allowed: unpickling a file
    from elsewhere can run its code. Allowed, it loads with ``torch.load(weights_only=True)``."""
    if is_pickle_checkpoint(model) and not allow_pickle:
        raise ValueError(
            f"{os.fspath(model)} is a pickle-based checkpoint, which can run code when loaded; convert it to .safetensors, "
            "or pass allow_pickle=True for a file you trust (it then loads with torch.load(weights_only=True))"
        )


BFLOAT16_FAMILIES = ("flux", "chroma")  # trained in bfloat16; in float16 their text encoders' activations overflow


def default_dtype(device: Union[str, "torch.device"], family: Optional[str] = None) -> "torch.dtype":
    """float16 on CUDA (bfloat16 for ``BFLOAT16_FAMILIES``), float32 elsewhere: the dtype the command and the examples
    use unless told."""
    import torch

    if torch.device(device).type != "cuda":
        return torch.float32
    return torch.bfloat16 if family in BFLOAT16_FAMILIES else torch.float16


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


def _unsupported(what: str) -> ValueError:
    from .families import supported_families

    return ValueError(f"{what} is not a supported model family; supported: {supported_families()}")


def _family_of_class(class_name: str, source: str) -> str:
    if class_name in CLASS_PIPELINES:
        from . import pipelines

        family, pipeline = CLASS_PIPELINES[class_name]
        if pipeline not in pipelines.__all__:
            raise _unsupported(f"{source} ({class_name}: no {pipeline} here yet)")
        return family
    if class_name.startswith(SDXL_CLASS_PREFIX):
        return "sdxl"
    if class_name.startswith(SD3_CLASS_PREFIX):
        return "sd3"
    if class_name in SD_CLASSES:
        return "sd"
    raise _unsupported(f"{source} ({class_name or 'no _class_name'})")


def _pickle_keys(path: str):
    """Tensor names of a pickle-based checkpoint, read with ``torch.load(weights_only=True)`` (no code runs;
    memory-mapped where the file's format allows); a ``state_dict`` entry is looked into."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # the legacy (non-zip) format cannot be memory-mapped
        state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        return []
    return state.get("state_dict", state).keys()


def _safetensors_keys(path: str):
    """Tensor names in a .safetensors file's header (8-byte little-endian length, then JSON), read without the weights."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        if length > 100_000_000:
            raise ValueError(f"{path}: not a .safetensors file (header of {length} bytes)")
        return json.loads(f.read(length)).keys()


def _model_index(model: str) -> Optional[str]:
    """``model_index.json`` of a folder, or of a hub id (from the local cache, or downloaded where a network
    exists); None when there is none."""
    if os.path.isdir(model):
        path = os.path.join(model, "model_index.json")
        return path if os.path.isfile(path) else None
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(model, "model_index.json")
    except (OSError, ValueError):  # not a repo id, not cached offline, no such file: the caller says what is missing
        return None


def detect_family(model: Union[str, os.PathLike], allow_pickle: bool = False) -> str:
    """The family (``"sdxl"``, ``"sd"``, ``"sd3"``, ``"flux"``, ``"chroma"``) of a diffusers folder (its
    ``model_index.json``'s ``_class_name``: ``StableDiffusionXL*``, SD 1.x / 2.x's classes, ``StableDiffusion3*``, the
    classes of ``CLASS_PIPELINES`` whose guided pipeline exists), a single ``.safetensors``
    checkpoint (its text-encoder keys: SDXL ``conditioner.embedders.1``, SD 1.x ``cond_stage_model.transformer``,
    SD 2.x ``cond_stage_model.model``) or a hub id (cached, or downloaded).

    Reads no weights, but for a pickle-based checkpoint (only with ``allow_pickle``; read with
    ``torch.load(weights_only=True)``). ``ValueError`` (one line, naming the supported families) for anything else;
    for a single-file SD3 / SD3.5 checkpoint (MMDiT ``joint_blocks`` keys) one saying to use a diffusers folder.
    """
    model = os.fspath(model)
    if os.path.isfile(model):
        check_checkpoint(model, allow_pickle)
        keys = _pickle_keys(model) if is_pickle_checkpoint(model) else _safetensors_keys(model)
        if any(key.startswith(MMDIT_KEYS) for key in keys):
            raise ValueError(
                f"{model} is a single-file SD3 / SD3.5 (MMDiT) checkpoint; these are not supported yet: "
                "use the model's diffusers folder (model_index.json, transformer/, text_encoder*/, vae/, ...) instead"
            )
        for prefix, family in FAMILY_KEYS:
            if any(key.startswith(prefix) for key in keys):
                return family
        raise _unsupported(f"{model} (no SDXL or SD 1.x/2.x text-encoder keys)")
    return _family_of_class(model_class(model), model)


def model_class(model: str) -> str:
    """``model_index.json``'s ``_class_name`` of a diffusers folder or hub id (``""`` when it has none); OSError for a
    hub id neither cached nor downloadable, ValueError for a folder without ``model_index.json``."""
    index = _model_index(model)
    if index is None and not os.path.isabs(model) and not os.path.exists(model):  # a hub id: OSError, as a failed download
        raise OSError(f"{model}: no model_index.json in the local Hugging Face cache, and it could not be downloaded")
    if index is None:
        raise ValueError(f"{model}: no model_index.json found (not a diffusers folder)")
    with open(index, encoding="utf-8") as f:
        return json.load(f).get("_class_name", "")


def model_variant(model: Union[str, os.PathLike]) -> Optional[str]:
    """Which model of the Flux.1 family a diffusers folder (or cached hub id) holds, where the front ends' defaults
    differ: ``"kontext"`` (``FluxKontextPipeline``, ``KONTEXT_CLASSES``), ``"schnell"`` (a transformer without the guidance embedding),
    ``"dev"``; None for other families and for what cannot be read without loading."""
    model = os.fspath(model)
    if os.path.isfile(model):
        return None
    try:
        class_name = model_class(model)
    except (OSError, ValueError):
        return None
    if CLASS_PIPELINES.get(class_name, ("",))[0] != "flux":
        return None
    if class_name in KONTEXT_CLASSES:
        return "kontext"
    config = os.path.join(os.path.dirname(_model_index(model)), "transformer", "config.json")
    if not os.path.isfile(config):
        return None
    with open(config, encoding="utf-8") as f:
        return "dev" if json.load(f).get("guidance_embeds", False) else "schnell"


def load_pipeline(model: Optional[str] = None, device: str = "cpu", dtype: Optional["torch.dtype"] = None, family: Optional[str] = None,
                  allow_pickle: bool = False):  # fmt: skip
    """The guided pipeline of ``model``'s family; ``None`` gives a random-weight tiny SDXL-layout model (no download).

    ``model`` may be a diffusers folder, a single-file checkpoint (``.safetensors``/``.ckpt``)
    or a hub id already in the local cache (or downloadable where a network exists); a single file takes its
    component configs from its model type's hub repo (``single_file_config_repo``) in the local cache (SD3: not
    yet, use a diffusers folder). ``family`` (``"sdxl"``, ``"sd"``, ``"sd3"``, ``"flux"``, ``"chroma"``) skips ``detect_family``; a Flux.1 Kontext
    folder loads as ``FluxKontextTPGPipeline``. A pickle-based file (``.ckpt``, ``.pt``, ``.pth``, ``.bin``) is
    refused unless ``allow_pickle``; then it loads with ``torch.load(weights_only=True)``, as diffusers loads it.
    """
    import torch

    from . import pipelines

    dtype = dtype or torch.float32
    if model is None:
        from .tiny import build_tiny_sdxl

        pipe = pipelines.StableDiffusionXLTPGPipeline(**build_tiny_sdxl(), add_watermarker=False)
        if dtype != torch.float32:
            pipe.to(dtype=dtype)
    else:
        check_checkpoint(model, allow_pickle)
        family = family or detect_family(model, allow_pickle)
        if family not in FAMILY_PIPELINES:
            raise ValueError(f"family must be one of {', '.join(FAMILY_PIPELINES)}, got {family!r}")
        cls = getattr(pipelines, _pipeline_name(model, family))
        # float32 is what the loaders give by default; naming it only adds a deprecation warning.
        options = {} if dtype == torch.float32 else {"torch_dtype": dtype}
        pipe = _from_single_file(cls, model, options) if os.path.isfile(model) else cls.from_pretrained(model, **options)
    return pipe.to(device)


def _pipeline_name(model: str, family: str) -> str:
    """The guided pipeline that loads ``model``: its class's in ``CLASS_PIPELINES`` (Kontext), else its family's."""
    listed = family in {listed for listed, _ in CLASS_PIPELINES.values()}
    if listed and not os.path.isfile(model) and model_class(model) in CLASS_PIPELINES:
        return CLASS_PIPELINES[model_class(model)][1]
    return FAMILY_PIPELINES[family]


def single_file_config_repo(path: str) -> str:
    """The hub repo whose component configs (``model_index.json``, ``unet/config.json``, ..., tokenizer files)
    diffusers' ``from_single_file`` takes for the checkpoint at ``path``, by its keys (SD 1.x:
    ``stable-diffusion-v1-5/stable-diffusion-v1-5``). Reads the whole file."""
    from diffusers.loaders.single_file_utils import fetch_diffusers_config, load_single_file_checkpoint

    return fetch_diffusers_config(load_single_file_checkpoint(path))["pretrained_model_name_or_path"]


def _from_single_file(cls, path: str, options: dict):
    """``cls.from_single_file``; OSError naming the repo to download when its configs are neither cached nor reachable."""
    from huggingface_hub.utils import LocalEntryNotFoundError

    try:
        return cls.from_single_file(path, **options)
    except LocalEntryNotFoundError:
        pass  # read the file again after the handler: its traceback, holding the first copy, is gone then
    repo = single_file_config_repo(path)
    raise OSError(
        f"the configs of this checkpoint's model type (hub repo {repo}) are not in the local Hugging Face cache and cannot "
        f"be downloaded here; where a network exists run `hf download {repo} --include '*.json' '*.txt'` and copy the cache here"
    )
