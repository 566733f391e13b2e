"""Lazy attributes for pefttune's packages (PEP 562): a name is imported from its module on first use.

A package lists ``name -> defining module`` and imports the same names under ``TYPE_CHECKING`` (so type
checkers and IDEs see them); at run time :func:`lazy_attributes` supplies the module-level ``__getattr__``
and ``__dir__``. ``import pefttune.strategies`` then costs almost nothing, and
``from pefttune.strategies import DueT`` (or a config's ``class_path: pefttune.strategies.DueT``) loads only
what ``DueT`` needs.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def lazy_attributes(
    package: str, names: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The ``__getattr__`` and ``__dir__`` of a package whose public names load on first use.

    Args:
        package: The package's ``__name__``.
        names: Each public name -> the module that defines it.

    Returns:
        ``(__getattr__, __dir__)`` to assign at the package's top level.
    """

    def get_attribute(name: str) -> Any:
        module = names.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        setattr(sys.modules[package], name, value)  # later lookups skip __getattr__
        return value

    def list_names() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(names))

    return get_attribute, list_names
