"""Reference-counted installation of guidance hooks and attention-processor wrappers, per module.

Any number of sessions (denoisers, threads, nested ``hooks()`` blocks) may ask for the same
hook or wrapper on the same module: the first installs it, the last to leave removes it, in
any order of exit. A wrapper wraps the processor it finds (IP-Adapter, xformers, custom) and,
on removal, puts exactly that processor back. The hooks themselves are stateless: they act
only on calls that carry a state for them (see ``callstate``).
"""

from __future__ import annotations

import threading
import weakref
from contextlib import contextmanager
from typing import Callable, Dict, Iterable, Iterator, List, Tuple

from torch import nn

_lock = threading.RLock()
# module -> {key: [count, installed object]}; the key is the wrapper class or the hook function.
_installed: "weakref.WeakKeyDictionary[nn.Module, Dict[object, list]]" = weakref.WeakKeyDictionary()


def _entries(module: nn.Module) -> Dict[object, list]:
    entries = _installed.get(module)
    if entries is None:
        entries = _installed[module] = {}
    return entries


def _acquire_wrapper(attn: nn.Module, wrapper_type: Callable) -> None:
    entries = _entries(attn)
    entry = entries.get(wrapper_type)
    if entry is None:
        entries[wrapper_type] = [1, _wrap(attn, wrapper_type)]
    else:
        entry[0] += 1
        entry[1] = _ensure_wrapped(attn, wrapper_type, entry[1])


def _release_wrapper(attn: nn.Module, wrapper_type: Callable) -> None:
    entries = _entries(attn)
    entry = entries[wrapper_type]
    entry[0] -= 1
    if entry[0] == 0:
        del entries[wrapper_type]
        if attn.processor is entry[1]:
            attn.set_processor(entry[1].previous)


def _wrap(attn: nn.Module, wrapper_type: Callable):
    wrapper = wrapper_type(attn.processor)
    attn.set_processor(wrapper)
    return wrapper


def _ensure_wrapped(attn: nn.Module, wrapper_type: Callable, wrapper):
    """The installed wrapper; a new one around the current processor if someone replaced it meanwhile."""
    if attn.processor is wrapper:
        return wrapper
    return _wrap(attn, wrapper_type)


@contextmanager
def shared_processor_wrappers(attns: Iterable[nn.Module], wrapper_type: Callable) -> Iterator[None]:
    """Wrap each attention's processor in ``wrapper_type(previous)`` for the block, shared and counted."""
    acquired: List[nn.Module] = []
    try:
        with _lock:
            for attn in attns:
                _acquire_wrapper(attn, wrapper_type)
                acquired.append(attn)
        yield
    finally:
        with _lock:
            for attn in reversed(acquired):
                _release_wrapper(attn, wrapper_type)


def ensure_processor_wrappers(attns: Iterable[nn.Module], wrapper_type: Callable) -> None:
    """Re-wrap, around whatever is there now, any processor replaced since ``shared_processor_wrappers`` began."""
    with _lock:
        for attn in attns:
            entry = _entries(attn).get(wrapper_type)
            if entry is None:
                raise RuntimeError("ensure_processor_wrappers called outside shared_processor_wrappers")
            entry[1] = _ensure_wrapped(attn, wrapper_type, entry[1])


@contextmanager
def shared_pre_hooks(modules: Iterable[nn.Module], hook: Callable) -> Iterator[None]:
    """Register ``hook`` (``with_kwargs=True``) as a forward pre-hook of each module, shared and counted."""
    acquired: List[Tuple[nn.Module, list]] = []
    try:
        with _lock:
            for module in modules:
                entries = _entries(module)
                entry = entries.get(hook)
                if entry is None:
                    entry = entries[hook] = [0, module.register_forward_pre_hook(hook, with_kwargs=True)]
                entry[0] += 1
                acquired.append((module, entry))
        yield
    finally:
        with _lock:
            for module, entry in reversed(acquired):
                entry[0] -= 1
                if entry[0] == 0:
                    del _entries(module)[hook]
                    entry[1].remove()


def installed_count(module: nn.Module) -> int:
    """How many sessions hold hooks or wrappers on ``module`` (0 when none): for tests and diagnostics."""
    with _lock:
        return sum(entry[0] for entry in _installed.get(module, {}).values())
