"""One writer per run directory: an advisory lock, ``OUT/.lock``, held while a process writes the run.

The lock is ``fcntl.flock`` on ``OUT/.lock`` (non-blocking), and the file says who holds it: ``HOST PID`` (the
format :func:`gmix_curvature.sweep.cell_lock` writes too). The kernel releases a flock when its holder dies, so a
killed run leaves no lock behind; a file still naming a process that no longer runs on this host is taken over
with a message. The one exception, a flock still held after its holder died (a forked child kept the file open),
is broken the same way, by replacing the file, when the named process is gone from this host. A second writer
gets :class:`~gmix_curvature.errors.RunLocked`, one line naming the holder (``gmix`` exits 2).

A process that already holds the lock (e.g. a sweep cell's, then the run inside it) takes it again without
waiting for itself. Over NFS Linux implements flock with the server's byte-range locks, so the lock holds
between machines; Lustre needs its ``flock`` mount option.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from gmix_curvature.errors import RunLocked

__all__ = ["LOCK_NAME", "run_lock", "lock_holder"]

LOCK_NAME = ".lock"


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def lock_holder(path: str | os.PathLike) -> tuple[str | None, int | None]:
    """(host, pid) written in a lock file; (None, None) when it is empty, unreadable or not in that format."""
    try:
        words = Path(path).read_text().split()
    except (OSError, UnicodeDecodeError):
        return None, None
    if len(words) >= 2 and words[1].isdigit():
        return words[0], int(words[1])
    return None, None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


@contextlib.contextmanager
def run_lock(out: str | os.PathLike, *, say: Callable[[str], None] = _say) -> Iterator[Path]:
    """Hold ``OUT/.lock`` for the block (creating ``OUT``); yields the lock file's path.

    Raises :class:`RunLocked` when another live process holds it. ``say`` gets the one-line message of a stale
    lock taken over (default: stderr).

    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> with run_lock(d) as path:
    ...     lock_holder(path)[1] == os.getpid()
    True
    >>> lock_holder(path)  # released: emptied
    (None, None)
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_NAME
    me = (socket.gethostname(), os.getpid())
    for _ in range(5):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            host, pid = lock_holder(path)
            if (host, pid) == me:  # held by this process already (an enclosing lock of the same directory)
                yield path
                return
            if host == me[0] and pid is not None and not _alive(pid):
                say(f"{out}: taking over the lock of process {pid}, which no longer runs on {host}")
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                continue
            who = f"process {pid} on {host}" if pid is not None else "another process"
            raise RunLocked(f"{out} is being written by {who} (lock {path}); wait for it to end or stop it") from None
        if not _same_file(fd, path):  # the file was replaced between open and flock: try the new one
            os.close(fd)
            continue
        host, pid = lock_holder(path)
        if pid is not None and (host, pid) != me and host == me[0] and not _alive(pid):
            say(f"{out}: taking over the lock of process {pid}, which no longer runs on {host}")
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{me[0]} {me[1]}\n".encode(), 0)
            yield path
        finally:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
        return
    raise RunLocked(f"{out}: could not take the lock {path} (it keeps being replaced)")
