"""Out-of-memory errors of any torch device, and the smaller backbone calls a step falls back to after one.

CUDA and XPU raise ``torch.OutOfMemoryError`` (``torch.cuda.OutOfMemoryError`` on older torch); MPS and the CPU
allocator raise a plain ``RuntimeError`` whose message says so. Nothing else counts: only these are retried.
"""

from __future__ import annotations

from typing import Tuple, Type

import torch

OUT_OF_MEMORY_TYPES: Tuple[Type[BaseException], ...] = tuple(
    {kind for kind in (getattr(torch, "OutOfMemoryError", None), torch.cuda.OutOfMemoryError, MemoryError) if kind is not None}
)
# RuntimeError messages of allocators without an error type of their own: MPS ("MPS backend out of memory"),
# CUDA outside the caching allocator ("CUDA error: out of memory"), the CPU ("DefaultCPUAllocator: can't allocate memory").
OUT_OF_MEMORY_MESSAGES = ("out of memory", "can't allocate memory")


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is a device (or host) running out of memory."""
    if isinstance(error, OUT_OF_MEMORY_TYPES):
        return True
    return isinstance(error, RuntimeError) and any(text in str(error).lower() for text in OUT_OF_MEMORY_MESSAGES)


def halved_rows(rows: int) -> int:
    """The rows per call after an out-of-memory error in calls of ``rows`` rows: half, rounded up (``rows`` >= 2)."""
    return (rows + 1) // 2


def add_line(error: BaseException, line: str) -> BaseException:
    """``error`` with ``line`` added to what it says (a note from Python 3.11 on, else its message's last line)."""
    if hasattr(error, "add_note"):
        error.add_note(line)
    else:
        error.args = (f"{error.args[0]}\n{line}", *error.args[1:]) if error.args else (line,)
    return error
