"""The ``dualguide`` command: ``generate``, ``compare``, ``batch``, ``eval``, ``ui`` and ``samplers``.

Heavy modules (torch, diffusers) are imported only by the subcommands that need them, so
``dualguide --help`` and ``dualguide samplers`` answer at once.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import secrets
import sys
import warnings
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Sequence, Tuple

if TYPE_CHECKING:
    from PIL import Image

    from .tasks import Task

EMBEDDED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "embedded")
SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed takes 0 .. 2**64-1
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")  # single-file checkpoints
DEBUG_VARIABLE = "DUALGUIDE_DEBUG"  # =1: tracebacks and library warnings instead of one line


class UsageError(Exception):
    """A problem with the command line or the files it names: one line on stderr, exit status 2."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors: ``dualguide: error: <message>`` and status 2, no usage block."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"dualguide: error: {_one_line(message)}\n")


def _one_line(text: str) -> str:
    """``text`` without line breaks (the first non-empty line, as the rest is usually a traceback or a hint)."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[0] if lines else ""


def _whole(low: int, high: Optional[int] = None, describe: str = "") -> Callable[[str], int]:
    """An argparse type: an integer in ``low..high``."""
    wanted = describe or (f"a whole number >= {low}" if high is None else f"a whole number in {low}..{high}")

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}")
        return value

    return parse


def _number(low: float = -math.inf, high: float = math.inf, low_open: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite float in ``[low, high]`` (``(low, high]`` when ``low_open``); NaN and inf refused."""
    if high < math.inf:
        wanted = f"a number in {'(' if low_open else '['}{low:g}, {high:g}]"
    else:
        wanted = f"a finite number {'>' if low_open else '>='} {low:g}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}") from None
        too_low = value <= low if low_open else value < low
        if not math.isfinite(value) or too_low or value > high:
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}")
        return value

    return parse


def _interval(text: str) -> Tuple[float, float]:
    wanted = f"START:END fractions with 0 <= START <= END <= 1, such as 0:0.5, got {text!r}"
    try:
        start, end = (float(part) for part in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {wanted}") from None
    if not (math.isfinite(start) and math.isfinite(end) and 0.0 <= start <= end <= 1.0):
        raise argparse.ArgumentTypeError(f"expected {wanted}")
    return start, end


def _size(text: str) -> Tuple[int, int]:
    wanted = f"expected a size in pixels such as 64 or 64x96 (WIDTHxHEIGHT, each >= 1), got {text!r}"
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        raise argparse.ArgumentTypeError(wanted) from None
    if len(parts) not in (1, 2) or min(parts) < 1:
        raise argparse.ArgumentTypeError(wanted)
    return (parts[0], parts[-1])


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="hub id, diffusers folder or .safetensors file (default: the embedded model)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"), default="auto")
    parser.add_argument("--sampler", default=None, help="k-diffusion sampler name (see `dualguide samplers`)")
    parser.add_argument("--schedule", default=None, help="sigma schedule: model, karras, exponential")
    parser.add_argument("--steps", type=_whole(1), default=None, help="sampling steps (>= 1)")
    parser.add_argument("--size", type=_size, default=None, help="pixels, e.g. 64 or 1024x768")
    parser.add_argument("--seed", type=_whole(0, SEED_MAX, "a whole number in 0..2**64-1"), default=0,
                        help="seed of the first image; the others get seed+1, seed+2, ... (default 0)")
    parser.add_argument("--negative", default=None, help="negative prompt (CFG)")
    parser.add_argument("--out", default="outputs", help="output folder (made if missing)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the UNet, guidance hooks included: each new setting compiles first (minutes); for long GPU jobs")


