"""Read a prompt file: ``.txt`` (one prompt per line) or ``.jsonl`` (one JSON object per line).

A JSON line holds ``prompt`` (``""``: an unconditional image) and optionally ``negative``, ``seed`` (the
seed of the line's first image), ``n`` (its number of images) and generate settings by their flag name
(``cfg``, ``tpg-layers`` or ``tpg_layers``, ...). ``null`` means "as on the command line". Blank lines are skipped in both formats.
Every problem is a ``PromptFileError`` whose message starts with ``FILE:LINE:`` (or ``FILE:`` for the file).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Tuple

SEED_MAX = 2**64 - 1
SUFFIXES = (".txt", ".jsonl")
LINE_KEYS = ("prompt", "negative", "seed", "n")  # the keys of a JSON line that are not generate settings


class PromptFileError(ValueError):
    """A prompt file that cannot be used; the message names the file (and the line)."""


@dataclass(frozen=True)
class PromptLine:
    """One prompt of the file: its 1-based line number, text, and what the line sets itself."""

    line: int
    prompt: str
    negative: Optional[str] = None
    seed: Optional[int] = None
    n: Optional[int] = None
    options: Dict[str, object] = field(default_factory=dict)  # setting name (flag dest, e.g. tpg_layers) -> JSON value


def read_prompt_file(path: str, settings: Iterable[str] = ()) -> List[PromptLine]:
    """The prompts of ``path``; ``settings`` are the setting names (flag dests) a JSON line may set."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in SUFFIXES:
        raise PromptFileError(f"{path}: a prompt file must end in .txt (one prompt per line) or .jsonl (one JSON object per line)")
    if os.path.isdir(path):
        raise PromptFileError(f"{path}: is a folder, not a prompt file")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise PromptFileError(f"{path}: no such file") from None
    except OSError as error:
        raise PromptFileError(f"{path}: cannot read it ({error.strerror or error})") from None
    lines = []
    for number, text in _text_lines(path, data):
        if not text.strip():
            continue
        where = f"{path}:{number}"
        lines.append(_json_line(where, number, text, set(settings)) if suffix == ".jsonl" else PromptLine(number, text.strip()))
    if not lines:
        raise PromptFileError(f"{path}: no prompts (the file is empty or holds only blank lines)")
    return lines


def _text_lines(path: str, data: bytes) -> List[Tuple[int, str]]:
    """``(line number, text)`` of each line, decoded as UTF-8 (a leading byte order mark is dropped)."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    result = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise PromptFileError(
                f"{path}:{number}: not UTF-8 text (byte 0x{raw[error.start]:02x} at column {error.start + 1}); save the file as UTF-8"
            ) from None
        result.append((number, text.rstrip("\r")))
    return result


def _json_line(where: str, number: int, text: str, settings: set) -> PromptLine:
    try:
        entry = json.loads(text)
    except ValueError as error:
        message = error.msg if isinstance(error, json.JSONDecodeError) else str(error)
        raise PromptFileError(f"{where}: not valid JSON ({message}); each line must be one object such as {{\"prompt\": \"a cat\"}}") from None
    if not isinstance(entry, dict):
        raise PromptFileError(f"{where}: expected a JSON object such as {{\"prompt\": \"a cat\"}}, got {type(entry).__name__}")
    options = {}
    for key, value in entry.items():
        name = key.replace("-", "_")
        if key in LINE_KEYS:
            continue
        if name not in settings:
            valid = ", ".join(list(LINE_KEYS) + sorted(s.replace("_", "-") for s in settings))
            raise PromptFileError(f"{where}: unknown key {key!r}; valid keys: {valid}")
        if name in options:
            raise PromptFileError(f"{where}: {key!r} is given twice (as {name} and {name.replace('_', '-')})")
        if value is not None:
            options[name] = _setting_value(where, key, value)
    prompt = entry.get("prompt")
    if not isinstance(prompt, str):
        raise PromptFileError(f"{where}: \"prompt\" must be a string (\"\" for an unconditional image), got {json.dumps(prompt)}")
    negative = entry.get("negative")
    if negative is not None and not isinstance(negative, str):
        raise PromptFileError(f"{where}: \"negative\" must be a string or null, got {json.dumps(negative)}")
    seed = _whole(where, "seed", entry.get("seed"), 0, SEED_MAX, "a whole number in 0..2**64-1")
    n = _whole(where, "n", entry.get("n"), 1, None, "a whole number >= 1")
    return PromptLine(number, prompt, negative, seed, n, options)


def _whole(where: str, key: str, value, low: int, high: Optional[int], wanted: str) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        raise PromptFileError(f"{where}: \"{key}\" must be {wanted}, got {json.dumps(value)}")
    return value


def _setting_value(where: str, key: str, value):
    """A setting's JSON value: a number, a string, or a list of numbers (an interval or a size)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str, list)):
        raise PromptFileError(f"{where}: {key!r} must be a number, a string or a list of numbers, got {json.dumps(value)}")
    if isinstance(value, list) and not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        raise PromptFileError(f"{where}: {key!r} must be a list of numbers, got {json.dumps(value)}")
    return value


def option_text(name: str, value) -> str:
    """A setting's JSON value as it would be written on the command line (a list: ``a:b`` interval, ``WxH`` size)."""
    if isinstance(value, list):
        separator = "x" if name == "size" else ":"
        return separator.join(json.dumps(v) for v in value)
    return value if isinstance(value, str) else json.dumps(value)
