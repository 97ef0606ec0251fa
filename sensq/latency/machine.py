"""Which machine measured a latency (host, CPU, ISA flags, threads, runtime version) and one-at-a-time measurement.

Latency is the one quantity that depends on the machine: every measurement carries the id of the machine it was
taken on, and ratios are only ever formed between models timed on the same machine in the same rounds. Several
sensq processes on one machine take `measurement_lock()` (exclusive) around their timing and `evaluation_lock()`
(shared) around their evaluation, so that no other worker's inference runs while one is timing.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import platform
import socket
import threading
from functools import lru_cache
from pathlib import Path

ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "asimddp", "i8mm")


@lru_cache(maxsize=1)
def _cpuinfo() -> tuple[str, tuple[str, ...]]:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return model, ()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "cpu model") and value.strip():
            model = value.strip()
        elif key in ("flags", "features"):
            flags |= set(value.split())
    return model, tuple(f for f in ISA_FLAGS if f in flags)


def has_vnni() -> bool:
    """x86 VNNI (AVX-512 or AVX) present: ONNX Runtime's u8s8 kernels then do not saturate int16 partial sums."""
    return any(f in ("avx512_vnni", "avx_vnni") for f in _cpuinfo()[1])


def machine_info(threads: int | None = None, runtime: str = "onnxruntime") -> dict:
    """Facts about this machine and runtime that a latency depends on, plus when they were read."""
    import onnxruntime

    model, flags = _cpuinfo()
    info = {"host": socket.gethostname(), "cpu_model": model, "isa": list(flags), "cores": os.cpu_count(),
            "threads": threads, "arch": platform.machine(), "runtime": runtime,
            "runtime_version": onnxruntime.__version__ if runtime == "onnxruntime" else None}
    info["machine_id"] = machine_id(info)
    info["date"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    return info


def machine_id(info: dict) -> str:
    """Stable id of (host, CPU, ISA, cores, threads, runtime and its version): equal ids, comparable timings."""
    keys = ("host", "cpu_model", "isa", "cores", "threads", "arch", "runtime", "runtime_version")
    raw = json.dumps({k: info.get(k) for k in keys}, sort_keys=True)
    return hashlib.sha256(raw.encode()).hexdigest()[:12]


def _lock_path(lock_dir) -> Path:
    root = Path(lock_dir or os.environ.get("SENSQ_CACHE", Path.home() / ".cache" / "sensq"))
    root.mkdir(parents=True, exist_ok=True)
    return root / "latency.lock"


class _MachineLock:
    """This process's hold on `<lock_dir>/latency.lock`: exclusive while it times a model, shared while it evaluates.

    flock(2) gives the cross-process semantics: a timing waits until no sensq process on the machine is evaluating
    and keeps new evaluations waiting until it is done; evaluations run side by side. Within a process the hold is
    re-entrant (a second flock on a new file description of the same file would wait for the first, i.e. for
    itself); a timing inside an evaluation converts the shared hold to exclusive and back. Threads of one process
    take it one at a time."""

    def __init__(self):
        self.local = threading.RLock()
        self.file = None
        self.mode = None  # fcntl.LOCK_SH or LOCK_EX while held
        self.depth = 0

    @contextlib.contextmanager
    def hold(self, lock_dir, exclusive: bool):
        from ..locks import fcntl_module

        fcntl = fcntl_module()
        if fcntl is None:  # Windows: filelock's exclusive lock for both kinds (evaluations then take turns)
            with self._exclusive_fallback(lock_dir):
                yield
            return
        want = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        with self.local:
            if self.depth == 0:
                self.file = open(_lock_path(lock_dir), "a+")
                fcntl.flock(self.file, want)
                self.mode, previous = want, None
            elif want == fcntl.LOCK_EX and self.mode == fcntl.LOCK_SH:
                fcntl.flock(self.file, fcntl.LOCK_EX)  # a timing inside an evaluation: wait for the other evaluators
                self.mode, previous = want, fcntl.LOCK_SH
            else:
                previous = None  # already held at least as strongly
            self.depth += 1
            try:
                yield
            finally:
                self.depth -= 1
                if self.depth == 0:
                    fcntl.flock(self.file, fcntl.LOCK_UN)
                    self.file.close()
                    self.file, self.mode = None, None
                elif previous is not None:
                    fcntl.flock(self.file, previous)
                    self.mode = previous

    @contextlib.contextmanager
    def _exclusive_fallback(self, lock_dir):
        from filelock import FileLock

        with self.local:
            if self.depth == 0:
                self.file = FileLock(str(_lock_path(lock_dir)), is_singleton=False)
                self.file.acquire()
            self.depth += 1
            try:
                yield
            finally:
                self.depth -= 1
                if self.depth == 0:
                    self.file.release()
                    self.file = None


_LOCK = _MachineLock()


def measurement_lock(lock_dir: str | Path | None = None):
    """Exclusive hold on this machine for the duration of a timing: no other sensq process times or evaluates
    meanwhile (where fcntl is unavailable, filelock's exclusive lock serves timings and evaluations alike).
    Re-entrant within a process."""
    return _LOCK.hold(lock_dir, exclusive=True)


def evaluation_lock(lock_dir: str | Path | None = None):
    """Shared hold while evaluating: any number of evaluations at once, but none while another process times."""
    return _LOCK.hold(lock_dir, exclusive=False)
