"""The task of a generation: text-to-image, img2img, inpainting, each with or without a ControlNet, chosen
by the options ``--image``, ``--mask`` and ``--control``.

``read_task`` checks the files the command names (before any model loads); ``task_pipeline`` moves a
loaded text-to-image pipeline to the task's pipeline with ``from_pipe`` (no weights reloaded);
``task_arguments`` gives the pipeline arguments the task adds. The metadata of each PNG names the
files, never the pixels.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, Optional, Tuple

if TYPE_CHECKING:
    from PIL import Image

class TaskError(ValueError):
    """A task option or the file it names is unusable; the message names the option."""


@dataclass
class Task:
    """The inputs a command adds to its prompt; all ``None`` for text-to-image."""

    image: Optional["Image.Image"] = None
    mask: Optional["Image.Image"] = None
    control: Optional["Image.Image"] = None
    controlnet: Optional[str] = None
    strength: Optional[float] = None
    control_scale: Optional[float] = None
    files: Dict[str, str] = field(default_factory=dict)  # option -> path, for the metadata

    @property
    def name(self) -> str:
        """``text2img``, ``img2img`` or ``inpaint``, with ``controlnet-`` in front when a ControlNet steers it."""
        base = "inpaint" if self.mask is not None else "img2img" if self.image is not None else "text2img"
        return f"controlnet-{base}" if self.controlnet else base


def _open_image(path: str, option: str, mode: str) -> "Image.Image":
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        raise TaskError(f"{option}: no such file: {path}")
    try:
        with Image.open(path) as image:
            return image.convert(mode)
    except (UnidentifiedImageError, OSError) as error:
        raise TaskError(f"{option} {path}: not an image ({error})") from None


def _resolve_controlnet(model: str) -> str:
    path = os.path.expanduser(model)
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        raise TaskError(f"--controlnet {model}: no ControlNet here (no config.json)")
    if os.path.exists(path) and not os.path.isdir(path):
        raise TaskError(f"--controlnet {model}: give a diffusers ControlNet folder or hub id, not a file")
    return path if os.path.isdir(path) else model


def read_task(image: Optional[str], mask: Optional[str], strength: Optional[float], control: Optional[str],
              controlnet: Optional[str], control_scale: Optional[float]) -> Task:  # fmt: skip
    """The task named by the command's options, its files opened; ``TaskError`` naming the option otherwise."""
    if mask is not None and image is None:
        raise TaskError("--mask needs --image (the picture to repaint)")
    if strength is not None and image is None:
        raise TaskError("--strength needs --image (it says how much of the picture to redo)")
    if (control is None) != (controlnet is None):
        raise TaskError("--control and --controlnet go together: the conditioning picture and the ControlNet model")
    if control_scale is not None and control is None:
        raise TaskError("--control-scale needs --control and --controlnet")
    task = Task(strength=strength, control_scale=control_scale)
    for option, path, mode in (("--image", image, "RGB"), ("--mask", mask, "L"), ("--control", control, "RGB")):
        if path is not None:
            setattr(task, option[2:], _open_image(path, option, mode))
            task.files[option[2:]] = os.path.abspath(path)
    if task.mask is not None and task.mask.size != task.image.size:
        raise TaskError(f"--mask: {_size(task.mask.size)} pixels, but --image is {_size(task.image.size)}; give a mask of the image's size")
    if controlnet is not None:
        task.controlnet = _resolve_controlnet(controlnet)
        task.files["controlnet"] = task.controlnet
    return task


