"""Position and size of the one shape in a toy picture, measured from its pixels (the judge has no heads for them).

The background colour is the median of the border pixels; a pixel's coverage is its colour distance from the
background over the foreground's (the median of the clearly foreground pixels), so anti-aliased edges count by
half. The shape is the largest connected region with coverage above one half. Its centroid gives the position
(the nearest of ``data.POSITIONS``), its circumradius (the farthest pixel centre from the centroid) the size:
every toy shape has its corners on the circle of the drawn radius, so this needs no shape. Size classes split
midway between the radius ranges of ``data.SIZES`` (0.20 and 0.295 of the side). On ground-truth renders at
64 px the measured radius stays inside its class (small 0.12-0.19, medium 0.21-0.29, large 0.30-0.41) and
the position is right for over 99% of them (see the tests).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..toy.data import POSITIONS, SIZES

MIN_CONTRAST = 30.0  # colour distance (0-255 units) below which a picture has no foreground


@dataclass(frozen=True)
class Layout:
    """Centroid ``x``, ``y`` and circumradius ``radius`` as fractions of the side; classes "" when no shape is found."""

    x: float
    y: float
    radius: float
    position: str
    size: str


def size_class(radius: float) -> str:
    """The ``data.SIZES`` class of a radius (fraction of the side): boundaries midway between adjacent ranges."""
    ranges = sorted(SIZES.items(), key=lambda item: item[1])
    for (name, (_, high)), (_, (low, _)) in zip(ranges, ranges[1:]):
        if radius < (high + low) / 2:
            return name
    return ranges[-1][0]


def position_class(x: float, y: float) -> str:
    """The ``data.POSITIONS`` class whose centre is nearest to ``(x, y)`` (fractions of the side)."""
    return min(POSITIONS, key=lambda name: (POSITIONS[name][0] - x) ** 2 + (POSITIONS[name][1] - y) ** 2)


def foreground_mask(image) -> Optional[np.ndarray]:
    """Boolean ``[H, W]`` mask of the largest region far from the border colour; ``None`` for a plain picture."""
    from scipy import ndimage

    pixels = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image, dtype=np.float64)
    background = np.median(np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]]), axis=0)
    distance = np.linalg.norm(pixels - background, axis=-1)
    if distance.max() < MIN_CONTRAST:
        return None
    contrast = np.linalg.norm(np.median(pixels[distance > distance.max() / 2], axis=0) - background)
    regions, _ = ndimage.label(distance > max(contrast, MIN_CONTRAST) / 2)
    return regions == 1 + int(np.argmax(np.bincount(regions.ravel())[1:]))


def measure_layout(image) -> Layout:
    """Position and size of the shape in one picture (PIL image or uint8 ``[H, W, 3]``, any size)."""
    mask = foreground_mask(image)
    if mask is None:
        return Layout(float("nan"), float("nan"), float("nan"), "", "")
    rows, columns = np.nonzero(mask)
    height, width = mask.shape
    ys, xs = (rows + 0.5) / height, (columns + 0.5) / width
    x, y = float(xs.mean()), float(ys.mean())
    radius = float(np.sqrt((xs - x) ** 2 + (ys - y) ** 2).max())
    return Layout(x, y, radius, position_class(x, y), size_class(radius))
