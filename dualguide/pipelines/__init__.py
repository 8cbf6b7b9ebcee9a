"""Guided pipelines, one module per diffusers task and family, all thin over ``GuidedSamplingMixin``.

The names load lazily: text-to-image alone does not import diffusers' img2img, inpainting and
ControlNet pipelines.
"""

from ..lazy import lazy_exports

_EXPORTS = {
    "GuidedSamplingMixin": "guided",
    "apply_nag": "guided",
    "apply_softpag": "guided",
    "StableDiffusionXLTPGPipeline": "text2img",
    "StableDiffusionXLTPGImg2ImgPipeline": "img2img",
    "StableDiffusionXLTPGInpaintPipeline": "inpaint",
    "StableDiffusionXLControlNetTPGPipeline": "controlnet",
    "StableDiffusionXLControlNetTPGImg2ImgPipeline": "controlnet",
    "StableDiffusionXLControlNetTPGInpaintPipeline": "controlnet",
    "StableDiffusionTPGPipeline": "sd_text2img",
    "StableDiffusionTPGImg2ImgPipeline": "sd_img2img",
    "StableDiffusionTPGInpaintPipeline": "sd_inpaint",
    "StableDiffusionControlNetTPGPipeline": "sd_controlnet",
    "StableDiffusionControlNetTPGImg2ImgPipeline": "sd_controlnet",
    "StableDiffusionControlNetTPGInpaintPipeline": "sd_controlnet",
    "StableDiffusion3TPGPipeline": "sd3_text2img",
    "StableDiffusion3TPGImg2ImgPipeline": "sd3_img2img",
    "FluxTPGPipeline": "flux_text2img",
    "ChromaTPGPipeline": "chroma_text2img",
    "FluxTPGImg2ImgPipeline": "flux_img2img",
    "FluxKontextTPGPipeline": "flux_kontext",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)


def __dir__():
    return __all__
