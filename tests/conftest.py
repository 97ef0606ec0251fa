"""Shared test fixtures. Real assets are read in place from SENSQ_DATA (default ../shared/data next to the repo)."""
from __future__ import annotations

import os
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
def coco_dir(data_dir) -> Path:
    return _need("coco")


@pytest.fixture(scope="session")
def imagenet_dir(data_dir) -> Path:
    return _need("imagenet")
