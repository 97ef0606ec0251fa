"""Shared test fixtures. Real assets are read in place from SENSQ_DATA (default ../shared/data next to the repo)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SENSQ_DATA", REPO.parent / "shared" / "data")).resolve()


def _need(*parts: str) -> Path:
    p = DATA.joinpath(*parts)
    if not p.exists():
        if os.environ.get("SENSQ_REQUIRE_DATA"):  # set by .ci/run: CI must not pass by skipping
            pytest.fail(f"shared data not found at {p} (SENSQ_REQUIRE_DATA is set)")
        pytest.skip(f"shared data not found at {p} (set SENSQ_DATA to the shared/data folder)")
    return p


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """One calibration cache per test session, never the user's ~/.cache/sensq."""
    path = tmp_path_factory.mktemp("sensq_cache")
    os.environ["SENSQ_CACHE"] = str(path)
    return path


SYSTEM_TMP = tempfile.gettempdir()  # before the session's own temp folder below replaces it


@pytest.fixture(scope="session", autouse=True)
def isolated_machine_lock(tmp_path_factory):
    """A temp folder of this session's own, for this process and the sensq processes it starts (TMPDIR): a search
    takes its machine-wide latency lock in <tempdir>/sensq-<uid>, so searches run by the tests wait for each other
    (the multi-worker tests still share one lock) but never for a benchmark or search running beside the suite."""
    path = tmp_path_factory.mktemp("tmp")
    old_env, old_dir = os.environ.get("TMPDIR"), tempfile.tempdir
    os.environ["TMPDIR"] = str(path)
    tempfile.tempdir = str(path)
    yield path
    tempfile.tempdir = old_dir
    if old_env is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = old_env


@pytest.fixture(scope="session")
def forkserver():
    """A multiprocessing context whose processes start as fast as forks and as clean as spawns: they are forked from
    one server process, started fresh once per session with sensq already imported (a spawned process imports it
    again, seconds each, every time). Like spawn, a child inherits no lock, file or thread of the test process."""
    import multiprocessing as mp

    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["numpy", "optuna", "pytest", "sensq.search", "sensq.latency", "sensq.quantize",
                                "sensq.evaluators.plugins"])  # what the test modules holding the targets import
    return ctx


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return _need()


@pytest.fixture(scope="session")
def yolov5n(data_dir) -> Path:
    return _need("models", "yolov5n.onnx")


@pytest.fixture(scope="session")
def yolov8n_random(data_dir) -> Path:
    return _need("models", "yolov8n-arch-random.onnx")


@pytest.fixture(scope="session")
def yolox_nano(data_dir) -> Path:
    return _need("models", "yolox_nano.onnx")


@pytest.fixture(scope="session")
def coco_dir(data_dir) -> Path:
    return _need("coco")


@pytest.fixture(scope="session")
def imagenet_dir(data_dir) -> Path:
    return _need("imagenet")


@pytest.fixture(scope="session")
def yolov5n_ws(yolov5n, coco_dir):
    """yolov5n calibrated on every 4th train2017 image (50), shared by the tests that only read it. Tests must not
    change it (build() returns new models; plans are immutable values)."""
    from sensq.config import InputParams, QuantizeConfig
    from sensq.quantize import prepare

    cfg = QuantizeConfig(onnx_model=str(yolov5n), calibration_step=4,
                         inputs=[InputParams(data_list_path=str(coco_dir / "train2017"))])
    return prepare(cfg, progress=False)


@pytest.fixture(scope="session")
def yolov5n_coco_fp32(yolov5n, coco_dir):
    """yolov5n FP32 scored once on all the val images by the default COCO evaluator, shared by the tests that only
    read the result: (evaluator, result, a copy of its detections: a later evaluate() replaces last_detections)."""
    from sensq.evaluators.coco import make_coco_evaluator

    ev = make_coco_evaluator(coco_dir)
    res = ev.evaluate(yolov5n, progress=False)
    return ev, res, ev.last_detections.copy()


# ------------------------------------------------------------------------------------------------ PostgreSQL
# A throw-away PostgreSQL server for the multi-worker tests (real storage, no mocks). .ci/run installs the binaries
# and sets SENSQ_REQUIRE_POSTGRES, which turns "binaries missing" into a failure.

def postgres_bindir() -> Path | None:
    import glob
    import shutil
    import subprocess

    if shutil.which("pg_config"):
        try:
            out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            out = ""
        if out and (Path(out) / "initdb").is_file():
            return Path(out)
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def postgres_server():
    """(url of the server's maintenance database, bindir); the server is stopped and its files removed at the end."""
    import shutil
    import subprocess

    bindir = postgres_bindir()
    if bindir is None:
        reason = "PostgreSQL binaries not found (pg_config --bindir; apt-get install postgresql)"
        if os.environ.get("SENSQ_REQUIRE_POSTGRES"):  # set by .ci/run: CI must not pass by skipping
            pytest.fail(reason + " and SENSQ_REQUIRE_POSTGRES is set")
        pytest.skip(reason)
    root = Path(tempfile.mkdtemp(prefix="sensq-pg-", dir=SYSTEM_TMP))  # not under a 0700 pytest folder
    as_user: list[str] = []
    if os.geteuid() == 0:  # postgres refuses to run as root: run it as the postgres user
        import pwd

        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(root, ignore_errors=True)
            pytest.fail("running as root and there is no 'postgres' user to run the server as")
        os.chown(root, pw.pw_uid, pw.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    data, log = root / "data", root / "server.log"
    port = _free_port()

    def run(*cmd: str) -> None:
        res = subprocess.run([*as_user, *cmd], capture_output=True, text=True, timeout=120)
        if res.returncode != 0:
            pytest.fail(f"{' '.join(cmd[:2])} failed: {res.stderr[-1500:] or res.stdout[-1500:]}")

    run(str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8")
    opts = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
    run(str(bindir / "pg_ctl"), "-D", str(data), "-o", opts, "-l", str(log), "-w", "-t", "60", "start")
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server, request):
    """A fresh, empty database on the session's server for one test."""
    import re

    try:
        import psycopg2
    except ImportError:
        reason = "psycopg2 missing: pip install -e '.[test]'"
        if os.environ.get("SENSQ_REQUIRE_POSTGRES"):
            pytest.fail(reason + " (SENSQ_REQUIRE_POSTGRES is set)")
        pytest.skip(reason)
    name = "t_" + re.sub(r"[^a-z0-9_]", "_", request.node.name.lower())[:40] + f"_{os.getpid()}"
    con = psycopg2.connect(postgres_server)
    con.autocommit = True
    with con.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{name}"')
        cur.execute(f'CREATE DATABASE "{name}"')
    con.close()
    yield postgres_server.rsplit("/", 1)[0] + "/" + name


@pytest.fixture(autouse=True)
def sensq_logger_reset():
    """The CLI points the "sensq" logger at the stderr of its test (then closed) and stops propagation: undo it,
    so a later test's caplog sees sensq's warnings and no handler writes to a closed stream."""
    import logging

    yield
    logger = logging.getLogger("sensq")
    logger.handlers[:] = []
    logger.propagate = True
    logger.setLevel(logging.NOTSET)
