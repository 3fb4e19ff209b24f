"""The toolkit's user-facing errors and the ``gmix`` command's exit codes.

=====  ===========================  ==============================================================================
code   constant                     meaning
=====  ===========================  ==============================================================================
0                                   success
2      ``EXIT_BAD_INPUT``           bad input (:class:`GmixError`, a missing file, ...), a refused checkpoint, a run
                                    directory locked by another writer (:class:`RunLocked`); one line on stderr
3      ``EXIT_DIVERGED``            a non-finite loss stopped the run (:class:`TrainingDiverged`); the last good
                                    checkpoint is kept
74     ``EXIT_WRITE_FAILED``        a checkpoint or the metrics could not be written (disk full, permissions:
                                    :class:`RunWriteError`); the previous checkpoint is intact and loadable
75     ``EXIT_INTERRUPTED``         SIGTERM, SIGINT or SIGUSR1 stopped the run at a step boundary
                                    (:class:`TrainingInterrupted`); its checkpoint is written, ``--resume`` (or the
                                    same ``table1``/``sweep`` command) continues it exactly. 75 is sysexits'
                                    EX_TEMPFAIL, "try again later": schedulers can requeue on it
130    ``EXIT_KILLED``              a second SIGINT stopped at once (or Ctrl-C outside training); the last
                                    checkpoint written is intact
=====  ===========================  ==============================================================================
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "GmixError",
    "CheckpointError",
    "RunLocked",
    "TrainingDiverged",
    "TrainingInterrupted",
    "RunWriteError",
    "USER_ERRORS",
    "EXIT_BAD_INPUT",
    "EXIT_DIVERGED",
    "EXIT_WRITE_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_KILLED",
]

EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3
EXIT_WRITE_FAILED = 74  # sysexits.h EX_IOERR
EXIT_INTERRUPTED = 75  # sysexits.h EX_TEMPFAIL
EXIT_KILLED = 130  # 128 + SIGINT, the shell's convention


class GmixError(ValueError):
    """Bad input: an argument, a file or a directory the toolkit cannot use."""


class CheckpointError(GmixError):
    """A file that is not a readable checkpoint, one of another architecture, or one that would run code."""


class RunLocked(GmixError):
    """Another live process is writing the run directory (its ``.lock`` names the process and host)."""


class TrainingDiverged(RuntimeError):
    """A non-finite loss stopped a training run; the last good checkpoint is kept."""


class RunWriteError(OSError):
    """Writing a run's checkpoint or metrics failed (disk full, permissions); the previous checkpoint is intact.
    The message names the file and the operating system's error."""


class TrainingInterrupted(RuntimeError):
    """A signal (SIGTERM, SIGINT, SIGUSR1) stopped a run after a whole optimizer step; the checkpoint of that step
    is written (when the run has an output directory) and resuming continues it exactly."""

    def __init__(self, signal_name: str, step: int, steps: int, out: Path | None, checkpoint: Path | None) -> None:
        self.signal_name, self.step, self.steps, self.out, self.checkpoint = signal_name, step, steps, out, checkpoint
        saved = f"its checkpoint is {checkpoint}" if checkpoint is not None else "nothing saved (no output directory)"
        super().__init__(f"stopped by {signal_name} after step {step} of {steps}; {saved}")

    def __reduce__(self) -> tuple[type, tuple[str, int, int, Path | None, Path | None]]:
        # pickled whole, e.g. from a sweep's worker process to its parent
        return type(self), (self.signal_name, self.step, self.steps, self.out, self.checkpoint)


# What the CLI reports as one line (exit 2) instead of a traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, IsADirectoryError, NotADirectoryError)
