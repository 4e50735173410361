"""The temporary directory a merge is assembled in, next to its output, and its clean-up.

    with Staging(out_dir) as staging:  # staging.path: .OUT.tmp-XXXX, owned by this process
        ...write into staging.path...
        staging.publish()              # renamed to out_dir, with the umask's permissions

Each staging directory holds an OWNER file that its merge keeps flocked; the kernel drops the
lock when the process dies, even by kill -9. A later merge into the same place removes every
staging directory whose lock it can take (its merge is gone); one without an OWNER file (made
by a merge killed between mkdtemp and the lock) is removed once it is an hour old.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

OWNER = ".owner"
UNOWNED_STALE_SECONDS = 3600
log = logging.getLogger("dafast.merge")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def remove_stale(out_dir: Path) -> list[Path]:
    """Delete the staging directories of out_dir that no live merge owns; returns them."""
    removed = []
    for tmp in out_dir.parent.glob(f".{out_dir.name}.tmp-*"):
        if not tmp.is_dir():
            continue
        try:
            fd = os.open(tmp / OWNER, os.O_RDONLY)
        except FileNotFoundError:
            try:
                stale = time.time() - tmp.stat().st_mtime > UNOWNED_STALE_SECONDS
            except FileNotFoundError:
                continue
        else:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                stale = True
            except BlockingIOError:
                stale = False  # a merge is writing it now
            finally:
                os.close(fd)
        if stale:
            log.warning("removing %s, left by an interrupted merge", tmp)
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    return removed


class Staging:
    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.path: Path | None = None
        self._fd: int | None = None

    def __enter__(self) -> Staging:
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(self.out_dir)
        self.path = Path(tempfile.mkdtemp(prefix=f".{self.out_dir.name}.tmp-",
                                          dir=self.out_dir.parent))
        self._fd = os.open(self.path / OWNER, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        return self

    def publish(self) -> None:
        """Rename into place, replacing out_dir; mkdtemp's 0700 becomes what the umask allows."""
        (self.path / OWNER).unlink()  # the lock stays held through our descriptor
        self.path.chmod(0o777 & ~_umask())
        if self.out_dir.exists():
            shutil.rmtree(self.out_dir)
        self.path.rename(self.out_dir)

    def __exit__(self, *exc) -> None:
        if self.path is not None and self.path.exists():
            shutil.rmtree(self.path, ignore_errors=True)
        if self._fd is not None:
            os.close(self._fd)
