"""Several workers on one study: a study-wide lock and values computed once and shared through the study.

    coord = Coordinator(storage, study_name)
    with coord.lock():                       # one worker at a time, on any machine that reaches the storage
        ...
    sens = coord.shared("sensitivity:<key>", compute)   # the first worker computes and publishes, the others read

The lock lives where the study lives, so it covers every worker that can open the study:
- PostgreSQL: a session-level advisory lock (pg_advisory_lock) on a connection of the storage's own engine;
- MySQL: GET_LOCK on such a connection;
- SQLite: a file lock next to the database file (all its workers share that file system).
A worker that dies releases the lock with its connection (or its file descriptor), so a kill never wedges the study.
The lock is re-entrant within a process. Shared values are study user attributes (JSON), read by every worker and by
every report, whichever work directory it is written from.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import threading
import warnings
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger("sensq")

PREFIX = "shared:"


def _lock_key(name: str) -> int:
    """A signed 64-bit key for pg_advisory_lock, stable across processes and machines."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


def database_lock(url: str, name: str, engine=None):
    """An exclusive lock named `name` held in the database at `url` (see the module doc), as a context manager."""
    if url.startswith(("postgresql", "mysql")):
        return _sql_lock(url, name, engine)
    if url.startswith("sqlite"):
        from sqlalchemy.engine import make_url

        from ..locks import file_lock

        db = make_url(url).database
        if db and db != ":memory:" and Path(db).resolve().parent.is_dir():  # else opening the storage reports it
            return file_lock(f"{db}.{hashlib.sha256(name.encode()).hexdigest()[:12]}.lock")
    return contextlib.nullcontext()  # in-memory storage: one process, the caller's RLock suffices


@contextlib.contextmanager
def _sql_lock(url: str, name: str, engine=None):
    import sqlalchemy

    if url.startswith("postgresql"):
        take, release, params = "SELECT pg_advisory_lock(:k)", "SELECT pg_advisory_unlock(:k)", {"k": _lock_key(name)}
    else:  # MySQL lock names are at most 64 characters
        key = hashlib.sha256(name.encode()).hexdigest()[:60]
        take, release, params = "SELECT GET_LOCK(:k, -1)", "SELECT RELEASE_LOCK(:k)", {"k": key}
    own = engine is None
    engine = engine or sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect() as conn:  # the lock belongs to this connection's session
            conn.execute(sqlalchemy.text(take), params)
            conn.commit()
            try:
                yield
            finally:
                conn.execute(sqlalchemy.text(release), params)
                conn.commit()
    finally:
        if own:
            engine.dispose()


def with_driver(url: str) -> str:
    """`postgresql://...` with the PostgreSQL driver that is installed: SQLAlchemy 2.1 defaults to psycopg (3), 2.0 to
    psycopg2, and sensq's `postgres` extra installs psycopg2-binary. URLs naming a driver are kept as they are."""
    import importlib.util

    from ..errors import SensqError

    if not url.startswith("postgresql://"):
        return url
    for module in ("psycopg", "psycopg2"):
        if importlib.util.find_spec(module) is not None:
            return f"postgresql+{module}://" + url[len("postgresql://"):]
    raise SensqError("no PostgreSQL driver is installed", "pip install 'sensq[postgres]' (psycopg2-binary)")


def open_storage(url: str, heartbeat_interval: int | None = None, grace_period: int | None = None):
    """optuna's RDBStorage for `url`, its tables created by one worker at a time (two workers creating the schema of
    an empty PostgreSQL database at once collide on its catalog)."""
    import optuna

    url = with_driver(url)
    with database_lock(url, "sensq:schema"), warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats are "experimental"
        return optuna.storages.RDBStorage(url, heartbeat_interval=heartbeat_interval, grace_period=grace_period)


class Coordinator:
    def __init__(self, storage, study_name: str):
        """`storage`: an optuna RDBStorage (or anything else: then the lock only serializes threads of this process)."""
        self.storage, self.study_name = storage, study_name
        self.url = str(getattr(storage, "url", "") or "")
        self._depth = 0
        self._local = threading.RLock()

    # ---------------------------------------------------------------------------------------------- lock
    @contextlib.contextmanager
    def lock(self, name: str = "study"):
        """Exclusive across every worker of the study for the body (re-entrant within this process)."""
        with self._local:
            if self._depth:
                self._depth += 1
                try:
                    yield
                finally:
                    self._depth -= 1
                return
            with self._acquire(f"sensq:{self.study_name}:{name}"):
                self._depth = 1
                try:
                    yield
                finally:
                    self._depth = 0

    def _acquire(self, name: str):
        return database_lock(self.url, name, getattr(self.storage, "engine", None))

    # ---------------------------------------------------------------------------------------------- shared values
    def _study_id(self) -> int:
        return self.storage.get_study_id_from_name(self.study_name)

    def get(self, key: str) -> Any | None:
        raw = self.storage.get_study_user_attrs(self._study_id()).get(PREFIX + key)
        return None if raw is None else json.loads(raw)

    def put(self, key: str, value: Any) -> None:
        self.storage.set_study_user_attr(self._study_id(), PREFIX + key, json.dumps(value, default=float))

    def shared(self, key: str, compute: Callable[[], Any]) -> tuple[Any, bool]:
        """(value, computed here): the study's value for `key`, computed by exactly one worker (the others wait for
        it under the lock instead of computing it again)."""
        found = self.get(key)
        if found is not None:
            return found, False
        with self.lock():
            found = self.get(key)
            if found is not None:
                return found, False
            value = compute()
            self.put(key, value)
            return value, True
