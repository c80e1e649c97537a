"""slimctl: slim Hugging Face models and prove the result by measurement.

The library API (see slimctl/api.py): slim(), evaluate(), bench(), run(). Importing slimctl does not
import torch; each function does when it is called."""
from ._version import __version__  # noqa: F401


def __getattr__(name: str):
    if name in ("slim", "run"):
        from . import api

        return getattr(api, name)
    if name in ("evaluate", "bench"):  # subpackages that are callable as the API functions (see _callable.py)
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'slimctl' has no attribute {name!r}")
