"""Typed errors raised by the library; the CLI turns each into one `Error:` line and an exit code."""
from __future__ import annotations

EXIT_OK = 0
EXIT_GATE_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 3
EXIT_INTERRUPTED = 130


class SlimctlError(Exception):
    """Base of every error a user can cause; `exit_code` says how the CLI exits."""

    exit_code = EXIT_BAD_INPUT


class UsageError(SlimctlError):
    """Options that make no sense together, or a value out of range."""


class ModelLoadError(SlimctlError):
    """The model could not be found, read, or is of a kind slimctl refuses (pickle, remote code)."""


class RecipeError(SlimctlError):
    """The recipe file is malformed, has unknown keys, or its steps contradict each other."""


class DataError(SlimctlError):
    """Eval or calibration data is missing, empty, binary or of the wrong schema."""


class OutputError(SlimctlError):
    """The output path exists, is not writable, or the disk filled while writing."""


class DeviceError(SlimctlError):
    """The requested device is not present, or ran out of memory."""


class UnsupportedError(SlimctlError):
    """A technique cannot apply to this model, layer shape or device."""


class Interrupted(SlimctlError):
    """Ctrl-C during work whose finished parts are kept (a search's cache): the message says where."""

    exit_code = EXIT_INTERRUPTED


class GateFailed(SlimctlError):
    """The slimmed model missed one or more gates; the report is still written."""

    exit_code = EXIT_GATE_FAILED

    def __init__(self, failed: list[str]):
        self.failed = failed
        super().__init__("gate failed: " + "; ".join(failed))
