"""Errors every front end reports the same way: a usage problem in one line, an unexpected error in one line."""

from __future__ import annotations


class UsageError(Exception):
    """A problem with the settings or the files they name. The command prints it as one line and exits with
    status 2; the browser explorer shows it in the page."""


def one_line(text: str) -> str:
    """``text`` without line breaks (the first non-empty line, as the rest is usually a traceback or a hint)."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[0] if lines else ""


def describe_error(error: BaseException) -> str:
    """One line for an unexpected error: ``strerror: file`` for OSError, else ``Type: first line``."""
    if isinstance(error, OSError) and error.strerror:
        return f"{error.strerror}: {error.filename}" if error.filename else error.strerror
    text = one_line(str(error))
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
