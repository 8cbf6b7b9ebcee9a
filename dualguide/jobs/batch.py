"""A whole bulk job from the command's options: plan every image of the prompt file (checked before any model
loads), then make this process's missing images and report the job. ``dualguide batch`` and ``dualguide eval``
both run it."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Dict, List, Optional, Tuple

from ..generation import images, models
from ..generation.errors import UsageError, describe_error
from ..generation.limits import Limits, check_counts, check_settings
from ..generation.settings import SEED_MAX, call_arguments, check_names
from ..options import line_option_parser, with_settings
from .manifest import FAILURES, MANIFEST, Manifest, cut_torn_line, differences
from .plan import ImageJob, plan_images
from .prompts import PromptFileError, PromptLine, option_text, read_prompt_file


def line_options(args: argparse.Namespace, line: PromptLine, parser: argparse.ArgumentParser) -> argparse.Namespace:
    """The command's options with those the line sets, checked as on the command line (UsageError at file:line)."""
    written = {name: option_text(name, value) for name, value in line.options.items()}
    try:
        return with_settings(vars(args), written, parser)
    except ValueError as error:
        raise UsageError(f"{args.prompts}:{line.line}: {error}") from None


def plan_batch(args: argparse.Namespace) -> Tuple[List[ImageJob], str, Optional[str]]:
    """Check the command and its prompt file and plan every image: ``(jobs, model to load, its family)``. Loads no
    model."""
    images.check_output_folder(args.out)
    parser, names = line_option_parser()
    try:
        lines = read_prompt_file(args.prompts, names)
    except PromptFileError as error:
        raise UsageError(str(error)) from None
    model, recommended, family = models.model_and_settings(args.model, args.allow_pickle)
    limits = Limits.from_options(vars(args))
    base = call_arguments(vars(args), recommended)
    check_names(base)
    check_settings(limits, base)
    negative = base.pop("negative_prompt", None)

    def settings_for(line: PromptLine) -> Dict[str, object]:
        if not line.options:
            return base
        kwargs = call_arguments(vars(line_options(args, line, parser)), recommended)
        kwargs.pop("negative_prompt", None)
        try:
            check_names(kwargs)
            check_settings(limits, kwargs)
        except UsageError as error:
            raise UsageError(f"{args.prompts}:{line.line}: {str(error).lstrip('-')}") from None
        return kwargs

    jobs = plan_images(lines, args.seed, args.n, settings_for, negative, models.model_identity(args.model, model))
    check_counts(limits, args.batch_size, len(jobs), "--batch-size")
    for job in jobs:
        if job.seed > SEED_MAX:
            given = next(line.seed is not None for line in lines if line.line == job.line)
            source = 'its line\'s "seed"' if given else f"--seed {args.seed}"
            raise UsageError(f"{args.prompts}:{job.line}: image {job.index} of this line would get seed {job.seed} from {source}, past 2**64-1")
    return jobs, model, family


def run_batch(args: argparse.Namespace, label: Optional[Callable[[ImageJob], str]] = None) -> int:
    """Every image of the prompt file that ``--out`` lacks; this process's share when several run. Exit status.

    With ``label`` (what to show while an image is made) and one process, a terminal shows one bar over the missing
    images x their steps, moved step by step; else a bar of images (all processes', read from the manifest).

    One job at a time per ``--out`` (``lock``): a second one stops with a UsageError before it reads anything there.
    """
    import torch

    from .lock import job_lock
    from .processes import process_state

    jobs, model, family = plan_batch(args)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available here; use --device cpu")
    os.makedirs(args.out, exist_ok=True)
    state = process_state(args.device)
    with job_lock(args.out, state):
        return _run_job(args, jobs, model, family, state, label)


def _run_job(
    args: argparse.Namespace, jobs: List[ImageJob], model: str, family: Optional[str], state, label: Optional[Callable[[ImageJob], str]]
) -> int:
    from ..generation.progress import StepProgress, planned_steps
    from .processes import device_of, finish, shard
    from .progress import JobProgress
    from .run import make_images, remove_stale_partials

    if state.is_main_process:  # a line torn by a killed job or a full disk: the next lines start on their own
        for name in (MANIFEST, FAILURES):
            cut_torn_line(os.path.join(args.out, name))
    manifest = Manifest(args.out)
    conflicts = manifest.conflicts(jobs)
    if conflicts and not args.overwrite:
        job, entry = conflicts[0]
        raise UsageError(
            f"--out {args.out}: {len(conflicts)} image(s) of this job were made there before from other settings "
            f"(first: {job.id}, {entry.get('file')}: {', '.join(differences(entry, job))} differ); "
            "rerun with --overwrite to remake them, or use another --out"
        )
    mine = shard(state, jobs)
    todo = [job for job in mine if not manifest.is_done(job)]
    already = sum(manifest.is_done(job) for job in jobs)
    remove_stale_partials(args.out, mine, manifest)
    show = state.is_main_process and sys.stderr.isatty()
    by_step = label is not None and state.num_processes == 1  # other processes' steps are not seen here
    progress = JobProgress(manifest.path, manifest.failures_path, len(jobs), already, show=show and not by_step)
    if state.num_processes > 1:
        state.wait_for_everyone()  # every process has read the manifest before any writes to it
    failed: List[ImageJob] = []
    pipe = models.load_model(model, device_of(state), args.dtype, args.compile, args.allow_pickle, family) if todo else None
    with progress:  # from here, so that images/s and the ETA do not count the loading
        if pipe is not None:
            pipe.set_progress_bar_config(disable=True)
            total = sum(planned_steps(pipe, job.settings) for job in todo)
            with StepProgress(len(todo), 0, show and by_step, total=total) as steps:  # steps: each call gives its own
                failed = make_images(pipe, todo, args.batch_size, manifest, images.save_png, describe_error, steps, label)
        finish(state)  # the main process waits for the others, so that it reports the whole job
    if conflicts and state.is_local_main_process:
        manifest.compact()  # every process is done: one line per image again
    if not state.is_main_process:
        return 1 if failed else 0
    where = os.path.abspath(args.out)
    print(f"{already + progress.made} of {len(jobs)} image(s) in {where} ({progress.made} made now, {already} already there)")
    if progress.failed:
        print(f"dualguide: error: {progress.failed} image(s) failed; see {os.path.join(where, 'failures.jsonl')} (a rerun retries them)", file=sys.stderr)
        return 1
    return 0
