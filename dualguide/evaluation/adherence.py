"""Per-image, per-attribute prompt adherence on the embedded toy model: judged shape, colour and background,
measured position and size (see ``layout``); and how often an image shows what its negative prompt names."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np

from ..toy.data import OPEN_ATTRIBUTES, Labels, negated_labels, parse_prompt
from ..toy.judge import HEADS, ShapeJudge
from .layout import measure_layout

ATTRIBUTES = ("overall", *HEADS, "position", "size")
NEGATED = ("negated", *(f"negated_{name}" for name in OPEN_ATTRIBUTES))


def _judged(images: Sequence, texts: Sequence[str], judge: Optional[ShapeJudge]) -> List[Labels]:
    if len(images) != len(texts):
        raise ValueError(f"got {len(images)} images for {len(texts)} prompts; give one prompt per image")
    return (judge or ShapeJudge.load()).predict(images) if len(images) else []


def _named_hits(judged: Sequence[Labels], wanted: Sequence[Labels], name: str) -> np.ndarray:
    """1.0 where the judge sees the prompt's ``name``, 0.0 where not, NaN where the prompt leaves it open."""
    return np.array([float(j[name] == w[name]) if w[name] else np.nan for j, w in zip(judged, wanted)])


def attribute_hits(
    images: Sequence, prompts: Sequence[str], judge: Optional[ShapeJudge] = None
) -> Dict[str, np.ndarray]:
    """Whether each image (PIL or uint8 ``[H, W, 3]``, one per grammar prompt) shows each attribute of its prompt.

    Float arrays keyed by ``ATTRIBUTES``, 1.0 (right) or 0.0 (wrong) per image, NaN where there is nothing to
    check (average with ``np.nanmean``): a colour, shape or background the prompt leaves open, a position it does
    not name. "overall" needs shape and colour both, those the prompt names (NaN if it names neither). "size" is
    checked for every prompt: without a size word the target is "medium", the size ``data.render`` draws then.
    The judge defaults to the embedded one.
    """
    judged = _judged(images, prompts, judge)
    wanted = [parse_prompt(prompt) for prompt in prompts]
    layouts = [measure_layout(image) for image in images]
    hits = {name: _named_hits(judged, wanted, name) for name in HEADS}
    both = np.stack([hits["shape"], hits["color"]])
    hits["overall"] = np.where(np.isnan(both).all(axis=0), np.nan, np.nanprod(both, axis=0))
    hits["position"] = np.array([float(m.position == w["position"]) if w["position"] else np.nan
                                 for m, w in zip(layouts, wanted)])  # fmt: skip
    hits["size"] = np.array([float(m.size == w["size"]) for m, w in zip(layouts, wanted)])
    return {name: hits[name] for name in ATTRIBUTES}


def negated_hits(
    images: Sequence, negatives: Sequence[str], judge: Optional[ShapeJudge] = None
) -> Dict[str, np.ndarray]:
    """Whether each image shows the value its negative prompt names (``data.negated_labels``: "red", "a circle",
    "a shape on a red background"); lower is better.

    Float arrays keyed by ``NEGATED``: "negated" for every image, "negated_<attribute>" only where the negative
    names that attribute (NaN elsewhere). ValueError for a negative that names no single value.
    """
    named = [negated_labels(negative) for negative in negatives]
    judged = _judged(images, negatives, judge)
    shown = np.array([float(j[attribute] == value) for j, (attribute, value) in zip(judged, named)])
    hits = {"negated": shown}
    for name in OPEN_ATTRIBUTES:
        hits[f"negated_{name}"] = np.where([attribute == name for attribute, _ in named], shown, np.nan)
    return hits
