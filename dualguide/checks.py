"""Argument checks beyond scalars: image sizes, pairs, tensors, prompts, generators, layer-id specs; with the scalar checks of
``samplers.checks``, the primitives that ``dualguide.validation`` and ``dualguide.config`` check input with.
Nothing heavy is imported at module level.
"""

from __future__ import annotations

import numbers
from typing import Any, Optional, Sequence, Tuple

from samplers.checks import INF, check_bool, check_choice, check_number, describe_range, is_bool, is_number

__all__ = [
    "INF", "check_bool", "check_choice", "check_generator", "check_layer_spec", "check_number", "check_pair",
    "check_prompt", "check_prompt_batch", "check_size", "check_tensor", "describe_range", "is_bool", "is_number",
]  # fmt: skip


def check_size(value: Any, name: str, factor: int, default: Optional[int] = None) -> int:
    """An image side in pixels: a positive integer multiple of ``factor``; ``None`` gives ``default``."""
    if value is None and default is not None:
        return default
    valid = f"a positive integer multiple of the VAE factor {factor}"
    if not is_number(value):
        raise TypeError(f"{name} must be {valid}, got {value!r} of type {type(value).__name__}")
    if not isinstance(value, numbers.Integral) or value <= 0 or int(value) % factor:
        raise ValueError(f"{name} must be {valid}, got {value!r}")
    return int(value)


def check_pair(value: Any, name: str, low: int = 0, optional: bool = False) -> Optional[Tuple[int, int]]:
    """A pair of integers ``>= low`` (SDXL sizes and crop coordinates) as a tuple of Python ints."""
    if value is None and optional:
        return None
    valid = f"a pair of integers >= {low}{' or None' if optional else ''}"
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) and not _is_array(value):
        raise TypeError(f"{name} must be {valid}, got {value!r}")
    items = list(value)
    if len(items) != 2:
        raise ValueError(f"{name} must be {valid}, got {len(items)} values: {value!r}")
    return tuple(check_number(v, name, low, integer=True) for v in items)  # type: ignore[return-value]


def _is_array(value: Any) -> bool:
    return hasattr(value, "shape") and hasattr(value, "__len__")


def check_tensor(
    value: Any,
    name: str,
    shape: Optional[Sequence[Optional[int]]] = None,
    meaning: str = "",
    optional: bool = True,
    finite: bool = True,
):
    """A ``torch.Tensor`` of ``shape`` (``None`` entries match any size) with finite values.

    ``meaning`` describes the expected dims in the message, e.g. ``"(batch, channels, h, w)"``.
    """
    import torch

    if value is None and optional:
        return None
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor{' or None' if optional else ''}, got {type(value).__name__}")
    if shape is not None:
        actual = tuple(value.shape)
        if len(actual) != len(shape) or any(e is not None and e != a for e, a in zip(shape, actual)):
            wanted = "(" + ", ".join("*" if e is None else str(e) for e in shape) + ")"
            raise ValueError(f"{name} must have shape {wanted}{' ' + meaning if meaning else ''}, got {actual}")
    has_values = value.device.type != "meta"  # a meta tensor (FLOP counting) has a shape only
    if finite and has_values and (value.is_floating_point() or value.is_complex()) and not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name} holds NaN or infinite values")
    return value


def check_prompt(value: Any, name: str, optional: bool = True):
    """A string or a non-empty list/tuple of strings; returns it (tuples as lists)."""
    if value is None and optional:
        return None
    valid = f"a string or a non-empty list of strings{' or None' if optional else ''}"
    if isinstance(value, str):
        return value
    if not isinstance(value, (list, tuple)) or not all(isinstance(p, str) for p in value):
        raise TypeError(f"{name} must be {valid}, got {value!r}")
    if not value:
        raise ValueError(f"{name} must be {valid}, got an empty list")
    return list(value)


def check_prompt_batch(value: Any, name: str, batch: int, reference: str = "prompt"):
    """A prompt-like argument matching ``batch`` prompts: one string (for every prompt) or ``batch`` strings.

    Returns a string or a list (tuples become lists; a list of one for one prompt becomes its string).
    """
    value = check_prompt(value, name)
    if value is None or isinstance(value, str):
        return value
    if len(value) != batch:
        raise ValueError(
            f"{name} has {len(value)} entries but {reference} has {batch}; give one per prompt or a single string"
        )
    return value if batch > 1 else value[0]


def check_generator(value: Any, name: str, count: int):
    """``None``, a ``torch.Generator``, or a list of ``count`` generators (one per image)."""
    import torch

    if value is None or isinstance(value, torch.Generator):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(g, torch.Generator) for g in value):
        if len(value) != count:
            raise ValueError(f"{name} is a list of {len(value)}; give one per image ({count}) or a single one")
        return list(value)
    raise TypeError(f"{name} must be a torch.Generator, a list of {count} generators or None, got {value!r}")


def check_layer_spec(value: Any, name: str):
    """Layer ids as a string (``"d6-d23"``) or a list of strings; ``None`` is an error naming ``name``."""
    if value is None:
        raise ValueError(f"{name} must be layer ids such as 'd6-d23', 'm0' or a list of them, got None")
    if isinstance(value, str):
        return value
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{name} must be layer ids such as 'd6-d23', 'm0' or a list of them, got {value!r}")
    return value
