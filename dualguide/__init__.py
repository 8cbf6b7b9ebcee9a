"""DualGuide-SDXL: training-free TPG + NAG (+ PAG/SoftPAG, CFG) guidance for SDXL in one UNet call per step.

Public names are imported lazily so that ``import dualguide`` (and the ``dualguide`` command) stay fast.
"""

from __future__ import annotations

from .lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    "GuidedDenoiser": "denoiser",
    "Conditioning": "conditioning",
    "encode_sdxl": "conditioning",
    "encode_sd": "conditioning",
    "encode_nag_negative": "conditioning",
    "CFG": "config",
    "TPG": "config",
    "PAG": "config",
    "NAG": "config",
    "Interval": "config",
    "DEFAULT_TPG_LAYERS": "config",
    "DEFAULT_PAG_LAYERS": "config",
    "guided_prediction": "guidance",
    "rescale_guidance": "guidance",
    "nag_extrapolate": "guidance",
    "parse_layer_ids": "layers",
    "resolve_layers": "layers",
    "transformer_blocks": "layers",
    "shuffle_tokens": "perturb",
    "PerturbedSelfAttnProcessor": "perturb",
    "NAGCrossAttnProcessor": "nag",
    "ControlNetInput": "control",
    "GuidedCall": "callstate",
    "current_call": "callstate",
    "guided_call": "callstate",
    "DiscreteModelSchedule": "schedule",
    "StableDiffusionXLTPGPipeline": "pipelines",
    "StableDiffusionXLTPGImg2ImgPipeline": "pipelines",
    "StableDiffusionXLTPGInpaintPipeline": "pipelines",
    "StableDiffusionXLControlNetTPGPipeline": "pipelines",
    "StableDiffusionXLControlNetTPGImg2ImgPipeline": "pipelines",
    "StableDiffusionXLControlNetTPGInpaintPipeline": "pipelines",
    "StableDiffusionTPGPipeline": "pipelines",
    "StableDiffusion3TPGPipeline": "pipelines",
    "FluxTPGPipeline": "pipelines",
    "ChromaTPGPipeline": "pipelines",
    "FluxTPGImg2ImgPipeline": "pipelines",
    "FluxKontextTPGPipeline": "pipelines",
    "StableDiffusion3TPGImg2ImgPipeline": "pipelines",
    "StableDiffusionTPGImg2ImgPipeline": "pipelines",
    "StableDiffusionTPGInpaintPipeline": "pipelines",
    "StableDiffusionControlNetTPGPipeline": "pipelines",
    "StableDiffusionControlNetTPGImg2ImgPipeline": "pipelines",
    "StableDiffusionControlNetTPGInpaintPipeline": "pipelines",
    "TokenPerturbationGuidance": "guiders",
    "NormalizedAttentionGuidance": "guiders",
    "DualGuidance": "guiders",
    "with_nag_negative_prompt": "guiders",
    "ModelFamily": "families",
    "family_of": "families",
    "family_named": "families",
    "detect_family": "loading",
    "apply_softpag": "pipelines",
    "apply_nag": "pipelines",
    "build_tiny_sdxl": "tiny",
    "build_tiny_sd": "tiny",
}

__all__ = sorted(_EXPORTS) + ["__version__"]
__getattr__ = lazy_exports(__name__, _EXPORTS)


def __dir__():
    return __all__
