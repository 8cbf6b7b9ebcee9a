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
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..generation.errors import UsageError
from ..generation.images import check_output_folder
from ..generation.models import DEFAULTS, model_and_settings
from ..generation.settings import PANEL_SCALE, call_arguments, check_names, check_seeds
from ..jobs.batch import run_batch
from ..jobs.processes import process_state
from ..options import line_option_parser, parse_setting, with_settings
from .clip import load_clip
from .reference import load_reference_images
from .report import MetricResult, Results, markdown, write_atomic, write_report
from .statistics import paired_comparison

# The default modes (``default_modes``); {nag}: the model's recommended NAG scale.
DEFAULT_MODES = ("none: cfg=1,tpg=0; cfg: cfg=4; tpg: cfg=1,tpg=4; cfg+tpg: cfg=4,tpg=4; cfg+nag: cfg=4,nag={nag}; "
                 "cfg+tpg+nag: cfg=4,tpg=4,nag={nag}; cfg+pag: cfg=4,pag=3")  # fmt: skip
NEGATIVE_MODES = ("none: cfg=1,negative-for=none; cfg: cfg=4,negative-for=cfg; nag: cfg=1,nag={nag},negative-for=nag; "
                  "cfg+nag: cfg=4,nag={nag},negative-for=cfg+nag; cfg+tpg: cfg=4,tpg=4,negative-for=cfg; "
                  "cfg+tpg+nag: cfg=4,tpg=4,nag={nag},negative-for=cfg+nag")  # the default with --negative-prompts
NEGATIVE_FOR = "negative_for"  # the mode key that routes each prompt's negative (not a generate setting)
NEGATIVE_TARGETS = ("cfg", "nag", "cfg+nag", "none")
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
    of ``dualguide batch`` may set), and ``negative-for``: which guidance gets each prompt's negative, ``cfg``
    (``negative_prompt`` only), ``nag`` (NAG's negative only), ``cfg+nag`` or ``none``; without it the negative is
    the call's ``negative_prompt``, which NAG also uses unless ``nag-negative`` is set. A value may hold commas
    (``tpg-layers=u0-u3,m0``). UsageError naming ``--modes``.
    """
    parser, names = line_option_parser()
    valid = ", ".join([name.replace("_", "-") for name in names] + ["negative-for"])
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
            if setting not in names + [NEGATIVE_FOR]:
                raise UsageError(f"--modes: mode {name!r}: unknown key {key!r}; valid: {valid}")
            try:
                check_mode_setting(parser, setting, value)
            except ValueError as error:
                raise UsageError(f"--modes: mode {name!r}: {key}: {error}") from None
            modes[name][setting] = value
        if "nag" in modes[name].get(NEGATIVE_FOR, "") and "nag_negative" in modes[name]:
            raise UsageError(f"--modes: mode {name!r}: give NAG's negative by negative-for or nag-negative, not both")
    if not modes:
        raise UsageError(f"--modes: no modes; e.g. '{EXAMPLE_MODES}'")
    if baseline not in modes:
        raise UsageError(f"--baseline {baseline}: not one of the modes ({', '.join(modes)}); add it to --modes")
    return modes


def default_modes(negative: bool, settings: Mapping[str, object]) -> str:
    """``--modes``' default (``NEGATIVE_MODES`` with ``--negative-prompts``), NAG at the scale of ``settings`` (the
    model's recommended ones; the embedded model's is tuned by ``training.evaluate_nag``), else ``PANEL_SCALE``."""
    scale = float(settings.get("nag_scale", 1.0) or 1.0)
    return (NEGATIVE_MODES if negative else DEFAULT_MODES).format(nag=f"{scale if scale > 1.0 else PANEL_SCALE:g}")


def check_mode_setting(parser: argparse.ArgumentParser, setting: str, value: str) -> None:
    """ValueError with the reason when ``value`` is not valid for ``setting`` (a generate setting or NEGATIVE_FOR)."""
    if setting != NEGATIVE_FOR:
        parse_setting(parser, setting, value)
    elif value not in NEGATIVE_TARGETS:
        raise ValueError(f"expected one of {', '.join(NEGATIVE_TARGETS)}, got {value!r}")


def negative_fields(target: str, merged: argparse.Namespace) -> str:
    """The line fields, joined by "+", that carry a prompt's negative to ``target`` ("" for none) in a mode whose
    settings are ``merged``. A negative only for NAG rides as ``negative`` (one pipeline call for many prompts, NAG
    falls back to it) where CFG is off and no NAG negative is set, else as ``nag_negative``."""
    nag_fallback = merged.nag_negative is None
    if target == "none":
        return ""
    if target == "nag":
        return "negative" if nag_fallback and (merged.cfg or 1.0) <= 1.0 else "nag_negative"
    return "negative" if target == "cfg" or nag_fallback else "negative+nag_negative"


def mode_settings(args: argparse.Namespace, modes: Modes) -> Modes:
    """Each mode's line settings: its own, over the command line's, over ``SCALES_OFF`` for the guidance scales;
    a ``negative-for`` becomes the line fields of the negative (``negative_fields``), and ``negative-for=cfg``
    gives NAG the empty negative where nothing else sets one.

    Checks each mode's sampler and schedule names as the batch job will (UsageError naming the mode).
    """
    parser, _ = line_option_parser()
    result: Modes = {}
    for name, given in modes.items():
        settings = {key: value for key, value in given.items() if key != NEGATIVE_FOR}
        result[name] = {**{key: off for key, off in SCALES_OFF.items() if getattr(args, key) is None}, **settings}
        merged = with_settings(vars(args), settings, parser)
        try:
            check_names(call_arguments(vars(merged), DEFAULTS))
        except UsageError as error:
            raise UsageError(f"--modes: mode {name!r}: {str(error).lstrip('-')}") from None
        if NEGATIVE_FOR in given:
            result[name][NEGATIVE_FOR] = negative_fields(given[NEGATIVE_FOR], merged)
            if given[NEGATIVE_FOR] == "cfg" and merged.nag_negative is None:
                result[name]["nag_negative"] = ""
    return result


def measured_by_judge(args: argparse.Namespace) -> bool:
    """Whether the embedded model's judge measures the run: the embedded model, or ``--model`` with ``--toy-judge``."""
    return args.model is None or args.toy_judge


