"""A user command per model (board tools, trtexec, ...) that prints the latency; the number is read from its stdout."""
from __future__ import annotations

import json
import math
import os
import re
import shlex
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import onnx

from ..errors import SensqError
from .base import LatencyResult, ModelLike, construct, load_model, register_latency_backend


_NUM = r"([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)"
_KEY_VALUE = re.compile(r"^\s*latency_ms\s*[=:]\s*" + _NUM, re.MULTILINE)
# trtexec prints several "median = X ms" lines (Latency, H2D, GPU Compute, D2H ...); GPU Compute Time is the model's.
_TRT_GPU_MEDIAN = re.compile(r"GPU Compute Time:.*?\bmedian\s*=\s*" + _NUM + r"\s*ms\b")
_MEDIAN = re.compile(r"\bmedian\s*=\s*" + _NUM + r"\s*ms\b")
_ANY_MS = re.compile(_NUM + r"\s*ms\b")


def _json_latency(stdout: str) -> float | None:
    candidates = [stdout.strip()] + [line.strip() for line in reversed(stdout.splitlines()) if line.strip().startswith("{")]
    for text in candidates:
        try:
            obj = json.loads(text)
        except ValueError:
            continue
        if isinstance(obj, dict) and isinstance(obj.get("latency_ms"), (int, float)) and not isinstance(obj["latency_ms"], bool):
            return float(obj["latency_ms"])
    return None


def _last_number(regex: re.Pattern, text: str) -> float | None:
    matches = list(regex.finditer(text))
    if not matches:
        return None
    m = matches[-1]
    if "ms" in regex.groupindex:
        return float(m.group("ms"))
    if regex.groups:
        return float(m.group(1))
    number = re.search(_NUM, m.group(0))  # pattern without a group: first number inside the last match
    return float(number.group(1)) if number else None


def parse_latency_ms(stdout: str, pattern: str | re.Pattern | None = None) -> float | None:
    """Latency in ms printed by a command, or None.

    With `pattern`: its last match (named group `ms`, else group 1, else the first number in the match); nothing else
    is tried, so a custom pattern never silently falls back to another number. Without: in order of preference,
    a JSON object with key latency_ms, a line `latency_ms=X`, trtexec's `GPU Compute Time: ... median = X ms`,
    the last `median = X ms`, the last `<number> ms`."""
    if pattern is not None:
        return _last_number(re.compile(pattern) if isinstance(pattern, str) else pattern, stdout)
    value = _json_latency(stdout)
    if value is not None:
        return value
    for regex in (_KEY_VALUE, _TRT_GPU_MEDIAN, _MEDIAN, _ANY_MS):
        value = _last_number(regex, stdout)
        if value is not None:
            return value
    return None


def _short(text: str, limit: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _tail(text: str, lines: int = 3) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:])


@register_latency_backend("cmd")
class CommandLatency:
    """Runs a shell command per model and reads its latency from stdout (see parse_latency_ms).

    `{model}` in the command is replaced by the (shell-quoted) model path, else the path is appended as the last
    argument. A ModelProto is written to a temporary .onnx first. With repeats > 1 the command runs that many
    times; the value is the median and the spread the interquartile range (None for a single run). The unit is
    ms unless `unit=` names the command's own unit (with a `pattern=` that captures that number)."""

    name = "cmd"
    deterministic = False

    def __init__(self, command: str, timeout: float = 600.0, pattern: str | None = None, repeats: int = 1, unit: str = "ms"):
        command = command.strip()
        if len(command) >= 2 and command[0] == command[-1] and command[0] in "\"'":
            command = command[1:-1].strip()  # cmd:"..." form
        if not command:
            raise SensqError("the cmd latency backend needs a command",
                             "write --latency 'cmd:mytool --model {model}' (the tool prints e.g. 'latency: 12.3 ms')")
        if repeats < 1 or timeout <= 0:
            raise SensqError("cmd latency options out of range", "use repeats >= 1 and timeout > 0 (seconds)")
        try:
            self.pattern = re.compile(pattern) if pattern else None
        except re.error as e:
            raise SensqError(f"latency pattern {pattern!r} is not a valid regular expression: {e}",
                             "give a Python regex whose group 1 (or group named ms) captures the milliseconds") from e
        self.command, self.timeout, self.repeats, self.unit = command, float(timeout), int(repeats), str(unit)

    @classmethod
    def from_spec(cls, arg: str, **opts: Any) -> "CommandLatency":
        return construct(cls, arg, **opts)

    def command_for(self, model_path: str | Path) -> str:
        quoted = shlex.quote(str(model_path))
        # str.replace, not str.format: commands often contain braces (JSON, awk) that format() would choke on
        return self.command.replace("{model}", quoted) if "{model}" in self.command else f"{self.command} {quoted}"

    def _run_once(self, command: str) -> float:
        expected = "a line like 'latency: 12.3 ms', 'latency_ms=12.3' or JSON {\"latency_ms\": 12.3}"
        proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)  # own process group, so a timeout kills the whole pipeline
        try:
            out, err = proc.communicate(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                proc.kill()
            proc.communicate()
            raise SensqError(f"latency command timed out after {self.timeout:g} s: {_short(command)}",
                             "make the command finish sooner or pass a larger timeout= option") from None
        if proc.returncode != 0:
            raise SensqError(f"latency command exited with code {proc.returncode}: {_short(command)}"
                             + (f" (stderr: {_short(_tail(err))})" if err.strip() else ""),
                             "run the command by hand on a model file and fix it so it exits 0 and prints " + expected)
        value = parse_latency_ms(out, self.pattern)
        if value is None or not math.isfinite(value) or value < 0:
            found = f"got {value}" if value is not None else f"stdout ends with: {_short(_tail(out)) or '(empty)'}"
            wanted = f"a match of pattern {self.pattern.pattern!r}" if self.pattern else expected
            raise SensqError(f"no latency in milliseconds in the output of: {_short(command)} ({found})",
                             f"make it print {wanted}")
        return value

    def _model_path(self, model: ModelLike, tmp: str) -> Path:
        if isinstance(model, (str, Path)):
            path = Path(model).resolve()  # absolute: the command may change directory
            if not path.is_file():
                raise SensqError(f"model file not found: {path}", "check the path given to --model")
            return path
        path = Path(tmp) / "model.onnx"
        proto = load_model(model)
        onnx.save_model(proto, str(path), save_as_external_data=proto.ByteSize() > 2**31 - 2**24)
        return path

    def measure(self, model: ModelLike) -> LatencyResult:
        with tempfile.TemporaryDirectory(prefix="sensq_lat_") as tmp:
            command = self.command_for(self._model_path(model, tmp))
            t0 = time.perf_counter()
            values = [self._run_once(command) for _ in range(self.repeats)]
            seconds = time.perf_counter() - t0
        return LatencyResult.from_samples(values, self.unit, self.name, command=command, runs=values,
                                          seconds=round(seconds, 3))

    def timer(self, model: ModelLike) -> "_CommandTimer":
        tmp = tempfile.TemporaryDirectory(prefix="sensq_lat_")
        return _CommandTimer(self, self.command_for(self._model_path(model, tmp.name)), tmp)

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "unit": self.unit, "command": self.command, "repeats": self.repeats}


class _CommandTimer:
    """One run of the command per call (the model is written to a temporary file once)."""

    def __init__(self, backend: CommandLatency, command: str, tmp):
        self.backend, self.command, self._tmp = backend, command, tmp

    def __call__(self) -> float:
        return self.backend._run_once(self.command)

    def close(self) -> None:
        self._tmp.cleanup()
