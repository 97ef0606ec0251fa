"""A cross-process file lock (fcntl.flock): released by the kernel when the holder exits or is killed, so a crashed
process never leaves a stale lock behind. Works on a shared directory where the file system supports flock (local
disks; NFSv4 emulates it with POSIX locks). Where fcntl is missing (Windows) the maintained `filelock` package's
FileLock (msvcrt there) takes over; it has no shared mode, so a shared request is held exclusively: slower when
several processes read at once, never unprotected.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path


def fcntl_module():
    """fcntl, or None where the platform has none (patched in tests to exercise the fallback)."""
    try:
        import fcntl
    except ImportError:
        return None
    return fcntl


@contextlib.contextmanager
def file_lock(path: str | Path, shared: bool = False):
    """Hold an exclusive (or shared) lock on `path` (created if missing; its folder must exist) for the body."""
    fcntl = fcntl_module()
    if fcntl is None:
        from filelock import FileLock

        with FileLock(str(path), is_singleton=False):
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
