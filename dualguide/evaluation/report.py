"""Evaluation report files: ``results.md``, ``results.csv``, ``results.json``, ``metrics.png``, ``examples.png``.

``results`` maps mode -> metric -> ``MetricResult``; every mode but the baseline carries its paired
comparison with the baseline (``statistics.paired_comparison``). Files are written atomically.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
import textwrap
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Union

import numpy as np

from .statistics import CONFIDENCE, PairedComparison

FIGURE_COLUMNS = 5  # metric panels per row of metrics.png
NEGATIVE_PREFIXES = ("negated", "negative_")  # metrics of what the negative prompts name (lower is better)
BESIDE_NEGATIVES = ("adherence", "shape", "color", "background", "clip_score")  # positive metrics shown beside them


@dataclass(frozen=True)
class MetricResult:
    """A metric's value for one mode over ``n`` prompts, its standard error if known (KID), and the comparison."""

    value: float
    n: int
    error: Optional[float] = None
    comparison: Optional[PairedComparison] = None


Results = Mapping[str, Mapping[str, MetricResult]]


def write_atomic(path: Union[str, os.PathLike], data: bytes) -> None:
    """Write ``data`` to a uniquely named temporary file beside ``path``, then ``os.replace`` it onto ``path``."""
    path = Path(path)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as f:
            f.write(data)
        os.chmod(temporary, 0o644)  # mkstemp makes it private
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def _metrics(results: Results) -> List[str]:
    return list(dict.fromkeys(metric for by_metric in results.values() for metric in by_metric))


def format_cell(result: MetricResult) -> str:
    """``value`` (``± error``), then for a compared mode ``(Δ difference [low, high]) verdict``."""
    text = f"{result.value:.4g}" + (f" ± {result.error:.2g}" if result.error is not None else "")
    c = result.comparison
    return text if c is None else f"{text} (Δ {c.difference:+.3g} [{c.low:+.3g}, {c.high:+.3g}]) {c.verdict}"


def _table(results: Results, metrics: Sequence[str]) -> List[str]:
    """Markdown lines of a mode x ``metrics`` table."""
    lines = ["| mode | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for mode, by_metric in results.items():
        cells = [format_cell(by_metric[m]) if m in by_metric else "" for m in metrics]
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    return lines


def negative_metric_names(results: Results) -> List[str]:
    """The metrics of what the negative prompts name, in report order."""
    return [metric for metric in _metrics(results) if metric.startswith(NEGATIVE_PREFIXES)]


def markdown(results: Results, baseline: str) -> str:
    """A mode x metric table; each compared cell gives the difference to ``baseline`` and its interval. With
    negative prompts a second table gives what they name beside the positive adherence."""
    metrics = _metrics(results)
    lines = [
        f"Baseline: `{baseline}`. ±: standard error. Δ: mean per-prompt difference to the baseline, [low, high] "
        f"its {CONFIDENCE:.0%} bootstrap interval; 'better' or 'worse' only where that interval excludes 0.",
        "",
        *_table(results, metrics),
    ]
    negatives = negative_metric_names(results)
    if negatives:
        beside = [metric for metric in BESIDE_NEGATIVES if metric in metrics]
        lines += ["", "Negative prompts: `negated` is the share of images that show the value the negative names "
                  "(lower is better; per attribute in `negated_*`), beside adherence to what the prompt names.", "",
                  *_table(results, negatives + beside)]  # fmt: skip
    return "\n".join(lines) + "\n"


def _flat(result: Optional[MetricResult]) -> Dict[str, object]:
    if result is None:
        return {}
    return {**(asdict(result.comparison) if result.comparison else {}), **asdict(result)}


def csv_text(results: Results) -> str:
    """One row per mode; per metric its value, n, error and comparison fields (empty where absent)."""
    fields = ["value", "n", "error"] + [f for f in PairedComparison.__dataclass_fields__ if f not in ("n", "mean")]
    metrics = _metrics(results)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["mode"] + [f"{metric}.{field}" for metric in metrics for field in fields])
    for mode, by_metric in results.items():
        row: List[object] = [mode]
        for metric in metrics:
            flat = _flat(by_metric.get(metric))
            row += ["" if flat.get(field) is None else flat[field] for field in fields]
        writer.writerow(row)
    return buffer.getvalue()