def _add_guidance_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cfg", type=_number(0.0), default=None, help="CFG scale (<= 1: off)")
    parser.add_argument("--tpg", type=_number(0.0), default=None, help="TPG scale (0: off)")
    parser.add_argument("--tpg-layers", default=None, help="TPG layer ids, e.g. d6-d23 or u0-u3,m0")
    parser.add_argument("--pag", type=_number(0.0), default=None, help="PAG scale (0: off)")
    parser.add_argument("--nag", type=_number(0.0), default=None, help="NAG scale (<= 1: off)")
    parser.add_argument("--nag-negative", default=None, help="NAG negative prompt")
    parser.add_argument("--nag-tau", type=_number(0.0, low_open=True), default=None, help="NAG norm ratio cap (> 0)")
    parser.add_argument("--nag-alpha", type=_number(0.0, 1.0), default=None, help="NAG blend (0..1)")
    for term in ("cfg", "tpg", "pag", "nag"):
        parser.add_argument(f"--{term}-interval", type=_interval, default=None, metavar="START:END",
                            help=f"fractions of the schedule where {term.upper()} is on (default 0:1)")  # fmt: skip


def _add_task_arguments(parser: argparse.ArgumentParser) -> None:
    task = parser.add_argument_group("img2img, inpainting, ControlNet (default: text to image)")
    task.add_argument("--image", default=None, metavar="PATH", help="start from this picture (img2img; inpainting with --mask)")
    task.add_argument("--strength", type=_number(0.0, 1.0, low_open=True), default=None,
                      help="how much of --image to redo, in (0, 1] (default: the pipeline's, 0.3 img2img, 0.9999 inpainting)")  # fmt: skip
    task.add_argument("--mask", default=None, metavar="PATH", help="inpainting mask of --image's size: white is repainted")
    task.add_argument("--control", default=None, metavar="PATH", help="ControlNet conditioning picture (with --controlnet)")
    task.add_argument("--controlnet", default=None, metavar="MODEL", help="ControlNet: diffusers folder or hub id")
    task.add_argument("--control-scale", type=_number(0.0), default=None, help="controlnet_conditioning_scale (default 1.0)")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="dualguide",
        description="Training-free dual guidance (TPG + NAG, with CFG and PAG) for SDXL in one UNet call per step.",
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    generate = commands.add_parser("generate", help="write PNGs for one or more prompts")
    generate.add_argument("prompt", nargs="+")
    generate.add_argument("--n", type=_whole(1), default=1, help="images per prompt (>= 1)")
    _add_model_arguments(generate)
    _add_guidance_arguments(generate)
    _add_task_arguments(generate)
    compare = commands.add_parser("compare", help="one labelled grid of the same seed under each guidance mode")
    compare.add_argument("prompt", nargs="+", help="one grid row per prompt, all with the same seed")
    compare.add_argument("--with-pag", action="store_true", help="add a CFG+PAG panel")
    _add_model_arguments(compare)
    _add_guidance_arguments(compare)
    _add_task_arguments(compare)
    _add_batch_parser(commands)
    _add_eval_parser(commands)
    _add_ui_parser(commands)
    commands.add_parser("samplers", help="list the sampler and schedule names")
    return parser


# Command-line option -> pipeline argument of the same setting.
OPTION_ARGUMENTS = {
    "steps": "num_inference_steps", "cfg": "guidance_scale", "tpg": "tpg_scale", "tpg_layers": "tpg_applied_layers_index",
    "pag": "pag_scale", "nag": "nag_scale", "nag_tau": "nag_tau", "nag_alpha": "nag_alpha", "sampler": "sampler",
    "schedule": "sigma_schedule", "negative": "negative_prompt", "nag_negative": "nag_negative_prompt",
}  # fmt: skip
DEFAULTS: Dict[str, object] = {
    "num_inference_steps": 25, "guidance_scale": 5.0, "tpg_scale": 3.0, "tpg_applied_layers_index": "d6-d23",
    "sampler": "euler", "sigma_schedule": "model",
}  # fmt: skip
PANEL_SCALE = 3.0  # PAG / NAG scale of the comparison panels when neither the model nor the command sets one


def recommended_settings(model_folder: Optional[str]) -> Dict[str, object]:
    """Pipeline arguments recommended for the model (``recommended.json`` beside its weights) over SDXL's defaults."""
    from .loading import read_recommended

    return {**DEFAULTS, **(read_recommended(model_folder) if model_folder else {})}


