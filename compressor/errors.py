"""Errors that reach the user as one clear paragraph and an exit code, never a traceback."""
from __future__ import annotations


class CompressorError(Exception):
    """Base of every error the CLI turns into a message and an exit code."""

    exit_code, title = 2, "error"

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        self.message = message.strip()
        self.hint = hint.strip() if hint else None
        super().__init__(self.render())

    def render(self) -> str:
        return self.message if not self.hint else f"{self.message} {self.hint}"


class RecipeError(CompressorError):
    title = "recipe error"


class ModelLoadError(CompressorError):
    title = "model error"


class DataError(CompressorError):
    title = "data error"


class NotPrunableError(CompressorError):
    title = "not prunable"


class ExportError(CompressorError):
    title = "export error"


class UsageError(CompressorError):
    title = "bad argument"


class TrainingError(CompressorError):
    """Training diverged (NaN/inf loss) or could not continue."""

    exit_code, title = 1, "training stopped"


class ParityError(CompressorError):
    """An export's outputs disagree with the PyTorch model beyond the recipe's tolerance."""

    exit_code, title = 1, "parity check failed"


class GateError(CompressorError):
    """A recipe gate (accuracy, speed, parity) failed; the report is written before this is raised."""

    exit_code, title = 1, "gate failed"


class BackendUnavailable(CompressorError):
    """The runtime, GPU or library needed for a request is not present on this machine."""

    exit_code, title = 3, "backend unavailable"
