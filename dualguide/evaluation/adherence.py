"""Per-image, per-attribute prompt adherence on the embedded toy model: judged shape, colour and background,
measured position and size (see ``layout``)."""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np

from ..toy.data import parse_prompt
from ..toy.judge import HEADS, ShapeJudge
from .layout import measure_layout

ATTRIBUTES = ("overall", *HEADS, "position", "size")


def attribute_hits(
    images: Sequence, prompts: Sequence[str], judge: Optional[ShapeJudge] = None
) -> Dict[str, np.ndarray]:
    """Whether each image (PIL or uint8 ``[H, W, 3]``, one per grammar prompt) shows each attribute of its prompt.

    Float arrays keyed by ``ATTRIBUTES``, 1.0 (right) or 0.0 (wrong) per image; "overall" needs shape and colour
    both (as ``toy.judge.adherence``). "position" is NaN where the prompt names no position (nothing to check;
    average with ``np.nanmean``). "size" is checked for every prompt: without a size word the target is
    "medium", the size ``data.render`` draws then. The judge defaults to the embedded one.
    """
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images for {len(prompts)} prompts; give one prompt per image")
    wanted = [parse_prompt(prompt) for prompt in prompts]
    judged = (judge or ShapeJudge.load()).predict(images)
    layouts = [measure_layout(image) for image in images]
    hits = {name: np.array([j[name] == w[name] for j, w in zip(judged, wanted)], dtype=np.float64) for name in HEADS}
    hits["overall"] = hits["shape"] * hits["color"]
    hits["position"] = np.array([float(m.position == w["position"]) if w["position"] else np.nan
                                 for m, w in zip(layouts, wanted)])  # fmt: skip
    hits["size"] = np.array([float(m.size == w["size"]) for m, w in zip(layouts, wanted)])
    return {name: hits[name] for name in ATTRIBUTES}
