"""Lazy package faces (PEP 562): a sub-package's ``__init__`` names what it exports and
from which module, and a name is imported only when it is first used - so importing one
light module (``serve.core.errors`` for ``make``'s model naming) never pulls in the
package's heavy ones (Pillow, NumPy, tritonclient)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_exports(
    package: str, exports: dict[str, list[str]]
) -> tuple[list[str], Callable[[str], Any], Callable[[], list[str]]]:
    """``__all__``, ``__getattr__`` and ``__dir__`` for ``package`` from ``{module:
    [names]}`` (modules relative to the package, or absolute: ``serve.core.errors``)."""
    where = {name: module for module, names in exports.items() for name in names}

    def __getattr__(name: str) -> Any:
        module = where.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        full = (
            module if module.startswith(("serve.", "export.", "train.")) else f"{package}.{module}"
        )
        return getattr(importlib.import_module(full), name)

    def __dir__() -> list[str]:
        return sorted(where)

    return sorted(where), __getattr__, __dir__