def _looks_like_hub_id(model: str) -> bool:
    """``name`` or ``owner/name`` in the hub's characters: not a path, not a checkpoint file name."""
    hub_like = re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?", model)
    return bool(hub_like) and not model.lower().endswith(CHECKPOINT_SUFFIXES)


def resolve_model(model: Optional[str]) -> Tuple[str, Optional[str]]:
    """``(what to load, folder holding recommended.json or None)``; UsageError for a path that holds no model."""
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
    if not _looks_like_hub_id(model):
        raise UsageError(f"--model: no such file or folder: {model}")
    return model, None


def _probe(folder: str) -> None:
    """Create and remove a uniquely named file in ``folder``; OSError when that is not possible."""
    import tempfile

    descriptor, probe = tempfile.mkstemp(dir=folder, prefix=".dualguide-probe-")
    os.close(descriptor)
    os.remove(probe)


def check_output_folder(out: str) -> None:
    """UsageError naming --out unless PNGs can be written in ``out`` (made later if missing). No model needed."""
    if not out:
        raise UsageError("--out: empty path; give a folder")
    path = os.path.abspath(os.path.expanduser(out))
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"--out {out}: is a file, not a folder")
    existing = path
    while not os.path.exists(existing):  # the nearest existing folder, where the missing ones would be made
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UsageError(f"--out {out}: {existing} is a file, so no folder can be made below it")
    try:
        _probe(existing)
    except OSError as error:
        reason = error.strerror or str(error)
        raise UsageError(f"--out {out}: cannot write in {existing} ({reason})") from None


def check_seeds(seed: int, images: int) -> None:
    """The images get seeds ``seed .. seed+images-1``; all must fit a generator seed (0..2**64-1)."""
    if seed + images - 1 > SEED_MAX:
        raise UsageError(
            f"--seed {seed}: the {images} images take seeds {seed}..{seed + images - 1}, "
            f"past 2**64-1; use a seed <= {SEED_MAX - images + 1}"
        )


def _load(args) -> object:
    import torch
    from diffusers.utils import logging as diffusers_logging

    from .loading import default_dtype, load_pipeline

    from transformers.utils import logging as transformers_logging

    for library_logging in (diffusers_logging, transformers_logging):
        library_logging.disable_progress_bar()
        library_logging.set_verbosity_error()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available here; use --device cpu")
    dtype = default_dtype(device) if args.dtype == "auto" else getattr(torch, args.dtype)
    local = os.path.exists(args.model_path)
    try:
        pipe = load_pipeline(args.model_path, device=device, dtype=dtype)
    except OSError as error:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or "offline" in str(error).lower() or "cache" in str(error).lower()
        if offline and not local:
            raise UsageError(
                f"--model {args.model_path}: not in the local Hugging Face cache and this machine is offline; "
                f"on a machine with a network run `huggingface-cli download {args.model_path}` (or copy the folder here)"
            ) from None
        raise UsageError(f"--model {args.model_path}: {_describe(error)}") from None
    except (ValueError, TypeError, KeyError) as error:  # a folder or file that is not a loadable SDXL model
        raise UsageError(f"--model {args.model_path}: cannot load it: {_describe(error)}") from None
    if getattr(args, "compile", False):  # callers without the option (the ui) load it plain
        from .compiled import compile_unet

        pipe.unet = compile_unet(pipe.unet)
    return pipe


def call_arguments(args, settings: Dict[str, object]) -> Dict[str, object]:
    """Pipeline arguments: the model's recommended settings, overridden by the options given."""
    kwargs = dict(settings)
    for option, argument in OPTION_ARGUMENTS.items():
        value = getattr(args, option)
        if value is not None:
            kwargs[argument] = value
    if args.size:
        kwargs.update(width=args.size[0], height=args.size[1])
    kwargs["do_nag"] = float(kwargs.get("nag_scale", 1.0)) > 1.0
    for term in ("cfg", "tpg", "pag", "nag"):
        interval = getattr(args, f"{term}_interval")
        if interval is not None:
            kwargs[f"{term}_interval"] = interval
    return kwargs


