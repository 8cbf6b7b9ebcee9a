"""Lazy public names for a package: each is imported from its module on first use, so importing the
package (and the ``dualguide`` command) stays fast."""

from __future__ import annotations

import importlib
from typing import Any, Callable, Dict


def lazy_exports(package: str, exports: Dict[str, str]) -> Callable[[str], Any]:
    """The module ``__getattr__`` of ``package``, whose public ``name`` lives in its submodule ``exports[name]``."""
    module_globals = importlib.import_module(package).__dict__

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{exports[name]}", package), name)
        module_globals[name] = value
        return value

    return __getattr__