def json_text(results: Results, baseline: str) -> str:
    """``{"baseline": ..., "modes": {mode: {metric: MetricResult as a dict}}}``; NaN and infinities become null."""

    def clean(value):
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        value = value.item() if isinstance(value, np.generic) else value
        return None if isinstance(value, float) and not math.isfinite(value) else value

    modes = {mode: {metric: clean(asdict(r)) for metric, r in by_metric.items()} for mode, by_metric in results.items()}
    return json.dumps({"baseline": baseline, "modes": modes}, indent=2) + "\n"


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")  # a bare Figure renders with Agg
    return buffer.getvalue()


def metrics_figure(results: Results, baseline: str) -> bytes:
    """PNG: per metric a panel (up to ``FIGURE_COLUMNS`` a row) with each compared mode's difference to ``baseline``,
    its interval and a zero line."""
    from matplotlib.figure import Figure

    metrics = _metrics(results)
    columns = min(len(metrics), FIGURE_COLUMNS)
    rows = math.ceil(len(metrics) / columns)
    figure = Figure(figsize=(3.2 * columns, 3.4 * rows), layout="tight")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for ax in axes[len(metrics) :]:
        ax.set_axis_off()
    for ax, metric in zip(axes, metrics):
        compared = [(mode, r[metric].comparison) for mode, r in results.items() if metric in r and r[metric].comparison]
        names = [mode for mode, _ in compared]
        differences = [c.difference for _, c in compared]
        errors = [[c.difference - c.low for _, c in compared], [c.high - c.difference for _, c in compared]]
        ax.errorbar(range(len(names)), differences, yerr=errors, fmt="o", capsize=4)
        ax.axhline(0.0, color="grey", linewidth=1)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set_title(metric)
        ax.set_ylabel(f"difference to {baseline}")
    return _png(figure)


def examples_figure(examples: Mapping[str, Sequence], labels: Sequence[str] = ()) -> bytes:
    """PNG grid: one column per mode (titled), one row per sample (labelled by ``labels``, e.g. the prompts)."""
    from matplotlib.figure import Figure

    modes = list(examples)
    rows = len(examples[modes[0]])
    if any(len(images) != rows for images in examples.values()):
        raise ValueError(f"examples need as many images for every mode, got {[len(v) for v in examples.values()]}")
    figure = Figure(figsize=(2 * len(modes), 2 * rows), layout="tight")
    axes = figure.subplots(rows, len(modes), squeeze=False)
    for column, mode in enumerate(modes):
        axes[0, column].set_title(mode, fontsize=9)
        for row, image in enumerate(examples[mode]):
            axes[row, column].imshow(image, interpolation="nearest")
            axes[row, column].set_xticks([])
            axes[row, column].set_yticks([])
    for ax, label in zip(axes[:, 0], labels):
        ax.set_ylabel(textwrap.fill(label, 28), fontsize=7, rotation=0, ha="right", va="center")
    return _png(figure)


def write_report(
    folder: Union[str, os.PathLike], results: Results, baseline: str,
    examples: Optional[Mapping[str, Sequence]] = None, labels: Sequence[str] = (),
) -> Dict[str, Path]:  # fmt: skip
    """Write the report files into ``folder`` (``examples.png`` only with ``examples``); returns their paths."""
    if baseline not in results:
        raise ValueError(f"baseline {baseline!r} is not one of the modes {list(results)}")
    os.makedirs(folder, exist_ok=True)
    contents = {
        "results.md": markdown(results, baseline).encode(),
        "results.csv": csv_text(results).encode(),
        "results.json": json_text(results, baseline).encode(),
        "metrics.png": metrics_figure(results, baseline),
    }
    if examples:
        contents["examples.png"] = examples_figure(examples, labels)
    paths = {name: Path(folder) / name for name in contents}
    for name, data in contents.items():
        write_atomic(paths[name], data)
    return paths
