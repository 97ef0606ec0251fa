"""pyproject's explicit package list against the folders on disk: an editable install finds a missing subpackage
anyway, a wheel (`pip install .`) silently leaves it out and sensq fails at import on the user's machine."""
from __future__ import annotations

import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _config() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_package_folder_is_listed():
    cfg = _config()
    listed = set(cfg["packages"])
    on_disk = set()
    for name, folder in cfg["package-dir"].items():
        root = REPO / folder
        for init in root.rglob("__init__.py"):
            rel = init.parent.relative_to(root)
            on_disk.add(".".join([name, *rel.parts]))
    missing = sorted(on_disk - listed)
    assert not missing, f"folders with __init__.py not in [tool.setuptools] packages (a wheel would lack them): {missing}"
    assert not sorted(listed - on_disk), "packages listed that have no folder"


def test_search_space_files_ship_as_package_data():
    cfg = _config()
    patterns = cfg["package-data"]["sensq.search_spaces"]
    shipped = {p.name for pat in patterns for p in (REPO / "search_spaces").glob(pat)}
    wanted = {p.name for p in (REPO / "search_spaces").iterdir() if p.suffix in (".json", ".yaml")}
    assert wanted and wanted <= shipped
