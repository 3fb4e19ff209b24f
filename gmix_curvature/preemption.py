"""Stopping a training run cleanly on a signal, so a preempted job loses nothing.

While :func:`stop_on_signals` is active, SIGTERM (what schedulers and ``kill`` send), SIGINT (Ctrl-C) and SIGUSR1
(Slurm's ``--signal=USR1@SECONDS`` warning) only *ask* the training loop to stop: it finishes the optimizer step
it is in, writes the checkpoint atomically, flushes the metrics and raises
:class:`~gmix_curvature.errors.TrainingInterrupted` (``gmix`` exits with
:data:`~gmix_curvature.errors.EXIT_INTERRUPTED`, 75). A SIGINT after the first signal stops at once
(``KeyboardInterrupt``; the last checkpoint written stays intact, since checkpoints are replaced atomically).

The handlers are installed only in the main thread (Python delivers signals there; elsewhere this is a no-op) and
the previous ones are restored when the block ends: library code leaves the process's signal handling as it
found it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from types import FrameType

__all__ = ["STOP_SIGNALS", "StopRequest", "stop_on_signals"]

STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class StopRequest:
    """The first stop signal received (``signum``, None while none came); set by the handlers, read by the loop
    at each step boundary."""

    def __init__(self, announce: str = "") -> None:
        self.signum: int | None = None
        self.announce = announce

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second SIGINT: stop now
        if self.signum is None:
            self.signum = signum
            if self.announce:  # os.write: print() could re-enter a stderr write the signal interrupted
                line = (f"{self.announce}{signal.Signals(signum).name}: stopping after this optimizer step "
                        "(checkpoint, then exit); Ctrl-C again stops at once\n")  # fmt: skip
                with contextlib.suppress(OSError):
                    os.write(2, line.encode())


@contextlib.contextmanager
def stop_on_signals(announce: str = "", signals: tuple[signal.Signals, ...] = STOP_SIGNALS) -> Iterator[StopRequest]:
    """Turn ``signals`` into a :class:`StopRequest` for the block; the previous handlers come back afterwards.
    ``announce`` prefixes the one line written to stderr when the first signal arrives (empty: silent).

    >>> import os, signal
    >>> before = signal.getsignal(signal.SIGUSR1)
    >>> with stop_on_signals() as stop:
    ...     os.kill(os.getpid(), signal.SIGUSR1)
    ...     stop.requested, stop.name
    (True, 'SIGUSR1')
    >>> signal.getsignal(signal.SIGUSR1) is before
    True
    """
    stop = StopRequest(announce)
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous: dict[signal.Signals, object] = {}
    try:
        for s in signals:
            previous[s] = signal.signal(s, stop.handle)
        yield stop
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