def _check_names(kwargs) -> None:
    import samplers

    if kwargs["sampler"] not in samplers.names():
        raise UsageError(f"--sampler: unknown sampler {kwargs['sampler']!r}; valid: {', '.join(samplers.names())}")
    if kwargs["sigma_schedule"] not in samplers.SCHEDULE_NAMES:
        raise UsageError(f"--schedule: unknown schedule {kwargs['sigma_schedule']!r}; valid: {', '.join(samplers.SCHEDULE_NAMES)}")


def _generators(seeds: Sequence[int]) -> List[object]:
    import torch

    return [torch.Generator().manual_seed(seed) for seed in seeds]


def _run(pipe, prompt: str, seeds: Sequence[int], kwargs: Dict[str, object], task: "Task") -> List[object]:
    """The images of ``prompt``, one per seed (image ``k`` from its own generator seeded ``seeds[k]``)."""
    from .tasks import task_arguments

    # Progress bars only on a terminal: piped or logged stderr then holds nothing but a failure's one line.
    pipe.set_progress_bar_config(disable=not sys.stderr.isatty(), desc=prompt[:40])
    arguments = task_arguments(task, kwargs, pipe)
    try:
        return pipe(prompt, generator=_generators(seeds), num_images_per_prompt=len(seeds), **arguments).images
    except (ValueError, TypeError) as error:
        raise UsageError(_one_line(str(error))) from None


def save_png(image, path: str, metadata: Dict[str, object]) -> None:
    """Write ``image`` atomically with the settings in a ``parameters`` text chunk.

    The PNG goes to a uniquely named temporary file in the same folder, then is renamed over ``path``,
    so readers and concurrent runs never see a half-written file; on any failure the temporary file
    is removed and ``path`` is left as it was.
    """
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", json.dumps(metadata, default=str))
    folder, name = os.path.split(os.path.abspath(path))
    while True:  # O_EXCL: the name is ours alone; mode 0o666 so the umask applies as for any new file
        temporary = os.path.join(folder, f".{name}.{os.getpid()}.{secrets.token_hex(4)}.partial")
        try:
            os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            break
        except FileExistsError:
            continue
    try:
        image.save(temporary, format="PNG", pnginfo=info)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def _prepare(args, images: int = 1) -> Tuple[str, Dict[str, object], object, "Task"]:
    """Check the command line and the files it names, then load: ``(model, pipeline arguments, pipeline, task)``.

    The pipeline is the task's (img2img, inpainting, ControlNet) when ``--image`` / ``--control`` name one.
    """
    from .tasks import TaskError, read_task, task_pipeline

    check_seeds(args.seed, images)
    check_output_folder(args.out)
    try:
        task = read_task(args.image, args.mask, args.strength, args.control, args.controlnet, args.control_scale)
    except TaskError as error:
        raise UsageError(str(error)) from None
    model, settings = _model_and_recommended(args)
    kwargs = call_arguments(args, settings)
    _check_names(kwargs)
    pipe = _load(args)
    try:
        return model, kwargs, task_pipeline(pipe, task), task
    except TaskError as error:
        raise UsageError(str(error)) from None


def _model_and_recommended(args) -> Tuple[str, Dict[str, object]]:
    """``(model, its recommended settings)``: ``--model`` resolved (``args.model_path`` set), its recommended.json read."""
    model, folder = resolve_model(args.model)
    args.model_path = model
    try:
        return model, recommended_settings(folder)
    except ValueError as error:  # json.JSONDecodeError
        raise UsageError(f"--model {model}: recommended.json is not valid JSON: {_one_line(str(error))}") from None


def image_seed(seed: int, prompt_index: int, image_index: int, images_per_prompt: int) -> int:
    """Image ``k = prompt_index * n + image_index`` of a ``generate`` command gets seed ``seed + k``."""
    return seed + prompt_index * images_per_prompt + image_index


