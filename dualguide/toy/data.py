"""Procedural, seeded text-image data: one coloured shape on a plain background, captioned from a small grammar.

Grammar (optional parts in brackets)::

    a [small|large] [COLOR] SHAPE|shape [on the left|on the right|at the top|at the bottom|in the center]
      [on a COLOR background]

A caption may leave an attribute open: without a colour word, with "shape" for the shape or without the
background phrase, the prompt means "any" for it ("a circle on a blue background", "a red shape"). The
UNet is trained on captions that drop each attribute at ``CAPTION_DROPOUT`` (``training_caption``), and
about 10% of the captions are empty (for classifier-free guidance). Only numpy and PIL are used.
"""

from __future__ import annotations

import math
import re
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image, ImageDraw

SHAPES: Tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
COLORS: Dict[str, Tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (245, 220, 30),
    "purple": (140, 40, 170),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SIZES: Dict[str, Tuple[float, float]] = {"small": (0.14, 0.18), "medium": (0.22, 0.27), "large": (0.32, 0.38)}
POSITIONS: Dict[str, Tuple[float, float]] = {
    "center": (0.5, 0.5), "left": (0.3, 0.5), "right": (0.7, 0.5), "top": (0.5, 0.3), "bottom": (0.5, 0.7),
}  # fmt: skip
POSITION_PHRASES: Dict[str, str] = {
    "left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
    "center": "in the center",
}  # fmt: skip
EMPTY_CAPTION_RATE = 0.1
CAPTION_DROPOUT: Mapping[str, float] = {  # rate at which a training caption leaves out each attribute (the v2 weights')
    "color": 0.2, "shape": 0.1, "background": 0.2, "size": 0.1, "position": 0.1,
}  # fmt: skip
OPEN_ATTRIBUTES = ("color", "shape", "background")  # the attributes a prompt can leave open ("" in its labels)
ANY_SHAPE = "shape"  # the noun of a caption whose shape is open
SUPERSAMPLING = 4
EVALUATION_SEED = 1234  # evaluation_prompts: what dualguide eval and the tests measure
TUNING_SEED = 4321  # tuning_prompts: what training.evaluate chooses recommended.json on
HELD_OUT_POOL = 1024
NEGATIVE_SEED = 2468  # negative_prompts: dualguide eval --negative-prompts
TUNING_NEGATIVE_SEED = 8642  # tuning_negative_prompts: what training.evaluate_nag chooses NAG's settings on

Labels = Dict[str, str]
DropoutRates = Union[float, Mapping[str, float]]  # one rate for every attribute, or a rate per attribute
DROPPABLE: Dict[str, str] = {"color": "", "shape": "", "background": "", "size": "medium", "position": ""}  # open value

_PROMPT = re.compile(
    r"^an? (?:(?P<size>small|large) )?(?:(?P<color>\w+) )?(?P<shape>\w+)"
    r"(?: (?:on the|at the|in the) (?P<position>left|right|top|bottom|center))?"
    r"(?: on an? (?P<background>\w+) background)?$"
)


def grammar_words() -> List[str]:
    """Every word the caption grammar can produce (for the tokenizer vocabulary)."""
    words = {"a", "an", "on", "the", "at", "in", "background", ANY_SHAPE}
    words.update(SHAPES, COLORS, (s for s in SIZES if s != "medium"), POSITIONS)
    return sorted(words)


def random_labels(rng: np.random.Generator, size_rate: float = 0.3, position_rate: float = 0.3) -> Labels:
    """A random scene: shape, colour, a different background colour, size and position.

    ``size`` is "small"/"large" with probability ``size_rate`` (else "medium", which has no caption word);
    ``position`` is a side or "center" with probability ``position_rate`` (else "", centred without a word).
    """
    color, background = rng.choice(list(COLORS), size=2, replace=False)
    size = str(rng.choice(["small", "large"])) if rng.random() < size_rate else "medium"
    position = str(rng.choice(list(POSITIONS))) if rng.random() < position_rate else ""
    return {"shape": str(rng.choice(SHAPES)), "color": str(color), "background": str(background), "size": size,
            "position": position}  # fmt: skip


def caption(labels: Labels) -> str:
    """The grammar caption of ``labels``; an empty or missing colour, shape or background is left open."""
    size = f"{labels['size']} " if labels.get("size", "medium") != "medium" else ""
    color = f"{labels['color']} " if labels.get("color") else ""
    position = f" {POSITION_PHRASES[labels['position']]}" if labels.get("position") else ""
    thing = f"{size}{color}{labels.get('shape') or ANY_SHAPE}"
    ground = labels.get("background")
    background = f" on {_article(ground)} {ground} background" if ground else ""
    return f"{_article(thing)} {thing}{position}{background}"


def drop_attributes(labels: Labels, rng: np.random.Generator, rate: DropoutRates = CAPTION_DROPOUT) -> Labels:
    """``labels`` with each of colour, shape, background (to ""), size (to "medium") and position (to "") dropped at
    ``rate`` (one rate, or one per attribute name; a name left out is never dropped): what the caption of the result
    names is true of the image, and what it leaves open is "any"."""
    rates = [rate.get(name, 0.0) if isinstance(rate, Mapping) else rate for name in DROPPABLE]
    dropped = rng.random(len(DROPPABLE)) < np.asarray(rates)
    return {name: open_value if drop else labels[name] for (name, open_value), drop in zip(DROPPABLE.items(), dropped)}


def training_caption(
    labels: Labels, rng: np.random.Generator, rate: DropoutRates = CAPTION_DROPOUT, empty_rate: float = EMPTY_CAPTION_RATE
) -> str:
    """A caption for a training image: "" at ``empty_rate``, else ``labels`` with attributes dropped at ``rate``."""
    return "" if rng.random() < empty_rate else caption(drop_attributes(labels, rng, rate))


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def parse_prompt(prompt: str) -> Labels:
    """Labels of a grammar prompt: shape, color, background ("" when left open), size ("medium" when absent) and
    position ("" when absent).

    Raises ``ValueError`` for a prompt outside the grammar.
    """
    match = _PROMPT.match(" ".join(prompt.lower().split()))
    shape = match["shape"] if match else None
    colors = {match["color"], match["background"]} - {None} if match else set()
    if match is None or shape not in (*SHAPES, ANY_SHAPE) or not colors <= set(COLORS):
        example = caption(random_labels(np.random.default_rng(0)))
        partial = "a star on a blue background"
        raise ValueError(f"prompt {prompt!r} is not in the toy grammar, e.g. {example!r} or {partial!r}")
    return {"shape": "" if shape == ANY_SHAPE else shape, "color": match["color"] or "",
            "background": match["background"] or "", "size": match["size"] or "medium",
            "position": match["position"] or ""}  # fmt: skip


def _distinct_with_open(attribute: str) -> int:
    """How many distinct prompts leave ``attribute`` open and name the rest (sizes x positions x the named values)."""
    named = len(COLORS) * (len(COLORS) - 1) if attribute == "shape" else len(SHAPES) * len(COLORS)
    return named * len(SIZES) * (len(POSITIONS) + 1)


def _ring(count: int, start: float, radii: Sequence[float] = (1.0,)) -> List[Tuple[float, float]]:
    """``count`` points evenly spaced in angle from ``start``, at radii cycling through ``radii``."""
    angles = [start + 2 * math.pi * k / count for k in range(count)]
    return [(radii[k % len(radii)] * math.cos(a), radii[k % len(radii)] * math.sin(a)) for k, a in enumerate(angles)]


def _unit_polygon(shape: str) -> List[Tuple[float, float]]:
    """Corners of ``shape`` (not circle) with radius 1 around the origin, y pointing down."""
    if shape == "square":
        return _ring(4, math.pi / 4)
    if shape == "triangle":
        return [(x, y + 0.2) for x, y in _ring(3, -math.pi / 2)]
    if shape == "star":
        return _ring(10, -math.pi / 2, (1.0, 0.45))
    if shape == "cross":
        w = 0.33
        arm = [(-w, -1.0), (w, -1.0), (w, -w)]  # one arm; the other three are its quarter turns
        return [point for quarter in range(4) for point in _rotate(arm, quarter * math.pi / 2)]
    raise ValueError(f"unknown shape {shape!r}; valid: {', '.join(SHAPES)}")


def _rotate(points: Sequence[Tuple[float, float]], angle: float) -> List[Tuple[float, float]]:
    cos, sin = math.cos(angle), math.sin(angle)
    return [(x * cos - y * sin, x * sin + y * cos) for x, y in points]


def _jitter(color: Tuple[int, int, int], rng: np.random.Generator, amount: int = 12) -> Tuple[int, ...]:
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in color)


