"""`slimctl.evaluate(...)` and `slimctl.bench(...)` are API functions and also the names of subpackages;
once a subpackage is imported, Python binds its name on `slimctl` to the module. Making those two
modules callable (forwarding to a function of their own) keeps `slimctl.evaluate(...)` working either way."""
from __future__ import annotations

import sys
import types


def make_callable(module_name: str, function_name: str) -> None:
    class _CallableModule(types.ModuleType):
        def __call__(self, *args, **kwargs):
            return getattr(self, function_name)(*args, **kwargs)

    sys.modules[module_name].__class__ = _CallableModule
