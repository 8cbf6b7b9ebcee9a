"""Reference-counted installation of guidance hooks and attention-processor wrappers, per module.

Any number of sessions (denoisers, threads, nested ``hooks()`` blocks) may ask for the same
hook or wrapper on the same module: the first installs it, the last to leave removes it, in
any order of exit. A wrapper wraps the processor it finds (IP-Adapter, xformers, custom) and,
on removal, puts exactly that processor back. The hooks themselves are stateless: they act
only on calls that carry a state for them (see ``callstate``). ``guidance_hooks`` installs the
set guided calls use (``HookSites``: the family's pre-hooks and processor wrappers) for a block and gives
its ``Installation``, whose ``ensure_wrappers`` a caller runs before each UNet call;
``hold_guidance_hooks`` takes a share that is never given back (a compiled UNet's resident hooks).
"""

from __future__ import annotations

import threading
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

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


def _drop(module: nn.Module, key: Callable) -> Optional[object]:
    """Count one share of ``key`` on ``module`` off: the installed object when that was the last share, else None."""
    entries = _entries(module)
    entry = entries[key]
    entry[0] -= 1
    if entry[0]:
        return None
    del entries[key]
    return entry[1]


def _release_wrapper(attn: nn.Module, wrapper_type: Callable) -> None:
    wrapper = _drop(attn, wrapper_type)
    if wrapper is not None and attn.processor is wrapper:
        attn.set_processor(wrapper.previous)


def _wrap(attn: nn.Module, wrapper_type: Callable):
    wrapper = wrapper_type(attn.processor)
    attn.set_processor(wrapper)
    return wrapper


def _ensure_wrapped(attn: nn.Module, wrapper_type: Callable, wrapper):
    """The installed wrapper; a new one around the current processor if someone replaced it meanwhile."""
    if attn.processor is wrapper:
        return wrapper
    return _wrap(attn, wrapper_type)


def _acquire_handle(module: nn.Module, hook: Callable, register: Callable[[], object]) -> None:
    """One share of ``hook`` on ``module``: the first share registers it (``register()`` gives its handle)."""
    entries = _entries(module)
    entry = entries.get(hook)
    if entry is None:
        entry = entries[hook] = [0, register()]
    entry[0] += 1


def _acquire_pre_hook(module: nn.Module, hook: Callable) -> None:
    _acquire_handle(module, hook, lambda: module.register_forward_pre_hook(hook, with_kwargs=True))


def _acquire_post_hook(module: nn.Module, hook: Callable) -> None:
    _acquire_handle(module, hook, lambda: module.register_forward_hook(hook))


def _release_hook(module: nn.Module, hook: Callable) -> None:
    handle = _drop(module, hook)
    if handle is not None:
        handle.remove()


@dataclass(frozen=True)
class HookSites:
    """What a family hooks for a set of guidance terms: forward pre-hooks ``(module, hook)`` (with kwargs),
    processor wrappers ``(attention, wrapper type)`` and forward hooks ``(module, hook)``. A family adapter says
    which (``ModelFamily.hook_plan``); the denoiser adds those of shared prefix rows."""

    pre_hooks: Tuple[Tuple[nn.Module, Callable], ...] = ()
    wrappers: Tuple[Tuple[nn.Module, Callable], ...] = ()
    post_hooks: Tuple[Tuple[nn.Module, Callable], ...] = ()


# One installation: (module, hook function or wrapper type, acquire, release).
Part = Tuple[nn.Module, Callable, Callable, Callable]


def _guidance_parts(sites: HookSites) -> List[Part]:
    return (
        [(module, hook, _acquire_pre_hook, _release_hook) for module, hook in sites.pre_hooks]
        + [(attn, wrapper_type, _acquire_wrapper, _release_wrapper) for attn, wrapper_type in sites.wrappers]
        + [(module, hook, _acquire_post_hook, _release_hook) for module, hook in sites.post_hooks]
    )


class Installation:
    """The processor wrappers one ``guidance_hooks`` block holds, as last seen in place."""

    def __init__(self, wrapped: Sequence[Tuple[nn.Module, Callable]]) -> None:
        self._wrapped = list(wrapped)  # (attention, wrapper type)
        self._seen = self._installed_wrappers()

    def _installed_wrappers(self) -> List[Tuple[nn.Module, object]]:
        return [(attn, _entries(attn)[wrapper_type][1]) for attn, wrapper_type in self._wrapped]

    def ensure_wrappers(self) -> None:
        """Re-wrap, around whatever is there now, any processor replaced since the block began
        (``set_attn_processor``, ``load_ip_adapter``). When none was, this is one pass, without the lock."""
        if not [attn for attn, wrapper in self._seen if attn.processor is not wrapper]:
            return
        with _lock:
            for attn, wrapper_type in self._wrapped:
                entry = _entries(attn)[wrapper_type]
                entry[1] = _ensure_wrapped(attn, wrapper_type, entry[1])
            self._seen = self._installed_wrappers()


@contextmanager
def guidance_hooks(sites: HookSites) -> Iterator[Installation]:
    """The pre-hooks (``with_kwargs=True``), processor wrappers and forward hooks of ``sites`` for the ``with`` block, shared and
    counted; released in reverse order on exit."""
    acquired: List[Part] = []
    try:
        with _lock:
            for part in _guidance_parts(sites):
                module, key, acquire, _ = part
                acquire(module, key)
                acquired.append(part)
            installation = Installation([(module, key) for module, key, acquire, _ in acquired if acquire is _acquire_wrapper])
        yield installation
    finally:
        with _lock:
            for module, key, _, release in reversed(acquired):
                release(module, key)


def hold_guidance_hooks(sites: HookSites) -> None:
    """Take a share of the same hooks that is never given back: they stay installed (a compiled UNet's)."""
    with _lock:
        for module, key, acquire, _ in _guidance_parts(sites):
            acquire(module, key)


def installed_count(module: nn.Module) -> int:
    """How many sessions hold hooks or wrappers on ``module`` (0 when none): for tests and diagnostics."""
    with _lock:
        return sum(entry[0] for entry in _installed.get(module, {}).values())