def render(labels: Labels, resolution: int = 64, rng: Optional[np.random.Generator] = None) -> np.ndarray:
    """Draw ``labels`` as a uint8 ``[resolution, resolution, 3]`` image (anti-aliased, slightly jittered by ``rng``)."""
    rng = rng if rng is not None else np.random.default_rng(0)
    big = resolution * SUPERSAMPLING
    image = Image.new("RGB", (big, big), _jitter(COLORS[labels["background"]], rng))
    draw = ImageDraw.Draw(image)
    r = rng.uniform(*SIZES[labels.get("size", "medium")]) * big
    cx, cy = POSITIONS[labels.get("position") or "center"]
    spread = 0.04 if labels.get("position") else 0.06
    cx, cy = (cx + rng.uniform(-spread, spread)) * big, (cy + rng.uniform(-spread, spread)) * big
    fill = _jitter(COLORS[labels["color"]], rng)
    if labels["shape"] == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        corners = _rotate(_unit_polygon(labels["shape"]), rng.uniform(-0.25, 0.25))
        draw.polygon([(cx + r * x, cy + r * y) for x, y in corners], fill=fill)
    return np.asarray(image.resize((resolution, resolution), Image.Resampling.BOX))


def sample(
    rng: np.random.Generator, resolution: int = 64, empty_rate: float = EMPTY_CAPTION_RATE
) -> Tuple[np.ndarray, str, Labels]:
    """One random ``(image, caption, labels)``; the caption is "" with probability ``empty_rate``."""
    labels = random_labels(rng)
    text = "" if rng.random() < empty_rate else caption(labels)
    return render(labels, resolution, rng), text, labels


