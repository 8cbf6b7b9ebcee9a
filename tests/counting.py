"""Counting a module's forward calls in tests: the batch rows of each call, with the hook removed on exit."""

from contextlib import contextmanager
from typing import Iterator, List

import torch


@contextmanager
def rows_seen(module: torch.nn.Module) -> Iterator[List[int]]:
    """Yield a list that gets the batch size of the first tensor input (positional or keyword) of every forward call
    of ``module`` inside the block."""
    rows: List[int] = []

    def record(_module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        first = next(value for value in (*args, *kwargs.values()) if isinstance(value, torch.Tensor))
        rows.append(first.shape[0])

    handle = module.register_forward_pre_hook(record, with_kwargs=True)
    try:
        yield rows
    finally:
        handle.remove()