def _size(size: Tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


# The guided pipeline of each task, per model family (``pipe.family.name``); text-to-image is the loaded pipeline.
TASK_PIPELINES: Dict[str, Dict[str, str]] = {
    "sdxl": {
        "img2img": "StableDiffusionXLTPGImg2ImgPipeline", "inpaint": "StableDiffusionXLTPGInpaintPipeline",
        "controlnet-text2img": "StableDiffusionXLControlNetTPGPipeline",
        "controlnet-img2img": "StableDiffusionXLControlNetTPGImg2ImgPipeline",
        "controlnet-inpaint": "StableDiffusionXLControlNetTPGInpaintPipeline",
    },
    "sd": {
        "img2img": "StableDiffusionTPGImg2ImgPipeline", "inpaint": "StableDiffusionTPGInpaintPipeline",
        "controlnet-text2img": "StableDiffusionControlNetTPGPipeline",
        "controlnet-img2img": "StableDiffusionControlNetTPGImg2ImgPipeline",
        "controlnet-inpaint": "StableDiffusionControlNetTPGInpaintPipeline",
    },
    "sd3": {"img2img": "StableDiffusion3TPGImg2ImgPipeline"},
    "flux": {"img2img": "FluxTPGImg2ImgPipeline"},
    "chroma": {"img2img": "ChromaTPGImg2ImgPipeline"},
    # Keyed by the loaded pipeline's class: a Flux.1 Kontext folder edits --image, and makes text-to-image without one.
    "FluxKontextTPGPipeline": {"text2img": "FluxTPGPipeline", "img2img": "FluxKontextTPGPipeline"},
}  # fmt: skip
TASK_OPTIONS = {"img2img": "--image", "inpaint": "--mask"}  # the option that asks for a task (else --control)


def task_pipeline(pipe, task: Task):
    """``pipe`` (text-to-image, or Kontext's editing) as the task's pipeline of its family (or of its class, in
    ``TASK_PIPELINES``); the same modules, the ControlNet loaded beside them. TaskError naming the option when the
    family has no such pipeline (yet)."""
    from .. import pipelines

    class_tasks = TASK_PIPELINES.get(type(pipe).__name__, {})
    if task.name == "text2img" and task.name not in class_tasks:
        return pipe
    family_tasks = class_tasks or TASK_PIPELINES.get(pipe.family.name, {})
    if family_tasks.get(task.name) not in pipelines.__all__:
        option = TASK_OPTIONS.get(task.name, "--control")
        raise TaskError(f"{option}: the {task.name} task is not available for {pipe.family.title} models yet; text-to-image is")
    task_class = getattr(pipelines, family_tasks[task.name])
    if task_class is type(pipe) and task.controlnet is None:
        return pipe
    if task.controlnet is None:
        return task_class.from_pipe(pipe)
    from diffusers import ControlNetModel

    try:
        controlnet = ControlNetModel.from_pretrained(task.controlnet, torch_dtype=pipe.unet.dtype).to(pipe.device)
    except (OSError, ValueError, TypeError, KeyError) as error:  # not a ControlNet, not in the cache offline
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise TaskError(f"--controlnet {task.controlnet}: cannot load it: {first_line}") from None
    return task_class.from_pipe(pipe, controlnet=controlnet)


def task_arguments(task: Task, kwargs: Dict[str, object], pipe) -> Dict[str, object]:
    """``kwargs`` with the task's inputs added for ``pipe`` (from ``task_pipeline``); its pictures resized to
    ``width`` x ``height`` when those are set.

    Without a size the pipeline takes the init image's size (as diffusers does; Kontext: its own output size and
    resizing of the picture); with one, Kontext's ``max_area`` is that size's, its picture kept. The ControlNet picture is
    ``image`` of the text-to-image ControlNet pipeline and ``control_image`` of the others, as in diffusers.
    """
    arguments = dict(kwargs)
    size = (arguments.get("width"), arguments.get("height"))
    sized = size[0] is not None and size[1] is not None

    def fit(picture):
        return picture.resize(size) if sized and picture.size != size else picture

    if task.image is not None:
        arguments["image"] = fit(task.image)
    if task.mask is not None:
        arguments["mask_image"] = fit(task.mask)
    if task.strength is not None:
        arguments["strength"] = task.strength
    if task.control is not None:
        arguments["control_image" if task.image is not None else "image"] = fit(task.control)
    if task.control_scale is not None:
        arguments["controlnet_conditioning_scale"] = task.control_scale
    parameters = inspect.signature(pipe.__call__).parameters
    if task.image is not None and "height" not in parameters:  # img2img: the image sets the size
        arguments.pop("width", None)
        arguments.pop("height", None)
    if task.image is not None and sized and "max_area" in parameters:  # Kontext: --size is the output, the picture fit to it
        arguments.update(max_area=size[0] * size[1], _auto_resize=False)
    return arguments


def task_metadata(task: Task) -> Dict[str, object]:
    """What the PNG metadata records of the task: its name, files and numbers; nothing for text-to-image."""
    if task.name == "text2img":
        return {}
    metadata: Dict[str, object] = {"task": task.name, **task.files}
    if task.strength is not None:
        metadata["strength"] = task.strength
    if task.control_scale is not None:
        metadata["controlnet_conditioning_scale"] = task.control_scale
    return metadata