def make_dataset(
    count: int, seed: int = 0, resolution: int = 64, empty_rate: float = EMPTY_CAPTION_RATE
) -> Tuple[np.ndarray, List[str], List[Labels]]:
    """``count`` samples from ``seed``: images ``[count, H, W, 3]`` uint8, captions and labels."""
    rng = np.random.default_rng(seed)
    images = np.empty((count, resolution, resolution, 3), dtype=np.uint8)
    captions, labels = [], []
    for i in range(count):
        images[i], text, label = sample(rng, resolution, empty_rate)
        captions.append(text)
        labels.append(label)
    return images, captions, labels


def evaluation_prompts(
    count: int = 32, seed: int = EVALUATION_SEED, plain: bool = False, exclude: Sequence[str] = ()
) -> List[str]:
    """``count`` distinct full grammar prompts from ``seed``, none in ``exclude``; ``plain`` leaves out size and
    position words."""
    rng = np.random.default_rng(seed)
    rates = (0.0, 0.0) if plain else (0.3, 0.3)
    prompts: Dict[str, None] = {}
    skip = set(exclude)
    while len(prompts) < count:
        text = caption(random_labels(rng, *rates))
        if text not in skip:
            prompts[text] = None
    return list(prompts)


def tuning_prompts(count: int = 32) -> List[str]:
    """Held-out prompts for choosing settings (``recommended.json``): none is among the first ``HELD_OUT_POOL``
    prompts of ``evaluation_prompts``, which ``dualguide eval`` measures."""
    return evaluation_prompts(count, TUNING_SEED, exclude=evaluation_prompts(HELD_OUT_POOL))


