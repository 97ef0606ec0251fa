"""Declarative search spaces: what a mixed-precision search may vary. One YAML file per space.

A space turns an Optuna trial plus the sensitivity ranking into a concrete PrecisionPlan. Knob types:
  group_toggles   one boolean (Optuna categorical [False, True]) per group among the top_k most sensitive: True
                  keeps the group float. Booleans, not thresholded floats, so distinct parameters are distinct plans.
  categorical     Optuna categorical over `choices` (plan field of the same name: method, per_channel, ...)
  percentile      float in [low, high] sampled log-uniformly on the tail 100 - p (only when `when` holds)
  group_method    per-group range-method override for the top_k most sensitive INT8 groups
  group_precision one categorical per group among the top_k most sensitive over `choices` (int8 / a16 / fp16 / fp32,
                  sensq/precision.py): the toggle generalised; choices the target cannot run are dropped (restrict)
Add a space by writing a YAML file (see default.yaml) and passing its path, or its name if it lives here.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from sensq.errors import SensqError

HERE = Path(__file__).parent
PLAN_FIELDS = {"method", "per_channel", "activation_type", "target", "overflow_fix", "rounding"}


@dataclass
class SearchSpace:
    name: str
    params: dict
    source: str

    @property
    def top_k(self) -> int:
        spec = self._group_knob()
        return int(spec.get("top_k", 0)) if spec else 0

    def _group_knob(self) -> dict | None:
        return next((s for s in self.params.values() if s.get("type") in ("group_toggles", "group_precision")), None)

    def restrict(self, precisions: tuple[str, ...]) -> list[str]:
        """Drop group precisions the target does not run; returns the dropped ones."""
        dropped = []
        for spec in self.params.values():
            if spec.get("type") == "group_precision":
                dropped += [c for c in spec["choices"] if c not in precisions]
                spec["choices"] = [c for c in spec["choices"] if c in precisions]
        return dropped

    def suggest(self, trial, ranked_groups: list[str]) -> dict:
        """Sample one configuration: {"float_groups": [...], "method": ..., "percentile": ..., ...}."""
        out: dict = {"float_groups": [], "group_methods": {}}
        for key, spec in self.params.items():
            kind = spec.get("type")
            if kind == "group_toggles":
                for g in ranked_groups[: int(spec.get("top_k", 12))]:
                    if trial.suggest_categorical(f"float:{g}", [False, True]):
                        out["float_groups"].append(g)
            elif kind == "group_precision":
                for g in ranked_groups[: int(spec.get("top_k", 12))]:
                    p = trial.suggest_categorical(f"precision:{g}", list(spec["choices"]))
                    out.setdefault("a16_groups", []).extend([g] if p == "a16" else [])
                    out.setdefault("fp16_groups", []).extend([g] if p == "fp16" else [])
                    out["float_groups"].extend([g] if p == "fp32" else [])
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

    def seed_params(self, ranked_groups: list[str], float_groups, defaults: dict | None = None) -> dict:
        """Optuna params of the plan 'the default INT8 model with `float_groups` float' (an int n: the top n).

        `defaults` holds the default plan's values (method, percentile, per_channel, overflow_fix, ...); a knob whose
        default is not among its choices is an error (the seeded 'all-INT8' must be the default model), so is a group
        outside the toggled ones."""
        defaults = defaults or {}
        toggled = self.toggled(ranked_groups)
        wanted = set(toggled[:float_groups] if isinstance(float_groups, int) else float_groups)
        if wanted - set(toggled):
            raise ValueError(f"groups {sorted(wanted - set(toggled))} are not toggled by the search space")
        params = {}
        for key, spec in self.params.items():
            kind = spec.get("type")
            if kind == "group_toggles":
                params.update({f"float:{g}": g in wanted for g in toggled})
            elif kind == "group_precision":
                params.update({f"precision:{g}": "fp32" if g in wanted else "int8" for g in toggled})
            elif kind == "categorical":
                choices = list(spec["choices"])
                if defaults.get(key) not in choices:
                    raise SensqError(f"search space {self.source}: the default {key}={defaults.get(key)!r} is not among "
                                     f"its choices {choices}", f"add {defaults.get(key)!r} to the choices of {key}")
                params[key] = defaults[key]
        for key, spec in self.params.items():
            if spec.get("type") == "percentile" and all(params.get(k) == v for k, v in (spec.get("when") or {}).items()):
                params["percentile_tail"] = 100.0 - float(defaults.get("percentile", 99.99))
        return params

    def toggled(self, ranked_groups: list[str]) -> list[str]:
        """The groups this space toggles: the top_k of the ranking."""
        spec = self._group_knob()
        return list(ranked_groups[: int(spec.get("top_k", 12))]) if spec else []

    def distributions(self, ranked_groups: list[str]) -> dict:
        """Optuna distributions of every parameter this space samples (for trials entered by hand: the warm start)."""
        from optuna.distributions import CategoricalDistribution, FloatDistribution

        out = {}
        for key, spec in self.params.items():
            if spec.get("type") == "group_toggles":
                out.update({f"float:{g}": CategoricalDistribution([False, True]) for g in self.toggled(ranked_groups)})
            elif spec.get("type") == "group_precision":
                out.update({f"precision:{g}": CategoricalDistribution(list(spec["choices"])) for g in self.toggled(ranked_groups)})
            elif spec.get("type") == "categorical":
                out[key] = CategoricalDistribution(list(spec["choices"]))
            elif spec.get("type") == "percentile":
                out["percentile_tail"] = FloatDistribution(100.0 - float(spec["high"]), 100.0 - float(spec["low"]), log=True)
        return out

    def plan(self, ws, groups: dict[str, list[str]], choice: dict):
        """Sampled knobs -> precision plan (float groups added to the base plan's float regions)."""
        float_nodes = [n for g in choice["float_groups"] for n in groups[g]]
        a16_nodes = [n for g in choice.get("a16_groups", []) for n in groups[g]]
        fp16_nodes = [n for g in choice.get("fp16_groups", []) for n in groups[g]]
        overrides = dict(ws.base_plan.tensor_overrides)
        for g, method in choice.get("group_methods", {}).items():
            for n in groups[g]:
                for t in ws.graph.nodes[n].output:
                    overrides[t] = {"method": method}
        changes = {k: choice[k] for k in PLAN_FIELDS if k in choice}
        if "percentile" in choice:
            changes["percentile"] = choice["percentile"]
        plan = ws.base_plan.with_float(float_nodes, a16_nodes, fp16_nodes, tensor_overrides=overrides, **changes)
        plan.notes = list(ws.base_plan.notes) + ([f"float groups: {', '.join(choice['float_groups'])}"]
                                                 if choice["float_groups"] else [])
        if choice.get("a16_groups"):
            plan.notes.append(f"16-bit activation groups: {', '.join(choice['a16_groups'])}")
        if choice.get("fp16_groups"):
            plan.notes.append(f"float16 groups: {', '.join(choice['fp16_groups'])}")
        return plan


def validate(space: dict, source: str) -> SearchSpace:
    if not isinstance(space, dict) or not isinstance(space.get("params"), dict):
        raise SensqError(f"search space {source} has no 'params' mapping", "see search_spaces/default.yaml for the layout")
    known = {"group_toggles", "categorical", "percentile", "group_method", "group_precision"}
    for key, spec in space["params"].items():
        if not isinstance(spec, dict) or spec.get("type") not in known:
            raise SensqError(f"search space {source}: knob {key!r} has unknown type {spec.get('type') if isinstance(spec, dict) else spec!r}",
                             f"use one of: {', '.join(sorted(known))}")
        if spec["type"] == "categorical" and key not in PLAN_FIELDS:
            raise SensqError(f"search space {source}: categorical knob {key!r} is not a plan field", f"use one of: {', '.join(sorted(PLAN_FIELDS))}")
        if spec["type"] == "categorical" and not spec.get("choices"):
            raise SensqError(f"search space {source}: knob {key!r} has no choices", "give a non-empty 'choices' list")
    from sensq.precision import PRECISIONS

    for key, spec in space["params"].items():
        bad = [c for c in spec.get("choices") or [] if c not in PRECISIONS] if spec["type"] == "group_precision" else []
        if spec["type"] == "group_precision" and (bad or "int8" not in (spec.get("choices") or [])):
            raise SensqError(f"search space {source}: group precisions {bad or spec.get('choices')} of {key!r} are not valid",
                             f"choose among {', '.join(PRECISIONS)}, int8 included (the all-INT8 seed)")
    if sum(s["type"] in ("group_toggles", "group_precision") for s in space["params"].values()) > 1:
        raise SensqError(f"search space {source} has more than one group knob", "keep either group_toggles or group_precision")
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
