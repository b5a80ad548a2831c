"""The round log: one JSON object per line, written by the ServerApp and read by the console."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

ROUND_LOG_NAME = "rounds.jsonl"


def clean_json(value: Any) -> Any:
    """Return value with NaN/Inf floats replaced by None, so every line is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): clean_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean_json(v) for v in value]
    return value


class RoundLog:
    """Appender of events to a JSON-lines file, flushing each line so a reader gets it at once.

    Every event has "event" (its kind), "time" (Unix seconds) and "round" where it
    applies. Kinds written by the ServerApp: "run_start", "round_start",
    "train_reply", "train_rejected", "train_failure", "train_aggregated",
    "evaluate_reply", "evaluate_failure", "evaluate_aggregated", "server_evaluate",
    "checkpoint", "round_end", "run_end", "site_warning".
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, event: str, **fields: Any) -> dict[str, Any]:
        """Append one event and return it as written (non-finite floats become null)."""
        record = {"event": event, "time": round(time.time(), 3), **clean_json(fields)}
        line = json.dumps(record, sort_keys=False, allow_nan=False)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")
            handle.flush()
        return record


def read_events(path: Path, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
    """Read complete lines of a round log starting at byte `offset`.

    A partly written last line is left for the next call.

    Returns:
        (events, new_offset) where new_offset points after the last complete line.
    """
    path = Path(path)
    if not path.is_file():
        return [], offset
    with open(path, "rb") as handle:
        handle.seek(offset)
        data = handle.read()
    events: list[dict[str, Any]] = []
    consumed = 0
    for raw in data.splitlines(keepends=True):
        if not raw.endswith(b"\n"):
            break
        consumed += len(raw)
        text = raw.decode("utf-8").strip()
        if not text:
            continue
        try:
            events.append(json.loads(text))
        except json.JSONDecodeError:
            logger.warning("%s: skipped a line that is not JSON: %.80s", path, text)
    return events, offset + consumed


def iter_events(path: Path) -> Iterator[dict[str, Any]]:
    """Yield every complete event of a finished or running round log."""
    events, _ = read_events(path)
    yield from events


@dataclass
class RoundState:
    """Console state of one round.

    Attributes:
        number: the server round (1-based).
        phase: "train", "evaluate" or "done".
        started: Unix time of round_start.
        ended: Unix time of round_end, None while running.
        sites: per-site dict with keys such as train_loss, val_auc, status.
        train: aggregated train metrics.
        evaluate: aggregated evaluate metrics.
        server: server-side evaluation metrics.
        failures: (site or node, reason) pairs.
        bytes_received: bytes of accepted weight updates.
    """

    number: int
    phase: str = "train"
    started: float | None = None
    ended: float | None = None
    sites: dict[str, dict[str, Any]] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    evaluate: dict[str, Any] = field(default_factory=dict)
    server: dict[str, Any] = field(default_factory=dict)
    failures: list[tuple[str, str]] = field(default_factory=list)
    bytes_received: int = 0


@dataclass
class RunState:
    """Summary of a whole round log, rebuilt from its events."""

    run: dict[str, Any] = field(default_factory=dict)
    rounds: dict[int, RoundState] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    best: dict[str, Any] = field(default_factory=dict)
    finished: dict[str, Any] | None = None

    def round(self, number: int) -> RoundState:
        """Return the state of round `number`, creating it on first use."""
        if number not in self.rounds:
            self.rounds[number] = RoundState(number)
        return self.rounds[number]

    def apply(self, event: dict[str, Any]) -> None:  # noqa: C901 - one branch per event kind
        """Update the summary with one event."""
        kind = event.get("event")
        number = event.get("round")
        site = str(event.get("site") or event.get("node") or "?")
        if kind == "run_start":
            self.run = event
        elif kind == "run_end":
            self.finished = event
        elif kind == "site_warning":
            self.warnings.append(f"{site}: {event.get('message')}")
        elif kind == "checkpoint" and event.get("kind") == "best":
            self.best = event
        if not isinstance(number, int) or number < 1:
            return
        state = self.round(number)
        if kind == "round_start":
            state.started = event["time"]
        elif kind == "train_reply":
            entry = state.sites.setdefault(site, {})
            entry.update(status="trained", **event.get("metrics", {}))
            state.bytes_received += int(event.get("bytes", 0))
        elif kind in ("train_rejected", "train_failure", "evaluate_failure"):
            state.sites.setdefault(site, {})["status"] = kind.split("_")[1]
            state.failures.append((site, str(event.get("reason"))))
        elif kind == "train_aggregated":
            state.train = event.get("metrics", {})
            state.phase = "evaluate"
        elif kind == "evaluate_reply":
            metrics = dict(event.get("metrics", {}))
            metrics["val-examples"] = metrics.pop("num-examples", None)
            state.sites.setdefault(site, {}).update(metrics)
        elif kind == "evaluate_aggregated":
            state.evaluate = event.get("metrics", {})
        elif kind == "server_evaluate":
            state.server = event.get("metrics", {})
        elif kind == "round_end":
            state.ended = event["time"]
            state.phase = "done"


def load_state(path: Path) -> RunState:
    """Rebuild the run summary from a round log file."""
    state = RunState()
    for event in iter_events(path):
        state.apply(event)
    return state
