"""Errors that reach the user as one clear paragraph and an exit code, never a traceback."""
from __future__ import annotations


class CompressorError(Exception):
    """Base of every error the CLI turns into a message and an exit code (title: the message's prefix)."""

    exit_code, title = 2, "error"

    def __init_subclass__(cls, title: str = "", exit_code: int = 0, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        cls.title, cls.exit_code = title or cls.title, exit_code or cls.exit_code

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        self.message = message.strip()
        self.hint = hint.strip() if hint else None
        super().__init__(self.render())

    def render(self) -> str:
        return self.message if not self.hint else f"{self.message} {self.hint}"


class RecipeError(CompressorError, title="recipe error"):
    """A recipe (file, value or --set) that does not load or validate."""


class ModelLoadError(CompressorError, title="model error"):
    """A model reference or checkpoint that cannot be loaded safely."""


class DataError(CompressorError, title="data error"):
    """A data set that is missing, unreadable or does not fit the model."""


class NotPrunableError(CompressorError, title="not prunable"):
    """A model (or part of it) that structured pruning cannot change safely."""


class ExportError(CompressorError, title="export error"):
    """An export (ONNX, TensorRT) that fails."""


class UsageError(CompressorError, title="bad argument"):
    """A command-line argument that is wrong or contradicts another."""


class TrainingError(CompressorError, title="training stopped", exit_code=1):
    """Training diverged (NaN/inf loss) or could not continue."""


class ParityError(CompressorError, title="parity check failed", exit_code=1):
    """An export's outputs disagree with the PyTorch model beyond the recipe's tolerance."""


class GateError(CompressorError, title="gate failed", exit_code=1):
    """A recipe gate (accuracy, speed, parity) failed; the report is written before this is raised."""


class BackendUnavailable(CompressorError, title="backend unavailable", exit_code=3):
    """The runtime, GPU or library needed for a request is not present on this machine."""
