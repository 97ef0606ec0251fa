"""Locks that hold where fcntl is missing (Windows): filelock takes over, and another process cannot take the lock
meanwhile (before, both locks were silent no-ops without fcntl)."""
from __future__ import annotations

import subprocess
import sys

import pytest

import sensq.locks
from sensq.latency import machine

PROBE = ("import sys, filelock\n"
         "try:\n    filelock.FileLock(sys.argv[1]).acquire(timeout=0.3)\nexcept filelock.Timeout:\n    sys.exit(3)\n")


def _other_process_can_lock(path) -> bool:
    return subprocess.run([sys.executable, "-c", PROBE, str(path)]).returncode == 0


@pytest.fixture
def no_fcntl(monkeypatch):
    monkeypatch.setattr(sensq.locks, "fcntl_module", lambda: None)


def test_file_lock_without_fcntl_excludes_other_processes(tmp_path, no_fcntl):
    path = tmp_path / "study.lock"
    with sensq.locks.file_lock(path):
        assert not _other_process_can_lock(path)
    assert _other_process_can_lock(path)


def test_machine_lock_without_fcntl_excludes_other_processes_and_is_reentrant(tmp_path, no_fcntl):
    path = tmp_path / "latency.lock"
    with machine.evaluation_lock(tmp_path):
        with machine.measurement_lock(tmp_path):  # a timing inside an evaluation: re-entrant, no self-deadlock
            assert not _other_process_can_lock(path)
        assert not _other_process_can_lock(path)
    assert _other_process_can_lock(path)
