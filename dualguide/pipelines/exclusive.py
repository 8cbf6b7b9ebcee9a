"""One call at a time per scheduler: a diffusers scheduler holds the state of the run it serves (timesteps, step
index), so a second call entering it from another thread would corrupt both runs. It raises at once instead."""

from __future__ import annotations

import functools
import threading
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator

THREAD_FIX = ('pipe = type(pipe)(**{**pipe.components, "scheduler": type(pipe.scheduler).from_config(pipe.scheduler.config)})'
              "  # a light pipeline with its own scheduler, per thread")  # fmt: skip
_in_use: Dict[int, int] = {}  # id(scheduler) -> the thread whose call holds it
_registry = threading.Lock()


@contextmanager
def exclusive_scheduler(scheduler: Any) -> Iterator[None]:
    """Hold ``scheduler`` for one call; RuntimeError naming it and the fix when another call holds it."""
    key = id(scheduler)
    with _registry:
        holder = _in_use.get(key)
        if holder is not None:
            where = "this thread (a call inside a call)" if holder == threading.get_ident() else "another thread"
            raise RuntimeError(
                f"pipe.scheduler ({type(scheduler).__name__} at {key:#x}) is in use by a call from {where}; "
                f"a scheduler serves one run at a time. Give each thread its own: {THREAD_FIX}"
            )
        _in_use[key] = threading.get_ident()
    try:
        yield
    finally:
        with _registry:
            del _in_use[key]


def one_call_per_scheduler(call: Callable) -> Callable:
    """Decorate a pipeline's ``__call__`` so that it holds ``self.scheduler`` for the whole call."""

    @functools.wraps(call)
    def __call__(self, *args, **kwargs):
        with exclusive_scheduler(self.scheduler):
            return call(self, *args, **kwargs)

    return __call__
