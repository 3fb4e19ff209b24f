"""The toolkit's user-facing errors. The CLI prints any of them as one line and exits with code 2."""

from __future__ import annotations

__all__ = ["GmixError", "CheckpointError", "TrainingDiverged", "USER_ERRORS"]


class GmixError(ValueError):
    """Bad input: an argument, a file or a directory the toolkit cannot use."""


class CheckpointError(GmixError):
    """A file that is not a readable checkpoint, or one of another architecture."""


class TrainingDiverged(RuntimeError):
    """A non-finite loss stopped a training run; the last good checkpoint is kept."""


# What the CLI reports as one line (exit 2) instead of a traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, IsADirectoryError, NotADirectoryError)
