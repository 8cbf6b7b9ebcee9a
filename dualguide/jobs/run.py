"""Make this process's images: one pipeline call per group, then for each image its PNG and manifest line.

A failed call of several images is retried image by image, so that one bad image does not take its
neighbours down; an image that still fails gets a line in ``failures.jsonl`` and the job goes on. A full disk
stops the job at once (``OutOfSpace``), as every later image would fail too: what was written stays, a rerun
after space is freed makes the rest.
"""

from __future__ import annotations

import errno
import os
import shutil
import time
from typing import Callable, Dict, List, Optional, Sequence

from ..generation.images import signals_held
from ..generation.progress import StepProgress, planned_steps
from .manifest import Manifest
from .plan import ImageJob, image_calls

SaveImage = Callable[[object, str, Dict[str, object]], None]  # (image, path, PNG metadata)
Describe = Callable[[BaseException], str]  # an error as one line
Label = Callable[[ImageJob], str]  # what a step bar shows while a call makes this image (the first of its call)


class OutOfSpace(OSError):
    """The disk (or quota) of the output folder is full; its message names the folder and the free space."""

    def __init__(self, out: str):
        free = shutil.disk_usage(out).free / 2**20
        super().__init__(
            errno.ENOSPC,
            f"--out {os.path.abspath(out)}: no space left on the device ({free:.1f} MiB free); "
            "free some space and rerun the same command to make the remaining images",
        )


def out_of_space(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)


def remove_stale_partials(out: str, jobs: Sequence[ImageJob], manifest: Manifest) -> None:
    """Remove temporary PNGs (``.<file>.<pid>.<random>.partial``) left by a killed run for these images.

    Only this process writes these images' files, so what is there is stale.
    """
    names = {job.file for job in jobs} | {str(manifest.latest[job.id].get("file")) for job in jobs if job.id in manifest.latest}
    for entry in os.listdir(out):
        if entry.startswith(".") and entry.endswith(".partial") and entry[1:].rsplit(".", 3)[0] in names:
            try:
                os.remove(os.path.join(out, entry))
            except FileNotFoundError:
                pass


def make_images(
    pipe, jobs: Sequence[ImageJob], batch_size: int, manifest: Manifest, save: SaveImage, describe: Describe,
    progress: Optional[StepProgress] = None, label: Optional[Label] = None,
) -> List[ImageJob]:
    """Make ``jobs`` (this process's images not yet done), ``batch_size`` per call; the images that failed. Each
    call moves ``progress`` (when given) step by step, showing ``label`` of its first image (default: its prompt).

    OutOfSpace when the disk is full: the job stops; a rerun remakes the images without a whole manifest line.
    """
    try:
        return _make(pipe, jobs, batch_size, manifest, save, describe, progress, label)
    except OSError as error:
        if out_of_space(error):
            raise OutOfSpace(manifest.out) from error
        raise


def _make(
    pipe, jobs: Sequence[ImageJob], batch_size: int, manifest: Manifest, save: SaveImage, describe: Describe,
    progress: Optional[StepProgress], label: Optional[Label],
) -> List[ImageJob]:
    import torch

    failed: List[ImageJob] = []
    for call in image_calls(jobs, batch_size):
        started = time.perf_counter()
        try:
            images = _generate(pipe, call, torch, progress, label)
        except Exception as error:  # noqa: BLE001 - recorded, the job goes on
            if len(call) == 1:
                manifest.record_failure(call[0], describe(error))
                failed.append(call[0])
                continue
            failed += _make(pipe, call, 1, manifest, save, describe, progress, label)  # find the image(s) at fault
            continue
        seconds = (time.perf_counter() - started) / len(call)
        for job, image in zip(call, images):
            begun = time.perf_counter()
            with signals_held():  # SIGINT / SIGTERM wait: an image has its PNG and its manifest line, or neither
                try:
                    _write(job, image, manifest, save)
                except Exception as error:  # noqa: BLE001
                    if out_of_space(error):
                        raise
                    manifest.record_failure(job, describe(error))
                    failed.append(job)
                    continue
                manifest.record(job, seconds + time.perf_counter() - begun)
            _remove_replaced(job, manifest)
    return failed


def _generate(pipe, call: Sequence[ImageJob], torch, progress: Optional[StepProgress], label: Optional[Label]) -> list:
    first = call[0]
    negative = None if first.negative is None else [job.negative for job in call]
    generators = [torch.Generator().manual_seed(job.seed) for job in call]
    moving = {} if progress is None else progress.call_arguments(label(first) if label else first.prompt, len(call), planned_steps(pipe, first.settings))
    images = pipe(
        prompt=[job.prompt for job in call], negative_prompt=negative, generator=generators, num_images_per_prompt=1, **first.settings, **moving
    ).images
    if progress is not None:
        progress.call_done()
    if len(images) != len(call):
        raise RuntimeError(f"the pipeline returned {len(images)} images for {len(call)} prompts")
    return images


def _write(job: ImageJob, image, manifest: Manifest, save: SaveImage) -> None:
    """The PNG, atomic and fsynced, so that it exists whenever its manifest line does."""
    path = os.path.join(manifest.out, job.file)
    save(image, path, {"id": job.id, "prompt": job.prompt, "seed": job.seed, "model": job.model, "negative_prompt": job.negative, **job.settings})
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _remove_replaced(job: ImageJob, manifest: Manifest) -> None:
    """After ``--overwrite`` gave an id another seed or prompt (so another file name): remove its old PNG."""
    old = manifest.latest.get(job.id, {}).get("file")
    if old and old != job.file:
        try:
            os.remove(os.path.join(manifest.out, str(old)))
        except FileNotFoundError:
            pass
