"""The default search space and the seeds it gives (issue 8 item 2): every default plan must be expressible, so the
seeded 'all-INT8' is exactly the default model on any CPU and with any base method."""
from __future__ import annotations

import pytest

from sensq.errors import SensqError
from sensq.search_spaces import load_space, validate

RANKED = ["g0", "g1", "g2"]
DEFAULTS = {"method": "default", "per_channel": True, "overflow_fix": "none", "percentile": 99.99}


def test_default_space_expresses_every_overflow_fix():
    space = load_space("default")
    assert set(space.params["overflow_fix"]["choices"]) == {"none", "first_layer", "all"}
    for fix in ("none", "first_layer", "all"):  # VNNI CPUs and tensorrt default to none, others to first_layer
        assert space.seed_params(RANKED, 0, {**DEFAULTS, "overflow_fix": fix})["overflow_fix"] == fix


def test_seed_with_a_percentile_base_method_keeps_the_default_percentile():
    """A seed's percentile is the default plan's, not left for Optuna to sample."""
    params = load_space("default").seed_params(RANKED, 1, {**DEFAULTS, "method": "percentile", "percentile": 99.95})
    assert params["method"] == "percentile"
    assert params["percentile_tail"] == pytest.approx(100.0 - 99.95)
    assert params["float:g0"] is True and params["float:g1"] is False and params["float:g2"] is False
    # with a base method other than percentile the percentile knob is inactive and not part of the seed
    assert "percentile_tail" not in load_space("default").seed_params(RANKED, 1, DEFAULTS)


def test_a_space_that_cannot_express_the_default_plan_is_an_error():
    space = validate({"params": {"overflow_fix": {"type": "categorical", "choices": ["first_layer", "all"]}}}, "my.yaml")
    with pytest.raises(SensqError, match="overflow_fix='none' is not among its choices"):
        space.seed_params(RANKED, 0, DEFAULTS)