def grammar_prompts(args: argparse.Namespace, embedded: bool) -> List[Prompt]:
    """``--embedded-prompts N`` full prompts or ``--negative-prompts N`` (partial prompt, negative) pairs of the
    embedded model's grammar (fixed samples)."""
    from ..toy.data import COLORS, MAX_NEGATIVE_PROMPTS, POSITIONS, SHAPES, SIZES, evaluation_prompts, negative_prompts

    flag = "--embedded-prompts" if args.negative_prompts is None else "--negative-prompts"
    count = args.embedded_prompts if args.negative_prompts is None else args.negative_prompts
    if not embedded:
        raise UsageError(f"{flag}: the grammar is the embedded model's; with --model give PROMPTS (or --toy-judge for a "
                         "model trained by training/)")
    distinct = len(SHAPES) * len(COLORS) * (len(COLORS) - 1) * len(SIZES) * (len(POSITIONS) + 1)
    limit = distinct if args.negative_prompts is None else MAX_NEGATIVE_PROMPTS
    if count > limit:
        raise UsageError(f"{flag} {count}: the grammar has {limit} distinct prompts")
    if args.negative_prompts is None:
        return [Prompt(text) for text in evaluation_prompts(count)]
    return [Prompt(text, negative) for text, negative in negative_prompts(count)]


def check_embedded_line(where: str, prompt: str, negative: Optional[str]) -> None:
    """UsageError unless the judge can read ``prompt`` (the grammar) and ``negative`` (one value it names)."""
    from ..toy.data import negated_labels, parse_prompt

    try:
        parse_prompt(prompt)
        if negative is not None:
            negated_labels(negative)
    except ValueError as error:
        raise UsageError(f"{where}: the embedded model's judge needs its grammar: {error}") from None