def image_name(prompt_index: int, image_index: int, seed: int, prompt: str) -> str:
    return f"{prompt_index:03d}_{image_index:02d}_s{seed}_{_slug(prompt)}.png"


def command_generate(args) -> int:
    from .tasks import task_metadata

    model, kwargs, pipe, task = _prepare(args, images=len(args.prompt) * args.n)
    os.makedirs(args.out, exist_ok=True)
    written, replaced = [], 0
    for index, prompt in enumerate(args.prompt):
        seeds = [image_seed(args.seed, index, number, args.n) for number in range(args.n)]
        images = _run(pipe, prompt, seeds, kwargs, task)
        for number, (image, seed) in enumerate(zip(images, seeds)):
            path = os.path.join(args.out, image_name(index, number, seed, prompt))
            replaced += os.path.exists(path)
            save_png(image, path, {"prompt": prompt, "seed": seed, "model": model, **kwargs, **task_metadata(task)})
            written.append(path)
    note = f" ({replaced} replaced a file of the same name: same prompt and seed)" if replaced else ""
    print(f"wrote {len(written)} image(s) to {os.path.abspath(args.out)}{note}")
    return 0


def compare_modes(kwargs: Dict[str, object], with_pag: bool) -> List[Tuple[str, Dict[str, object]]]:
    """The panels of ``compare``: (label, pipeline arguments), all from the same settings and seed."""
    cfg, tpg = kwargs["guidance_scale"], kwargs["tpg_scale"]
    nag = kwargs["nag_scale"] if kwargs["do_nag"] else PANEL_SCALE
    pag = kwargs.get("pag_scale") or PANEL_SCALE
    off = dict(kwargs, guidance_scale=1.0, tpg_scale=0.0, pag_scale=0.0, do_nag=False)
    modes = [
        ("no guidance", off),
        (f"CFG {cfg:g}", dict(off, guidance_scale=cfg)),
        (f"CFG+TPG {tpg:g}", dict(off, guidance_scale=cfg, tpg_scale=tpg)),
        (f"CFG+NAG {nag:g}", dict(off, guidance_scale=cfg, do_nag=True, nag_scale=nag)),
        ("CFG+TPG+NAG", dict(off, guidance_scale=cfg, tpg_scale=tpg, do_nag=True, nag_scale=nag)),
    ]
    if with_pag:
        modes.append((f"CFG+PAG {pag:g}", dict(off, guidance_scale=cfg, pag_scale=pag)))
    return modes


def command_compare(args) -> int:
    """One grid: a row per prompt, a column per guidance mode, all from the same seed."""
    from .tasks import task_metadata

    model, kwargs, pipe, task = _prepare(args)
    modes = compare_modes(kwargs, args.with_pag)
    rows = [[_run(pipe, prompt, [args.seed], arguments, task)[0] for _, arguments in modes] for prompt in args.prompt]
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"compare_s{args.seed}_{_grid_name(args.prompt)}.png")
    replaced = os.path.exists(path)
    prompt = args.prompt[0] if len(args.prompt) == 1 else args.prompt
    metadata = {"prompt": prompt, "seed": args.seed, "model": model, **task_metadata(task), "panels": dict(modes)}
    save_png(labelled_grid([label for label, _ in modes], rows), path, metadata)
    print(f"{'replaced' if replaced else 'wrote'} the comparison grid {os.path.abspath(path)}")
    return 0


