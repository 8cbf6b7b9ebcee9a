"""The ``dualguide`` command: ``generate``, ``compare`` and ``samplers``.

Heavy modules (torch, diffusers) are imported only by the subcommands that need them, so
``dualguide --help`` and ``dualguide samplers`` answer at once.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

if TYPE_CHECKING:
    from PIL import Image

EMBEDDED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "embedded")


class UsageError(Exception):
    """A problem with the command line or the files it names: one line on stderr, exit status 2."""


def _interval(text: str) -> Tuple[float, float]:
    try:
        start, end = (float(part) for part in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected START:END fractions such as 0:0.5, got {text!r}") from None
    return start, end


def _size(text: str) -> Tuple[int, int]:
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size such as 64 or 64x96, got {text!r}") from None
    if len(parts) not in (1, 2):
        raise argparse.ArgumentTypeError(f"expected a size such as 64 or 64x96, got {text!r}")
    return (parts[0], parts[-1])


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="hub id, diffusers folder or .safetensors file (default: the embedded model)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"), default="auto")
    parser.add_argument("--sampler", default=None, help="k-diffusion sampler name (see `dualguide samplers`)")
    parser.add_argument("--schedule", default=None, help="sigma schedule: model, karras, exponential")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--size", type=_size, default=None, help="pixels, e.g. 64 or 1024x768")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--negative", default=None, help="negative prompt (CFG)")
    parser.add_argument("--out", default="outputs", help="output folder")


def _add_guidance_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cfg", type=float, default=None, help="CFG scale (<= 1: off)")
    parser.add_argument("--tpg", type=float, default=None, help="TPG scale (0: off)")
    parser.add_argument("--tpg-layers", default=None, help="TPG layer ids, e.g. d6-d23 or u0-u3,m0")
    parser.add_argument("--pag", type=float, default=None, help="PAG scale (0: off)")
    parser.add_argument("--nag", type=float, default=None, help="NAG scale (<= 1: off)")
    parser.add_argument("--nag-negative", default=None, help="NAG negative prompt")
    parser.add_argument("--nag-tau", type=float, default=None)
    parser.add_argument("--nag-alpha", type=float, default=None)
    for term in ("cfg", "tpg", "pag", "nag"):
        parser.add_argument(f"--{term}-interval", type=_interval, default=None, metavar="START:END",
                            help=f"fractions of the schedule where {term.upper()} is on (default 0:1)")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dualguide",
        description="Training-free dual guidance (TPG + NAG, with CFG and PAG) for SDXL in one UNet call per step.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    generate = commands.add_parser("generate", help="write PNGs for one or more prompts")
    generate.add_argument("prompt", nargs="+")
    generate.add_argument("--n", type=int, default=1, help="images per prompt")
    _add_model_arguments(generate)
    _add_guidance_arguments(generate)
    compare = commands.add_parser("compare", help="one labelled grid of the same seed under each guidance mode")
    compare.add_argument("prompt", nargs="+", help="one grid row per prompt, all with the same seed")
    compare.add_argument("--with-pag", action="store_true", help="add a CFG+PAG panel")
    _add_model_arguments(compare)
    _add_guidance_arguments(compare)
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


def resolve_model(model: Optional[str]) -> Tuple[str, Optional[str]]:
    """``(what to load, folder holding recommended.json or None)``; UsageError for a missing path."""
    if model is None:
        if not os.path.isfile(os.path.join(EMBEDDED, "model_index.json")):
            raise UsageError("the embedded model is not installed in this checkout; pass --model <hub id | folder | .safetensors>")
        return EMBEDDED, EMBEDDED
    path = os.path.expanduser(model)
    if os.path.exists(path):
        return path, path if os.path.isdir(path) else None
    looks_like_path = model.startswith((".", "/", "~")) or model.endswith((".safetensors", ".ckpt")) or model.count("/") > 1
    if looks_like_path:
        raise UsageError(f"--model: no such file or folder: {model}")
    return model, None


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
    try:
        pipe = load_pipeline(args.model_path, device=device, dtype=dtype)
    except OSError as error:
        if os.environ.get("HF_HUB_OFFLINE") == "1" or "offline" in str(error).lower() or "cache" in str(error).lower():
            raise UsageError(
                f"--model {args.model_path}: not in the local Hugging Face cache and this machine is offline; "
                f"on a machine with a network run `huggingface-cli download {args.model_path}` (or copy the folder here)"
            ) from None
        raise UsageError(f"--model {args.model_path}: {error}".splitlines()[0]) from None
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


def _run(pipe, prompt: str, seed: int, kwargs: Dict[str, object], progress: bool = True) -> List[object]:
    import torch

    pipe.set_progress_bar_config(disable=not progress, desc=prompt[:40])
    try:
        return pipe(prompt, generator=torch.Generator().manual_seed(seed), **kwargs).images
    except (ValueError, TypeError) as error:
        raise UsageError(str(error).splitlines()[0]) from None


def save_png(image, path: str, metadata: Dict[str, object]) -> None:
    """Write ``image`` atomically (temp file, then rename) with the settings in a ``parameters`` text chunk."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", json.dumps(metadata, default=str))
    temporary = path + ".partial"
    try:
        image.save(temporary, format="PNG", pnginfo=info)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def _prepare(args) -> Tuple[str, Dict[str, object], object]:
    """Check the command line, then load: ``(model, pipeline arguments, pipeline)``."""
    model, folder = resolve_model(args.model)
    args.model_path = model
    kwargs = call_arguments(args, recommended_settings(folder))
    _check_names(kwargs)
    return model, kwargs, _load(args)


def command_generate(args) -> int:
    model, kwargs, pipe = _prepare(args)
    os.makedirs(args.out, exist_ok=True)
    written = []
    for index, prompt in enumerate(args.prompt):
        images = _run(pipe, prompt, args.seed + index, dict(kwargs, num_images_per_prompt=args.n))
        for number, image in enumerate(images):
            path = os.path.join(args.out, f"{index:03d}_{number:02d}_{_slug(prompt)}.png")
            save_png(image, path, {"prompt": prompt, "seed": args.seed + index, "model": model, **kwargs})
            written.append(path)
    print(f"wrote {len(written)} image(s) to {os.path.abspath(args.out)}")
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
    model, kwargs, pipe = _prepare(args)
    modes = compare_modes(kwargs, args.with_pag)
    rows = [[_run(pipe, prompt, args.seed, arguments)[0] for _, arguments in modes] for prompt in args.prompt]
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"compare_{_grid_name(args.prompt)}.png")
    prompt = args.prompt[0] if len(args.prompt) == 1 else args.prompt
    metadata = {"prompt": prompt, "seed": args.seed, "model": model, "panels": dict(modes)}
    save_png(labelled_grid([label for label, _ in modes], rows), path, metadata)
    print(f"wrote the comparison grid to {os.path.abspath(path)}")
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


def command_samplers(args) -> int:
    from samplers.registry import SAMPLER_NAMES
    from samplers.schedules import SCHEDULE_NAMES

    print("samplers: " + ", ".join(SAMPLER_NAMES))
    print("schedules: " + ", ".join(SCHEDULE_NAMES))
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


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {"generate": command_generate, "compare": command_compare, "samplers": command_samplers}
    try:
        return handlers[args.command](args)
    except UsageError as error:
        print(f"dualguide: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dualguide: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