def read_prompts(args: argparse.Namespace, embedded: bool) -> List[Prompt]:
    """The prompts of PROMPTS (text and negative; a line's own seeds, counts and settings are refused), or of the
    grammar (``grammar_prompts``)."""
    from ..jobs.prompts import PromptFileError, read_prompt_file

    sources = [args.prompts, args.embedded_prompts, args.negative_prompts]
    if sum(source is not None for source in sources) != 1:
        raise UsageError("give one of PROMPTS (a .txt/.jsonl file), --embedded-prompts N or --negative-prompts N")
    if args.prompts is None:
        return grammar_prompts(args, embedded)
    try:
        lines = read_prompt_file(args.prompts)
    except PromptFileError as error:
        raise UsageError(str(error)) from None
    for line in lines:
        where = f"{args.prompts}:{line.line}"
        if line.seed is not None or line.n is not None:
            raise UsageError(f'{where}: eval gives all prompts the same seeds (--seed, --seeds); remove "seed", "n"')
        if embedded:
            check_embedded_line(where, line.prompt, line.negative)
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
        line = {key: value for key, value in settings[mode].items() if key != NEGATIVE_FOR}
        fields = settings[mode].get(NEGATIVE_FOR, "negative").split("+")
        negative = {} if unit.negative is None else {field: unit.negative for field in fields if field}
        lines.append({"prompt": unit.prompt, "seed": unit.seed, "n": unit.n, **line, **negative})
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
    """Ground-truth renders: ``seeds`` of each prompt (what it leaves open drawn at random, never the value its
    negative names); ``unconditional`` scenes drawn as the training data's."""
    from ..toy.data import complete_labels, negated_labels, parse_prompt, random_labels, render

    rng = np.random.default_rng(REFERENCE_SEED)
    side = min(size)

    def truth(prompt: Prompt) -> np.ndarray:
        avoid = negated_labels(prompt.negative) if prompt.negative is not None else ("", "")
        return render(complete_labels(parse_prompt(prompt.text), rng, avoid), side, rng)

    conditional = [truth(p) for p in prompts for _ in range(seeds)]
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
    texts = [p.text for p in prompts for _ in range(seeds)]
    negatives = [p.negative for p in prompts for _ in range(seeds)]
    measured: Dict[str, Measured] = {}
    if judge is not None:
        from .adherence import attribute_hits

        hits = attribute_hits(conditional, texts, judge)
        for attribute, values in hits.items():
            measured["adherence" if attribute == "overall" else attribute] = Measured(per_prompt(values, count), True)
        measured.update(negative_metrics(conditional, negatives, count, judge=judge))
    if clip is not None:
        from .clip import clip_scores

        measured["clip_score"] = Measured(per_prompt(clip_scores(conditional, texts, clip), count), True)
        measured.update(negative_metrics(conditional, negatives, count, clip=clip))
    generated = features(conditional)
    if references[0] is not None:
        measured["kid"] = kernel_distance(generated, references[0], count)
    if unconditional and references[1] is not None:
        measured["kid_uncond"] = kernel_distance(features(unconditional), references[1], len(unconditional))
    if seeds >= 2:
        measured["diversity"] = Measured(diversity(generated.reshape(count, seeds, -1)), True)
    return measured


def negative_metrics(
    images: list, negatives: Sequence[Optional[str]], prompts: int, judge=None, clip=None
) -> Dict[str, Measured]:
    """Lower-is-better metrics of what the negative prompts name, NaN for images without one: with the judge the
    share that shows the negated value (``adherence.negated_hits``), with CLIP the CLIP score of the negative.
    Empty when no prompt has a negative."""
    have = [k for k, negative in enumerate(negatives) if negative is not None]
    if not have:
        return {}
    chosen, texts = [images[k] for k in have], [str(negatives[k]) for k in have]
    if judge is not None:
        from .adherence import negated_hits

        values = negated_hits(chosen, texts, judge)
    else:
        from .clip import clip_scores

        values = {"negative_clip_score": clip_scores(chosen, texts, clip)}
    measured = {}
    for name, some in values.items():
        full = np.full(len(images), np.nan)
        full[have] = some
        measured[name] = Measured(per_prompt(full, prompts), False)
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


def example_label(prompt: Prompt) -> str:
    """The row label of a prompt in examples.png: the prompt, and its negative when it has one."""
    return prompt.text if prompt.negative is None else f"{prompt.text} (negative: {prompt.negative})"


# --- the command ----------------------------------------------------------------------------------------------


def evaluate(args: argparse.Namespace) -> int:
    """Check everything, make the missing images with the batch job, then (main process) measure and report."""
    check_output_folder(args.out)
    if args.toy_judge and args.model is None:
        raise UsageError("--toy-judge goes with --model (the embedded model is measured by its judge anyway)")
    embedded = measured_by_judge(args)
    prompts = read_prompts(args, embedded)
    text = args.modes
    if text is None:  # the model's NAG scale: its folder is read (not loaded) after the cheaper checks
        text = default_modes(args.negative_prompts is not None, model_and_settings(args.model, args.allow_pickle).settings)
    modes = mode_settings(args, parse_modes(text, args.baseline))
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
    status = run_batch(argparse.Namespace(**{**vars(args), "prompts": plan, "out": folder, "n": 1}),
                       lambda job: f"{order[job.line - 1][0]}: {job.prompt or EMPTY_LABEL}")  # fmt: skip
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
    if measured_by_judge(args):
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
    labels = [example_label(p) for p in prompts[:rows]] + ([EMPTY_LABEL] if args.unconditional else [])
    paths = write_report(args.out, results, args.baseline, examples, labels)
    print(markdown(results, args.baseline), end="")
    print(f"wrote {', '.join(sorted(path.name for path in paths.values()))} to {os.path.abspath(args.out)}")
    return 0
