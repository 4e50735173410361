"""One run per output directory: an exclusive flock on OUTPUT_DIR/.dafast.lock.

    with run_lock(Path(recipe.output_dir)):
        ...train, merge, evaluate...

Two runs on one directory would train, checkpoint and clean up the same stages at once. The
lock is the kernel's (flock), so a run killed with -9 releases it with its last file
descriptor; the file itself stays and records the holder (pid, host, start time) for the error
message a second run prints.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path

LOCK_FILE = ".dafast.lock"


class RunLocked(RuntimeError):
    """Another live process holds the run directory."""


def holder(directory: Path) -> dict | None:
    """The recorded holder of `directory`'s lock (it may have exited since), or None."""
    try:
        return json.loads((Path(directory) / LOCK_FILE).read_text())
    except (OSError, ValueError):
        return None


@contextmanager
def run_lock(directory: Path):
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            info = holder(directory) or {}
            raise RunLocked(
                f"{directory} is in use by another run (pid {info.get('pid', '?')} on "
                f"{info.get('host', '?')}, started {info.get('started', '?')}); wait for it to "
                "finish or choose another output_dir") from None
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        yield record
    finally:
        os.close(fd)  # releases the lock
