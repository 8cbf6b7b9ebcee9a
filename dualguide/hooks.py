"""Install and remove hooks and attention processors; removal always runs in ``finally``."""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Callable, Iterable, Iterator, Mapping

from torch import nn


@contextmanager
def replaced_processors(replacements: Mapping[nn.Module, Callable[[object], object]]) -> Iterator[None]:
    """Give each attention module ``factory(previous_processor)``; restore the exact previous ones on exit."""
    previous = {}
    try:
        for attn, factory in replacements.items():
            previous[attn] = attn.processor
            attn.set_processor(factory(attn.processor))
        yield
    finally:
        for attn, processor in previous.items():
            attn.set_processor(processor)


@contextmanager
def forward_pre_hooks(modules: Iterable[nn.Module], hook: Callable) -> Iterator[None]:
    """Register ``hook`` (``with_kwargs=True`` convention) on every module; remove all on exit."""
    with ExitStack() as stack:
        for module in modules:
            stack.callback(module.register_forward_pre_hook(hook, with_kwargs=True).remove)
        yield