def complete_labels(labels: Labels, rng: np.random.Generator, avoid: Tuple[str, str] = ("", "")) -> Labels:
    """``labels`` with an open colour, shape or background drawn as the training data draws it (colour and
    background differ), never the ``(attribute, value)`` of ``avoid`` (what a negative prompt names)."""
    result = dict(labels)
    for name in OPEN_ATTRIBUTES:
        if not result[name]:
            taken = {result["color"], result["background"]} if name != "shape" else set()
            choices = [v for v in (SHAPES if name == "shape" else COLORS) if v not in taken and avoid != (name, v)]
            result[name] = str(rng.choice(choices))
    return result


def negative_text(attribute: str, value: str) -> str:
    """The grammar phrase that names only ``value`` of ``attribute``: "a red shape", "a circle",
    "a shape on a red background" (in distribution for a model trained with attribute dropout)."""
    return caption({attribute: value})


def negative_prompts(count: int, seed: int = NEGATIVE_SEED, exclude: Sequence[str] = ()) -> List[Tuple[str, str]]:
    """``count`` (at most ``MAX_NEGATIVE_PROMPTS``) distinct ``(prompt, negative)`` pairs: the prompt leaves one attribute open (colour, shape,
    background in turn) and names the others; the negative names one value of the open attribute, one the scene
    could show (a colour other than the named background, a background other than the named colour). No prompt
    is in ``exclude``."""
    rng = np.random.default_rng(seed)
    pairs: Dict[str, str] = {}
    skip = set(exclude)
    while len(pairs) < count:
        attribute = OPEN_ATTRIBUTES[len(pairs) % len(OPEN_ATTRIBUTES)]
        labels = {**random_labels(rng), attribute: ""}
        named = (labels["color"], labels["background"])
        value = str(rng.choice(SHAPES if attribute == "shape" else [c for c in COLORS if c not in named]))
        if caption(labels) not in skip:
            pairs.setdefault(caption(labels), negative_text(attribute, value))
    return list(pairs.items())


def tuning_negative_prompts(count: int = 48) -> List[Tuple[str, str]]:
    """Held-out ``(prompt, negative)`` pairs for choosing NAG's settings (``recommended.json``): no prompt is among
    the first ``HELD_OUT_POOL`` of ``negative_prompts``, which ``dualguide eval --negative-prompts`` measures."""
    held_out = [prompt for prompt, _ in negative_prompts(HELD_OUT_POOL)]
    return negative_prompts(count, TUNING_NEGATIVE_SEED, exclude=held_out)


MAX_NEGATIVE_PROMPTS = len(OPEN_ATTRIBUTES) * min(_distinct_with_open(name) for name in OPEN_ATTRIBUTES)


def negated_labels(negative: str) -> Tuple[str, str]:
    """``(attribute, value)`` that a negative prompt names: a bare colour ("red": the shape's colour) or shape word,
    or a grammar phrase naming exactly one colour, shape or background ("a shape on a red background").

    Raises ``ValueError`` otherwise.
    """
    text = " ".join(negative.lower().split())
    if text in COLORS or text in SHAPES:
        return ("color" if text in COLORS else "shape"), text
    try:
        labels = parse_prompt(text)
    except ValueError:
        labels = {}
    named = [(name, labels[name]) for name in OPEN_ATTRIBUTES if labels.get(name)]
    if len(named) != 1:
        raise ValueError(f"negative prompt {negative!r} must name one colour, shape or background, e.g. 'red', "
                         f"'{negative_text('color', 'red')}', '{negative_text('background', 'red')}'")  # fmt: skip
    return named[0]


def label_indices(labels: Sequence[Labels]) -> Dict[str, np.ndarray]:
    """Class indices of shape, color and background (in ``SHAPES`` / ``COLORS`` order) as int64 arrays."""
    colors = list(COLORS)
    return {
        "shape": np.array([SHAPES.index(l["shape"]) for l in labels], dtype=np.int64),
        "color": np.array([colors.index(l["color"]) for l in labels], dtype=np.int64),
        "background": np.array([colors.index(l["background"]) for l in labels], dtype=np.int64),
    }
