"""Bulk generation (``dualguide batch``): one small module per job.

- ``prompts``   read a ``.txt`` / ``.jsonl`` prompt file into checked lines (file:line in every message)
- ``plan``      every image's id, prompt, seed and settings, and the pipeline calls that make them
- ``manifest``  append-only ``manifest.jsonl`` / ``failures.jsonl``: atomic lines, what is done, what conflicts
- ``processes`` one process per device with accelerate's ``PartialState``: the shard of this process
- ``progress``  the main process's progress bar over the whole job, counted from the manifest
- ``lock``      one job at a time per output folder (``flock``, taken by the main process; a killed job leaves none)
- ``run``       make this process's images: pipeline calls, PNGs, manifest lines, failures
- ``batch``     a whole job from the command's options: plan (checked before any load), make, report

The modules read one way: prompts <- plan <- manifest <- progress, run <- batch, and lock <- batch. They call
the library layer (``dualguide.generation``) and the shared options (``dualguide.options``), never a front end.
Importing this package does not import torch.
"""

from .manifest import Manifest, append_line, read_lines
from .plan import ImageJob, canonical, image_calls, plan_images
from .prompts import PromptFileError, PromptLine, read_prompt_file

__all__ = [
    "ImageJob", "Manifest", "PromptFileError", "PromptLine", "append_line", "canonical", "image_calls",
    "plan_images", "read_lines", "read_prompt_file",
]  # fmt: skip