def labelled_grid(labels: Sequence[str], rows: Sequence[Sequence["Image.Image"]], scale: int = 0) -> "Image.Image":
    """Rows of images, one column per label, the labels under the last row (images upscaled to at least 128 px)."""
    from PIL import Image, ImageDraw

    width, height = rows[0][0].size
    factor = scale or max(1, 128 // min(width, height))
    cell_w, cell_h, label_h = width * factor, height * factor, 16
    grid = Image.new("RGB", (cell_w * len(labels), cell_h * len(rows) + label_h), "white")
    draw = ImageDraw.Draw(grid)
    for row, images in enumerate(rows):
        for column, image in enumerate(images):
            grid.paste(image.resize((cell_w, cell_h), Image.NEAREST), (column * cell_w, row * cell_h))
    for column, label in enumerate(labels):
        draw.text((column * cell_w + 3, cell_h * len(rows) + 2), label, fill="black")
    return grid


# --- batch: every prompt of a file, resumable, one process per device (the work is in dualguide.jobs) ----------


def _add_batch_parser(commands) -> None:
    batch = commands.add_parser(
        "batch", help="write PNGs for every prompt of a .txt/.jsonl file; resumable; one process per device under accelerate/torchrun"
    )
    batch.add_argument("prompts", metavar="PROMPTS", help=".txt (one prompt per line) or .jsonl (one JSON object per line)")
    batch.add_argument("--n", type=_whole(1), default=1, help='images per prompt, unless its line gives "n" (>= 1)')
    batch.add_argument("--batch-size", type=_whole(1), default=1, help="images with the same settings per pipeline call (>= 1)")
    batch.add_argument("--overwrite", action="store_true", help="remake images made before in --out with other settings")
    _add_model_arguments(batch)
    _add_guidance_arguments(batch)
    for action in batch._actions:  # --out has no default here: a job's folder holds its manifest
        if action.dest == "out":
            action.required, action.default, action.help = True, None, "output folder: PNGs, manifest.jsonl, failures.jsonl"


LINE_SETTINGS = ("steps", "size", "sampler", "schedule")  # with every guidance option: what a .jsonl line may set


class _LineOptionParser(argparse.ArgumentParser):
    """Parses one setting of a .jsonl line with the command's own option types; errors raise ValueError."""

    def error(self, message: str):  # type: ignore[override]
        raise ValueError(message)


def _line_option_parser() -> Tuple[argparse.ArgumentParser, List[str]]:
    """The parser of a line's settings and their names (option dests such as ``tpg_layers``)."""
    guidance = _LineOptionParser(add_help=False)
    _add_guidance_arguments(guidance)
    parser = _LineOptionParser(add_help=False)
    _add_model_arguments(parser)
    _add_guidance_arguments(parser)
    names = list(LINE_SETTINGS) + [action.dest for action in guidance._actions if action.dest != "negative"]
    return parser, names


def _line_arguments(args, line, parser) -> argparse.Namespace:
    """The command's options with those the line sets, checked as on the command line."""
    from .jobs.prompts import option_text

    merged = argparse.Namespace(**vars(args))
    for name, value in line.options.items():
        flag = name.replace("_", "-")
        try:
            parsed = parser.parse_args([f"--{flag}={option_text(name, value)}"])
        except ValueError as error:
            reason = re.sub(r"^argument [^:]*: ", "", str(error))
            raise UsageError(f"{args.prompts}:{line.line}: {flag}: {reason}") from None
        setattr(merged, name, getattr(parsed, name))
    return merged


def _model_identity(args, model: str) -> str:
    """The model as the manifest records it: ``embedded``, a real path, or a hub id."""
    if args.model is None:
        return "embedded"
    return os.path.realpath(model) if os.path.exists(model) else model


def plan_batch(args) -> Tuple[List[object], str]:
    """Check the command and its prompt file and plan every image: ``(jobs, model to load)``. Loads no model."""
    from .jobs import plan_images
    from .jobs.prompts import PromptFileError, read_prompt_file

    check_output_folder(args.out)
    parser, names = _line_option_parser()
    try:
        lines = read_prompt_file(args.prompts, names)
    except PromptFileError as error:
        raise UsageError(str(error)) from None
    model, recommended = _model_and_recommended(args)
    base = call_arguments(args, recommended)
    _check_names(base)
    negative = base.pop("negative_prompt", None)

    def settings_for(line) -> Dict[str, object]:
        if not line.options:
            return base
        kwargs = call_arguments(_line_arguments(args, line, parser), recommended)
        kwargs.pop("negative_prompt", None)
        try:
            _check_names(kwargs)
        except UsageError as error:
            raise UsageError(f"{args.prompts}:{line.line}: {str(error).lstrip('-')}") from None
        return kwargs

    jobs = plan_images(lines, args.seed, args.n, settings_for, negative, _model_identity(args, model))
    for job in jobs:
        if job.seed > SEED_MAX:
            given = next(line.seed is not None for line in lines if line.line == job.line)
            source = 'its line\'s "seed"' if given else f"--seed {args.seed}"
            raise UsageError(f"{args.prompts}:{job.line}: image {job.index} of this line would get seed {job.seed} from {source}, past 2**64-1")
    return jobs, model


def command_batch(args) -> int:
    """Every image of the prompt file that ``--out`` lacks; this process's share when several run."""
    import torch

    from .jobs import Manifest
    from .jobs.manifest import differences
    from .jobs.processes import device_of, finish, process_state, shard
    from .jobs.progress import JobProgress
    from .jobs.run import make_images, remove_stale_partials

    jobs, _ = plan_batch(args)
    os.makedirs(args.out, exist_ok=True)
    manifest = Manifest(args.out)
    conflicts = manifest.conflicts(jobs)
    if conflicts and not args.overwrite:
        job, entry = conflicts[0]
        raise UsageError(
            f"--out {args.out}: {len(conflicts)} image(s) of this job were made there before from other settings "
            f"(first: {job.id}, {entry.get('file')}: {', '.join(differences(entry, job))} differ); "
            "rerun with --overwrite to remake them, or use another --out"
        )
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available here; use --device cpu")
    state = process_state(args.device)
    mine = shard(state, jobs)
    todo = [job for job in mine if not manifest.is_done(job)]
    already = sum(manifest.is_done(job) for job in jobs)
    remove_stale_partials(args.out, mine, manifest)
    show = state.is_main_process and sys.stderr.isatty()
    progress = JobProgress(manifest.path, manifest.failures_path, len(jobs), already, show=show)
    if state.num_processes > 1:
        state.wait_for_everyone()  # every process has read the manifest before any writes to it
    failed: List[object] = []
    pipe = _load(argparse.Namespace(**{**vars(args), "device": device_of(state)})) if todo else None
    with progress:  # from here, so that images/s and the ETA do not count the loading
        if pipe is not None:
            pipe.set_progress_bar_config(disable=True)
            failed = make_images(pipe, todo, args.batch_size, manifest, save_png, _describe)
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


# --- eval: guidance modes on the same prompts and seeds, measured and compared (the work is in dualguide.evaluation) ---


def _add_eval_parser(commands) -> None:
    evaluate = commands.add_parser("eval", help="compare guidance modes on the same prompts and seeds: metrics, paired statistics, report")
    evaluate.add_argument("prompts", metavar="PROMPTS", nargs="?", default=None, help=".txt/.jsonl prompt file (or --embedded-prompts)")
    evaluate.add_argument("--embedded-prompts", type=_whole(2), default=None, metavar="N", help="N prompts of the embedded model's grammar")
    evaluate.add_argument("--modes", default=None, help='"NAME: KEY=VALUE,...; ..." keyed by generate flag names; a scale a mode does not set is '
                          "off (default: none, cfg, tpg, cfg+tpg, cfg+nag, cfg+tpg+nag, cfg+pag)")  # fmt: skip
    evaluate.add_argument("--baseline", default="cfg", help="the mode every other is compared with (default cfg)")
    evaluate.add_argument("--seeds", type=_whole(1), default=2, help="images per prompt, the same seeds in every mode (>= 1, default 2)")
    evaluate.add_argument("--unconditional", type=_whole(0), default=0, metavar="N", help="empty-prompt images per mode, for the unconditional KID")
    evaluate.add_argument("--clip", default=None, metavar="PATH", help="local CLIP model folder: CLIP score (and the features, with --model)")
    evaluate.add_argument("--reference", default=None, metavar="DIR", help="reference images for the KID (embedded model: ground-truth renders)")
    evaluate.add_argument("--batch-size", type=_whole(1), default=1, help="images with the same settings per pipeline call (>= 1)")
    evaluate.add_argument("--overwrite", action="store_true", help="remake images made before in --out with other settings")
    _add_model_arguments(evaluate)
    _add_guidance_arguments(evaluate)
    for action in evaluate._actions:
        if action.dest == "out":
            action.required, action.default, action.help = True, None, "output folder: plan.jsonl, images/, results.*, metrics.png, examples.png"


def command_eval(args) -> int:
    from .evaluation.command import evaluate  # numpy, torch and the metrics load only here

    return evaluate(args)


# --- ui: the guidance explorer in the browser (optional extra; the work is in dualguide.ui) ----------------------


def _add_ui_parser(commands) -> None:
    ui = commands.add_parser("ui", help="a guidance explorer in the browser (needs: pip install 'dualguide-sdxl[ui]')")
    ui.add_argument("--model", default=None, help="hub id, diffusers folder or .safetensors file (default: the embedded model)")
    ui.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ui.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"), default="auto")
    ui.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1: this machine only)")
    ui.add_argument("--port", type=_whole(1, 65535), default=7860, help="port (default 7860)")


