"""Declarative search spaces: what a mixed-precision search may vary. One YAML file per space.

A space turns an Optuna trial plus the sensitivity ranking into a concrete PrecisionPlan. Knob types:
  group_toggles   one toggle per group among the top_k most sensitive: float with prior probability `float_prior`
                  (sampled as a uniform value u in [0, 1), float when u < float_prior, so a search starts near INT8)
  categorical     Optuna categorical over `choices` (plan field of the same name: method, per_channel, ...)
  percentile      float in [low, high] sampled log-uniformly on the tail 100 - p (only when `when` holds)
  group_method    per-group range-method override for the top_k most sensitive INT8 groups
Add a space by writing a YAML file (see default.yaml) and passing its path, or its name if it lives here.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from sensq.errors import SensqError

HERE = Path(__file__).parent
PLAN_FIELDS = {"method", "per_channel", "activation_type", "target", "overflow_fix"}


@dataclass
class SearchSpace:
    name: str
    params: dict
    source: str

    @property
    def top_k(self) -> int:
        return int(self.params.get("float_groups", {}).get("top_k", 0))

    def suggest(self, trial, ranked_groups: list[str]) -> dict:
        """Sample one configuration: {"float_groups": [...], "method": ..., "percentile": ..., ...}."""
        out: dict = {"float_groups": [], "group_methods": {}}
        for key, spec in self.params.items():
            kind = spec.get("type")
            if kind == "group_toggles":
                prior = float(spec.get("float_prior", 0.5))
                for g in ranked_groups[: int(spec.get("top_k", 12))]:
                    if trial.suggest_float(f"float:{g}", 0.0, 1.0) < prior:
                        out["float_groups"].append(g)
            elif kind == "categorical":
                out[key] = trial.suggest_categorical(key, list(spec["choices"]))
        for key, spec in self.params.items():
            kind = spec.get("type")
            if kind == "percentile" and all(out.get(k) == v for k, v in (spec.get("when") or {}).items()):
                low_tail, high_tail = 100.0 - float(spec["high"]), 100.0 - float(spec["low"])
                tail = trial.suggest_float("percentile_tail", low_tail, high_tail, log=True)
                out["percentile"] = round(100.0 - tail, 6)
            elif kind == "group_method":
                int8_groups = [g for g in ranked_groups if g not in out["float_groups"]][: int(spec.get("top_k", 0))]
                for g in int8_groups:
                    m = trial.suggest_categorical(f"method:{g}", ["global"] + list(spec["choices"]))
                    if m != "global":
                        out["group_methods"][g] = m
        return out

    def seed_params(self, ranked_groups: list[str], n_float: int, defaults: dict | None = None) -> dict:
        """Optuna params of the seeded trial 'the default INT8 model with the top n_float groups float'.

        `defaults` holds the default plan's values (method, per_channel, ...); a knob whose default is not among its
        choices takes the first choice."""
        defaults = defaults or {}
        params = {}
        for key, spec in self.params.items():
            kind = spec.get("type")
            if kind == "group_toggles":
                for i, g in enumerate(ranked_groups[: int(spec.get("top_k", 12))]):
                    params[f"float:{g}"] = 0.0 if i < n_float else 1.0
            elif kind == "categorical":
                choices = list(spec["choices"])
                params[key] = defaults[key] if defaults.get(key) in choices else choices[0]
        return params


def validate(space: dict, source: str) -> SearchSpace:
    if not isinstance(space, dict) or not isinstance(space.get("params"), dict):
        raise SensqError(f"search space {source} has no 'params' mapping", "see search_spaces/default.yaml for the layout")
    known = {"group_toggles", "categorical", "percentile", "group_method"}
    for key, spec in space["params"].items():
        if not isinstance(spec, dict) or spec.get("type") not in known:
            raise SensqError(f"search space {source}: knob {key!r} has unknown type {spec.get('type') if isinstance(spec, dict) else spec!r}",
                             f"use one of: {', '.join(sorted(known))}")
        if spec["type"] == "categorical" and key not in PLAN_FIELDS:
            raise SensqError(f"search space {source}: categorical knob {key!r} is not a plan field", f"use one of: {', '.join(sorted(PLAN_FIELDS))}")
        if spec["type"] == "categorical" and not spec.get("choices"):
            raise SensqError(f"search space {source}: knob {key!r} has no choices", "give a non-empty 'choices' list")
    if "method" in space["params"]:
        from sensq.ranges import check_method

        for m in space["params"]["method"]["choices"]:
            check_method(m)
    return SearchSpace(space.get("name", Path(source).stem), space["params"], source)


def available() -> list[str]:
    return sorted(p.stem for p in HERE.glob("*.yaml"))


def load_space(name_or_path: str = "default") -> SearchSpace:
    p = Path(name_or_path)
    if not p.suffix:
        p = HERE / f"{name_or_path}.yaml"
    if not p.is_file():
        raise SensqError(f"search space {name_or_path!r} not found", f"give a YAML path or one of: {', '.join(available())}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise SensqError(f"bad YAML in search space {p}: {str(e).splitlines()[0]}", "fix the YAML syntax") from e
    return validate(data, str(p))
