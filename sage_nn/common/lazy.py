"""Packages whose public names load on first use (PEP 562), so ``import sage_nn`` and the
``sage`` command's help and input checks do not wait for torch and transformers."""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from typing import Any


def lazy_exports(package: str, homes: dict[str, str]) -> tuple[Callable, Callable]:
    """``__getattr__`` and ``__dir__`` for ``package``: each name of ``homes`` (name ->
    module of the package that defines it) is imported from its module when first used;
    a module of the package is imported when named."""

    def __getattr__(name: str) -> Any:
        home = homes.get(name)
        if home is not None:
            return getattr(importlib.import_module(f"{package}.{home}"), name)
        if not name.startswith("_") and importlib.util.find_spec(f"{package}.{name}"):
            return importlib.import_module(f"{package}.{name}")
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(homes)

    __getattr__.homes = homes  # what the package exports, for tests/test_layout.py
    return __getattr__, __dir__