def command_ui(args) -> int:
    from .ui import serve  # gradio and torch load only here

    return serve(args.model, host=args.host, port=args.port, device=args.device, dtype=args.dtype)


def command_samplers(args) -> int:
    from samplers.registry import SAMPLER_NAMES, SAMPLER_NOTES
    from samplers.schedules import SCHEDULE_NAMES

    print("samplers: " + ", ".join(SAMPLER_NAMES))
    print("schedules: " + ", ".join(SCHEDULE_NAMES))
    for name, note in SAMPLER_NOTES.items():
        print(f"{name}: {note}")
    return 0


def _grid_name(prompts: Sequence[str]) -> str:
    """The first prompt's slug; with several prompts, their count and a digest of all of them."""
    if len(prompts) == 1:
        return _slug(prompts[0])
    digest = hashlib.sha1("\n".join(prompts).encode("utf-8")).hexdigest()[:8]
    return f"{_slug(prompts[0])}_and_{len(prompts) - 1}_more_{digest}"


def _slug(text: str) -> str:
    cleaned = "".join(c if c.isalnum() else "_" for c in text.lower()).strip("_")
    return "_".join(filter(None, cleaned.split("_")))[:60] or "image"


def _describe(error: BaseException) -> str:
    """One line for an unexpected error: ``strerror: file`` for OSError, else ``Type: first line``."""
    if isinstance(error, OSError) and error.strerror:
        return f"{error.strerror}: {error.filename}" if error.filename else error.strerror
    text = _one_line(str(error))
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command; every failure is one line on stderr and status 2 (usage) or 1 (runtime), 130 if interrupted.

    Set ``DUALGUIDE_DEBUG=1`` to see the traceback of a runtime error and the libraries' warnings.
    """
    debug = os.environ.get(DEBUG_VARIABLE, "") not in ("", "0")
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:  # --help (0) or a usage error, already printed as one line (2)
        return stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 2)
    handlers = {"generate": command_generate, "compare": command_compare, "batch": command_batch, "eval": command_eval, "ui": command_ui, "samplers": command_samplers}
    with warnings.catch_warnings():
        if not debug:
            warnings.simplefilter("ignore")  # libraries' deprecation notes would break the one-line rule
        try:
            return handlers[args.command](args)
        except UsageError as error:
            print(f"dualguide: error: {_one_line(str(error))}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("dualguide: interrupted", file=sys.stderr)
            return 130
        except Exception as error:
            if debug:
                raise
            print(f"dualguide: error: {_describe(error)}", file=sys.stderr)
            return 1


if __name__ == "__main__":
    sys.exit(main())
