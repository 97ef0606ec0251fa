"""The onnxruntime internals sensq builds with are checked at import: present in the installed version, and a
missing one is a one-line SensqError naming the supported range."""
from __future__ import annotations

import onnxruntime
import pytest
from onnxruntime.quantization import qdq_quantizer

from sensq import ort_compat
from sensq.errors import SensqError


def test_installed_onnxruntime_has_every_internal_and_is_in_the_pinned_range():
    from packaging.version import Version
    import tomllib
    from pathlib import Path

    assert ort_compat.missing_internals() == []
    pins = [d for d in tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["dependencies"]
            if d.startswith("onnxruntime")]
    assert pins == ["onnxruntime" + ",".join(ort_compat.SUPPORTED)]  # one range, said in both places
    v = Version(onnxruntime.__version__)
    assert Version("1.20") <= v < Version("1.33")


def test_a_moved_internal_is_a_one_line_error_naming_the_range(monkeypatch):
    monkeypatch.delattr(qdq_quantizer, "find_by_name")
    with pytest.raises(SensqError) as e:
        ort_compat.check_onnxruntime()
    text = str(e.value)
    assert "onnxruntime.quantization.qdq_quantizer.find_by_name" in text and ">=1.20,<1.33" in text
    assert "\n" not in text
