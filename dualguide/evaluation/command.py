"""``dualguide eval``: make every prompt x seed under each guidance mode with the batch job, measure the images,
compare each mode with the baseline per prompt, and write the report.

``DIR/plan.jsonl`` is the batch job's prompt file: a line per mode and prompt with the mode's settings and the
prompt's seeds, so every mode gets the same prompts and seeds, ordered in chunks of about ``--batch-size`` images
that go through every mode in turn. ``DIR/images/`` holds its PNGs and manifest (resumable; one process per device
under ``accelerate launch`` / ``torchrun``, each with a share of every mode). The main process then writes
``DIR/results.md`` / ``.csv`` / ``.json``, ``metrics.png`` and ``examples.png`` (``report``). Everything the
command line names is checked before any model is loaded.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..generation.errors import UsageError
from ..generation.images import check_output_folder
from ..generation.models import DEFAULTS
from ..generation.settings import call_arguments, check_names, check_seeds
from ..jobs.batch import run_batch
from ..jobs.processes import process_state
from ..options import line_option_parser, parse_setting, with_settings
from .clip import load_clip
from .reference import load_reference_images
from .report import MetricResult, Results, markdown, write_atomic, write_report
from .statistics import paired_comparison

DEFAULT_MODES = ("none: cfg=1,tpg=0; cfg: cfg=4; tpg: cfg=1,tpg=4; cfg+tpg: cfg=4,tpg=4; cfg+nag: cfg=4,nag=3; "
                 "cfg+tpg+nag: cfg=4,tpg=4,nag=3; cfg+pag: cfg=4,pag=3")  # fmt: skip
SCALES_OFF = {"cfg": "1", "tpg": "0", "pag": "0", "nag": "1"}  # a scale that neither a mode nor the command sets
EXAMPLE_MODES = "cfg: cfg=4; cfg+tpg: cfg=4,tpg=3"
PLAN = "plan.jsonl"
IMAGES = "images"
EXAMPLE_ROWS = 6
REFERENCE_SEED = 0  # the ground-truth renders of the embedded model's KID
EMPTY_LABEL = "(empty prompt)"
Modes = Dict[str, Dict[str, str]]  # mode -> setting name (flag dest, e.g. tpg_layers) -> value as written


@dataclass(frozen=True)
class Prompt:
    """A prompt of the evaluation and its negative prompt (``None``: the command's ``--negative``)."""

    text: str
    negative: Optional[str] = None


@dataclass(frozen=True)
class Measured:
    """One metric of one mode: a value per unit (prompt, or sample for the unconditional KID; NaN: not measured)."""

    values: np.ndarray
    higher_is_better: bool
    error: Optional[float] = None


# --- the command line ---------------------------------------------------------------------------------------


def parse_modes(text: str, baseline: str) -> Modes:
    """``"name: key=value,key=value; name: ..."`` -> ``{name: {setting: value}}``, each value checked as its flag.

    Keys are generate flag names (``cfg``, ``tpg``, ``tpg-layers``, ``nag``, ``steps``...: what a ``.jsonl`` line
    of ``dualguide batch`` may set). A value may hold commas (``tpg-layers=u0-u3,m0``). UsageError naming ``--modes``.
    """
    parser, names = line_option_parser()
    valid = ", ".join(name.replace("_", "-") for name in names)
    modes: Modes = {}
    for part in filter(str.strip, text.split(";")):
        name, colon, settings = part.partition(":")
        name = name.strip()
        if not colon or not name:
            raise UsageError(f"--modes: {part.strip()!r} is not NAME: KEY=VALUE,...; e.g. '{EXAMPLE_MODES}'")
        if name in modes:
            raise UsageError(f"--modes: mode {name!r} is given twice")
        pairs: List[List[str]] = []
        for piece in filter(str.strip, settings.split(",")):
            if "=" in piece:
                pairs.append([part.strip() for part in piece.split("=", 1)])
            elif pairs:
                pairs[-1][1] += "," + piece.strip()  # a list value such as tpg-layers=u0-u3,m0
            else:
                raise UsageError(f"--modes: mode {name!r}: {piece.strip()!r} is not KEY=VALUE")
        modes[name] = {}
        for key, value in pairs:
            setting = key.replace("-", "_")
            if setting not in names:
                raise UsageError(f"--modes: mode {name!r}: unknown key {key!r}; valid: {valid}")
            try:
                parse_setting(parser, setting, value)
            except ValueError as error:
                raise UsageError(f"--modes: mode {name!r}: {key}: {error}") from None
            modes[name][setting] = value
    if not modes:
        raise UsageError(f"--modes: no modes; e.g. '{EXAMPLE_MODES}'")
    if baseline not in modes:
        raise UsageError(f"--baseline {baseline}: not one of the modes ({', '.join(modes)}); add it to --modes")
    return modes


def mode_settings(args: argparse.Namespace, modes: Modes) -> Modes:
    """Each mode's line settings: its own, over the command line's, over ``SCALES_OFF`` for the guidance scales.

    Checks each mode's sampler and schedule names as the batch job will (UsageError naming the mode).
    """
    parser, _ = line_option_parser()
    result: Modes = {}
    for name, settings in modes.items():
        result[name] = {**{key: off for key, off in SCALES_OFF.items() if getattr(args, key) is None}, **settings}
        merged = with_settings(vars(args), settings, parser)
        try:
            check_names(call_arguments(vars(merged), DEFAULTS))
        except UsageError as error:
            raise UsageError(f"--modes: mode {name!r}: {str(error).lstrip('-')}") from None
    return result


def read_prompts(args: argparse.Namespace, embedded: bool) -> List[Prompt]:
    """The prompts of PROMPTS (text and negative; a line's own seeds, counts and settings are refused) or
    ``--embedded-prompts N`` distinct prompts of the embedded model's grammar (a fixed sample)."""
    from ..jobs.prompts import PromptFileError, read_prompt_file
    from ..toy.data import COLORS, POSITIONS, SHAPES, SIZES, evaluation_prompts, parse_prompt

    if (args.prompts is None) == (args.embedded_prompts is None):
        raise UsageError("give either PROMPTS (a .txt/.jsonl file) or --embedded-prompts N, not both or neither")
    if args.embedded_prompts is not None:
        if not embedded:
            raise UsageError("--embedded-prompts: the grammar is the embedded model's; with --model give PROMPTS")
        distinct = len(SHAPES) * len(COLORS) * (len(COLORS) - 1) * len(SIZES) * (len(POSITIONS) + 1)
        if args.embedded_prompts > distinct:
            raise UsageError(f"--embedded-prompts {args.embedded_prompts}: the grammar has {distinct} distinct prompts")
        return [Prompt(text) for text in evaluation_prompts(args.embedded_prompts)]
    try:
        lines = read_prompt_file(args.prompts)
    except PromptFileError as error:
        raise UsageError(str(error)) from None
    for line in lines:
        where = f"{args.prompts}:{line.line}"
        if line.seed is not None or line.n is not None:
            raise UsageError(f'{where}: eval gives all prompts the same seeds (--seed, --seeds); remove "seed", "n"')
        if embedded:
            try:
                parse_prompt(line.prompt)
            except ValueError as error:
                raise UsageError(f"{where}: the embedded model's judge needs its grammar: {error}") from None
    if len(lines) < 2:
        raise UsageError(f"{args.prompts}: at least 2 prompts are needed for paired statistics, got {len(lines)}")
    return [Prompt(line.prompt, line.negative) for line in lines]


@dataclass(frozen=True)
class Unit:
    """``n`` images of one prompt, seeds ``seed`` on, made alike in every mode (prompt "": unconditional)."""

    prompt: str
    negative: Optional[str]
    seed: int
    n: int


Plan = List[Tuple[str, int]]  # (mode, unit) of each line of the batch job, in file order


def plan_units(prompts: Sequence[Prompt], seeds: int, unconditional: int, first_seed: int, per_call: int) -> List[Unit]:
    """Each prompt with ``seeds`` images, then the ``unconditional`` empty-prompt images ``per_call`` a unit."""
    units = [Unit(p.text, p.negative, first_seed + number * seeds, seeds) for number, p in enumerate(prompts)]
    start = first_seed + len(prompts) * seeds
    blocks = range(0, unconditional, per_call)
    return units + [Unit("", None, start + j, min(per_call, unconditional - j)) for j in blocks]


def plan_order(modes: Sequence[str], units: Sequence[Unit], per_call: int) -> Plan:
    """The units in chunks of at most ``per_call`` images (one unit at least), each chunk in every mode in turn: a
    pipeline call holds one mode's chunk, and each process's contiguous share of the job holds every mode alike."""
    order: Plan = []
    chunk: List[int] = []
    images = 0
    for number, unit in enumerate(units):
        if chunk and images + unit.n > per_call:
            order += [(mode, member) for mode in modes for member in chunk]
            chunk, images = [], 0
        chunk.append(number)
        images += unit.n
    return order + [(mode, member) for mode in modes for member in chunk]


def plan_lines(order: Plan, units: Sequence[Unit], settings: Modes) -> List[Dict[str, object]]:
    """The batch job's prompt-file lines: each unit's prompt, seed and count, with its mode's settings."""
    lines = []
    for mode, number in order:
        unit = units[number]
        negative = {} if unit.negative is None else {"negative": unit.negative}
        lines.append({"prompt": unit.prompt, **negative, "seed": unit.seed, "n": unit.n, **settings[mode]})
    return lines


# --- measuring ----------------------------------------------------------------------------------------------


def load_images(folder: str, order: Plan, units: Sequence[Unit], conditional: int) -> Dict[str, Tuple[list, list]]:
    """``{mode: (the first ``conditional`` images in unit order, the rest)}`` from the batch job's manifest."""
    from PIL import Image

    from ..jobs import Manifest

    files = {(entry["line"], entry["index"]): entry["file"] for entry in Manifest(folder).entries()}
    lines = {where: line for line, where in enumerate(order, start=1)}

    def image(line: int, index: int):
        with Image.open(os.path.join(folder, str(files[line, index]))) as opened:
            return opened.convert("RGB")

    result = {}
    for mode in dict.fromkeys(mode for mode, _ in order):
        images = [image(lines[mode, number], k) for number, unit in enumerate(units) for k in range(unit.n)]
        result[mode] = (images[:conditional], images[conditional:])
    return result


def embedded_references(
    prompts: Sequence[Prompt], seeds: int, unconditional: int, size: Tuple[int, int]
) -> Tuple[list, list]:
    """Ground-truth renders: ``seeds`` of each prompt; ``unconditional`` scenes drawn as the training data's."""
    from ..toy.data import parse_prompt, random_labels, render

    rng = np.random.default_rng(REFERENCE_SEED)
    side = min(size)
    conditional = [render(parse_prompt(p.text), side, rng) for p in prompts for _ in range(seeds)]
    return conditional, [render(random_labels(rng), side, rng) for _ in range(unconditional)]


def per_prompt(values: np.ndarray, prompts: int) -> np.ndarray:
    """Mean over each prompt's seeds: ``[prompts * seeds]`` -> ``[prompts]`` (NaN stays NaN)."""
    return np.asarray(values, dtype=np.float64).reshape(prompts, -1).mean(axis=1)


def kernel_distance(features: np.ndarray, reference: np.ndarray, units: int) -> Measured:
    """KID against ``reference``: each unit's mean share (``kid_contributions``), torchmetrics' standard error."""
    from .metrics import kid, kid_contributions

    error = kid(reference, features).standard_error
    return Measured(per_prompt(kid_contributions(features, reference), units), False, error)


def measure_mode(
    conditional: list, unconditional: list, prompts: Sequence[Prompt], seeds: int, features, references, judge, clip
) -> Dict[str, Measured]:
    """Every metric of one mode's images; ``references``: (conditional, unconditional) features or ``None``."""
    from .metrics import diversity

    count = len(prompts)
    measured: Dict[str, Measured] = {}
    if judge is not None:
        from .adherence import attribute_hits

        hits = attribute_hits(conditional, [p.text for p in prompts for _ in range(seeds)], judge)
        for attribute, values in hits.items():
            measured["adherence" if attribute == "overall" else attribute] = Measured(per_prompt(values, count), True)
    if clip is not None:
        from .clip import clip_scores

        scores = clip_scores(conditional, [p.text for p in prompts for _ in range(seeds)], clip)
        measured["clip_score"] = Measured(per_prompt(scores, count), True)
    generated = features(conditional)
    if references[0] is not None:
        measured["kid"] = kernel_distance(generated, references[0], count)
    if unconditional and references[1] is not None:
        measured["kid_uncond"] = kernel_distance(features(unconditional), references[1], len(unconditional))
    if seeds >= 2:
        measured["diversity"] = Measured(diversity(generated.reshape(count, seeds, -1)), True)
    return measured


def compare(measured: Dict[str, Dict[str, Measured]], baseline: str) -> Results:
    """Per mode and metric the mean, and for each mode but the baseline the paired comparison with it, on the
    units both measured. A metric measured on fewer than 2 units is left out."""
    results: Dict[str, Dict[str, MetricResult]] = {mode: {} for mode in measured}
    for metric, base in measured[baseline].items():
        for mode, by_metric in measured.items():
            values = by_metric[metric].values
            both = np.isfinite(values) & np.isfinite(base.values)
            if both.sum() < 2:
                break
            comparison = None
            if mode != baseline:
                comparison = paired_comparison(values[both], base.values[both], base.higher_is_better)
            error = by_metric[metric].error
            results[mode][metric] = MetricResult(float(values[both].mean()), int(both.sum()), error, comparison)
    return results


# --- the command ----------------------------------------------------------------------------------------------


def evaluate(args: argparse.Namespace) -> int:
    """Check everything, make the missing images with the batch job, then (main process) measure and report."""
    check_output_folder(args.out)
    modes = mode_settings(args, parse_modes(args.modes or DEFAULT_MODES, args.baseline))
    embedded = args.model is None
    prompts = read_prompts(args, embedded)
    if not embedded and args.clip is None:
        raise UsageError(f"--model {args.model}: give --clip PATH (a local CLIP model folder) to measure its images; "
                         "the judge knows only the embedded model's pictures")  # fmt: skip
    if args.unconditional and not embedded and args.reference is None:
        raise UsageError("--unconditional: the unconditional KID needs reference images (--reference DIR) with --model")
    check_seeds(args.seed, len(prompts) * args.seeds + args.unconditional)
    try:
        clip = load_clip(args.clip) if args.clip is not None else None
        reference = load_reference_images(args.reference) if args.reference is not None else None
    except ValueError as error:
        raise UsageError(str(error)) from None
    per_call = max(args.batch_size, args.seeds)
    units = plan_units(prompts, args.seeds, args.unconditional, args.seed, per_call)
    order = plan_order(list(modes), units, per_call)
    os.makedirs(args.out, exist_ok=True)
    plan = os.path.join(args.out, PLAN)
    lines = plan_lines(order, units, modes)
    write_atomic(plan, "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines).encode("utf-8"))
    folder = os.path.join(args.out, IMAGES)
    status = run_batch(argparse.Namespace(**{**vars(args), "prompts": plan, "out": folder, "n": 1}))
    if status or not process_state(args.device).is_main_process:
        return status
    return report(args, prompts, load_images(folder, order, units, len(prompts) * args.seeds), clip, reference)


def report(
    args: argparse.Namespace, prompts: Sequence[Prompt], images: Dict[str, Tuple[list, list]], clip, reference
) -> int:
    """Measure each mode's ``(conditional, unconditional)`` images, compare with the baseline, write, print."""
    modes = list(images)
    size = images[args.baseline][0][0].size
    judge = None
    if args.model is None:
        from ..toy.judge import ShapeJudge
        from .features import judge_features

        judge = ShapeJudge.load()

        def features(pictures):
            return judge_features(pictures, judge)

    else:
        from .clip import clip_image_features

        def features(pictures):
            return clip_image_features(pictures, clip)

    if reference is not None:  # at the generated size, so that both sets are seen alike
        reference = [picture.resize(size) if picture.size != size else picture for picture in reference]
        references = (reference, reference)
    elif judge is not None:
        references = embedded_references(prompts, args.seeds, args.unconditional, size)
    else:
        references = ([], [])
    reference_features = tuple(features(pictures) if pictures else None for pictures in references)
    measured = {mode: measure_mode(*images[mode], prompts, args.seeds, features, reference_features, judge, clip)
                for mode in modes}  # fmt: skip
    results = compare(measured, args.baseline)
    rows = min(EXAMPLE_ROWS, len(prompts))
    examples = {mode: [images[mode][0][p * args.seeds] for p in range(rows)] + images[mode][1][:1] for mode in modes}
    labels = [p.text for p in prompts[:rows]] + ([EMPTY_LABEL] if args.unconditional else [])
    paths = write_report(args.out, results, args.baseline, examples, labels)
    print(markdown(results, args.baseline), end="")
    print(f"wrote {', '.join(sorted(path.name for path in paths.values()))} to {os.path.abspath(args.out)}")
    return 0
