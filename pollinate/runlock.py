"""One writer per run folder: an OS lock on ``<run folder>/.lock``.

Two processes writing the same run folder (two servers started by mistake, or a server and a
simulation with the same ``run.output``) would interleave checkpoints and history. Whoever
writes a run folder holds :class:`RunLock` on it for as long as it writes::

    with RunLock(cfg.output_dir):
        ...  # write history.json, checkpoints, server.sqlite

The lock is ``fcntl.flock`` (``msvcrt.locking`` on Windows) on the file ``.lock`` in the
folder, which holds the holder's process id. The OS drops the lock when the holder exits,
even on ``kill -9``, so a stale file never blocks anyone: only a live holder does. A second
holder is refused at once with :class:`RunFolderLocked`, naming the holder's pid.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import TracebackType

from pollinate.errors import ConfigError

LOCK_NAME = ".lock"

__all__ = ["LOCK_NAME", "RunFolderLocked", "RunLock"]


class RunFolderLocked(ConfigError):
    """Another live process is writing this run folder; ``pid`` is its process id (or None)."""

    def __init__(self, message: str, pid: int | None) -> None:
        super().__init__(message)
        self.pid = pid


class RunLock:
    """An exclusive, non-blocking lock on a run folder (created if missing); a context manager.

    ``acquire`` raises :class:`RunFolderLocked` at once if another process (or another
    ``RunLock`` in this one) holds the folder. Not re-entrant.
    """

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> RunLock:
        if self._fd is not None:
            raise RuntimeError(f"{self.path} is already held by this RunLock")
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if not _try_lock(fd):
                pid = _read_pid(fd)
                who = f"process {pid}" if pid is not None else "another process"
                raise RunFolderLocked(
                    f"the run folder {self.folder} is in use by {who} (lock file {self.path}): "
                    "stop that process first, or give this run another run.output folder",
                    pid,
                )
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, f"{os.getpid()}\n".encode())
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def release(self) -> None:
        """Give the folder back (idempotent). The lock file stays: removing it would race with
        a process that just opened it."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)
            _unlock(fd)
        finally:
            os.close(fd)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def _read_pid(fd: int) -> int | None:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 32).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


if sys.platform == "win32":  # pragma: no cover - exercised on Windows only
    import msvcrt

    _FAR = 1 << 30  # lock a byte past the pid, so that others can still read it

    def _try_lock(fd: int) -> bool:
        os.lseek(fd, _FAR, os.SEEK_SET)
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True

    def _unlock(fd: int) -> None:
        os.lseek(fd, _FAR, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)

else:
    import fcntl

    def _try_lock(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def _unlock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)
