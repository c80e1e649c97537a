"""Importing every module of a package: how the technique and family registries and the exporters find a new
file without a list to edit. A module that fails to import raises, so nothing goes missing in silence."""
from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType


def import_package_modules(package: str, skip: tuple[str, ...] = ()) -> list[ModuleType]:
    """Each module of `package` (by name order) but those named in `skip`, imported."""
    path = importlib.import_module(package).__path__
    names = sorted(m.name for m in pkgutil.iter_modules(path) if m.name not in skip)
    return [importlib.import_module(f"{package}.{n}") for n in names]
