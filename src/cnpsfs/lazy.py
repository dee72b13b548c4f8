"""Package faces whose names load their module on first use (PEP 562), written once.

A package's ``__init__`` lists which submodule defines each public name and delegates
its module ``__getattr__`` here, so importing the package (for one small name, as the
CLI's option declarations do) does not import every module behind its face. A name is
looked up once: after that it is an ordinary attribute of the package.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Mapping
from typing import Any


def load(package: str, where: Mapping[str, str], name: str) -> Any:
    """The value of *package*'s public *name*, from the submodule *where* names for it."""
    module = where.get(name)
    if module is None:
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{package}.{module}"), name)
    setattr(sys.modules[package], name, value)
    return value
