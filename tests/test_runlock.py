"""Tests for pollinate.runlock: one writer per run folder (real locks, a real second process)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pollinate.errors import ConfigError
from pollinate.runlock import LOCK_NAME, RunFolderLocked, RunLock
from tests.waiting import WAIT

REPO = Path(__file__).resolve().parents[1]

HOLDER = textwrap.dedent(
    """
    import sys
    from pollinate.runlock import RunLock

    with RunLock(sys.argv[1]):
        print("locked", flush=True)
        sys.stdin.read()  # hold until the test closes our stdin (or kills us)
    print("released", flush=True)
    """
)


def holder(folder: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(folder)],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_holder_in_the_same_process_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    with RunLock(folder) as lock:
        assert lock.held and (folder / LOCK_NAME).read_text().strip() == str(os.getpid())
        with pytest.raises(RunFolderLocked) as info:
            RunLock(folder).acquire()
        assert isinstance(info.value, ConfigError)
        assert info.value.pid == os.getpid() and f"process {os.getpid()}" in str(info.value)
        assert str(folder) in str(info.value)
    assert not lock.held
    with RunLock(folder):  # free again once released
        pass


def test_another_process_holding_the_folder_is_named_and_its_exit_frees_it(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "run"
    proc = holder(folder)
    try:
        with pytest.raises(RunFolderLocked, match=f"in use by process {proc.pid} "):
            RunLock(folder).acquire()
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        assert proc.wait(WAIT) == 0
    with RunLock(folder):
        pass


def test_a_killed_holder_leaves_no_stale_lock(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    proc = holder(folder)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(WAIT) == -signal.SIGKILL
    assert (folder / LOCK_NAME).read_text().strip() == str(proc.pid)  # the file stays ...
    with RunLock(folder) as lock:  # ... but the lock went with the process
        assert lock.held
        assert (folder / LOCK_NAME).read_text().strip() == str(os.getpid())


def test_release_is_idempotent_and_acquire_is_not_reentrant(tmp_path: Path) -> None:
    lock = RunLock(tmp_path / "run").acquire()
    with pytest.raises(RuntimeError, match="already held"):
        lock.acquire()
    lock.release()
    lock.release()
