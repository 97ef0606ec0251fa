"""Which machine measured a latency (host, CPU, ISA flags, threads, runtime version) and one-at-a-time measurement.

Latency is the one quantity that depends on the machine: every measurement carries the id of the machine it was
taken on, and ratios are only ever formed between models timed on the same machine in the same rounds. Several
sensq processes on one machine take `measurement_lock()` around their timing so that one's inference does not
slow the other's measurement down.
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


_LOCAL = threading.RLock()
_DEPTH = [0]


@contextlib.contextmanager
def measurement_lock(lock_dir: str | Path | None = None):
    """Exclusive lock on this machine for the duration of a timing (a no-op where fcntl is unavailable).

    Re-entrant within a process: only the outermost holder takes the file lock (a second flock on a new file
    description of the same file would wait for the first, i.e. for itself)."""
    with _LOCAL:
        _DEPTH[0] += 1
        try:
            if _DEPTH[0] > 1:
                yield
                return
            try:
                import fcntl
            except ImportError:  # Windows: no cross-process serialization
                yield
                return
            root = Path(lock_dir or os.environ.get("SENSQ_CACHE", Path.home() / ".cache" / "sensq"))
            root.mkdir(parents=True, exist_ok=True)
            with open(root / "latency.lock", "a+") as f:
                fcntl.flock(f, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(f, fcntl.LOCK_UN)
        finally:
            _DEPTH[0] -= 1
