"""A cross-process file lock (fcntl.flock): released by the kernel when the holder exits or is killed, so a crashed
process never leaves a stale lock behind. Works on a shared directory where the file system supports flock (local
disks; NFSv4 emulates it with POSIX locks). A no-op where fcntl is missing (Windows).
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path


@contextlib.contextmanager
def file_lock(path: str | Path, shared: bool = False):
    """Hold an exclusive (or shared) lock on `path` (created if missing; its folder must exist) for the body."""
    try:
        import fcntl
    except ImportError:  # Windows: no cross-process serialization
        yield
        return
    fd = os.open(Path(path), os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
