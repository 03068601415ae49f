"""User-facing errors. Each message names the problem and the fix; the CLI prints them without a traceback."""

from __future__ import annotations


class CircuitGraphError(ValueError):
    """Base class of errors caused by user input (bad flag, bad file, bad prompt)."""


class ModelLoadError(CircuitGraphError):
    """A model could not be loaded (missing or corrupt file, unknown name, no network)."""


class TaskError(CircuitGraphError):
    """A task dataset could not be built or evaluated (unknown task, bad size, prompt too long)."""
