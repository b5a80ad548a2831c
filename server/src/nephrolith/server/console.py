"""The server console: a Rich live view of the round log, attached to a running or finished run."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from nephrolith.server.roundlog import RunState, read_events

logger = logging.getLogger(__name__)

_STATUS_STYLE = {"trained": "green", "rejected": "bold red", "failure": "red"}


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _elapsed(state: RunState, now: float) -> str:
    start = state.run.get("time")
    if start is None:
        return "-"
    end = state.finished["time"] if state.finished else now
    return f"{end - start:.0f} s"


def render(state: RunState, now: float | None = None) -> Group:
    """Return the renderable for a run: header, one row per round, sites of the latest round."""
    now = time.time() if now is None else now
    run = state.run
    if state.finished:
        status = f"finished ({state.finished.get('status')})"
    elif run:
        status = "running"
    else:
        status = "waiting for the ServerApp"
    header = Text.assemble(
        ("nephrolith federation  ", "bold"),
        f"strategy {run.get('strategy', '-')}  rounds {run.get('num_rounds', '-')}  "
        f"min hospitals {run.get('min_clients', '-')}  elapsed {_elapsed(state, now)}  ",
        (status, "bold green" if status.startswith("finished (completed") else "bold"),
    )

    rounds = Table(title="rounds", expand=True)
    for column in (
        "round",
        "state",
        "hospitals",
        "failed",
        "train loss",
        "val loss",
        "val AUC",
        "server AUC",
        "MB in",
        "seconds",
    ):
        rounds.add_column(column, justify="right" if column != "hospitals" else "left")
    for number in sorted(state.rounds):
        r = state.rounds[number]
        trained = [s for s, v in r.sites.items() if v.get("status") == "trained"]
        seconds = (r.ended or now) - r.started if r.started else None
        rounds.add_row(
            str(number),
            r.phase,
            ", ".join(sorted(trained)) or "-",
            ", ".join(sorted({s for s, _ in r.failures})) or "-",
            _fmt(r.train.get("train-loss")),
            _fmt(r.evaluate.get("val-loss")),
            _fmt(r.evaluate.get("val-auc")),
            _fmt(r.server.get("server-auc")),
            f"{r.bytes_received / 1e6:.2f}",
            _fmt(seconds, 1),
        )

    parts: list[Any] = [header, rounds]
    if state.rounds:
        latest = state.rounds[max(state.rounds)]
        sites = Table(title=f"hospitals in round {latest.number}", expand=True)
        for column in (
            "hospital",
            "status",
            "train n",
            "val n",
            "train loss",
            "val loss",
            "val AUC",
            "train s",
        ):
            sites.add_column(column)
        for name in sorted(latest.sites):
            values = latest.sites[name]
            status = values.get("status", "-")
            sites.add_row(
                name,
                Text(status, style=_STATUS_STYLE.get(status, "")),
                _fmt(values.get("num-examples"), 0),
                _fmt(values.get("val-examples"), 0),
                _fmt(values.get("train-loss")),
                _fmt(values.get("val-loss")),
                _fmt(values.get("val-auc")),
                _fmt(values.get("train-seconds"), 1),
            )
        parts.append(sites)
        for site, reason in latest.failures:
            parts.append(Text(f"round {latest.number}: {site}: {reason}", style="red"))
    for warning in state.warnings[-5:]:
        parts.append(Text(f"warning: {warning}", style="yellow"))
    if state.best:
        parts.append(
            Text(
                f"best checkpoint: round {state.best.get('round')} "
                f"({state.best.get('metric', 'val-auc')} {_fmt(state.best.get('score'))}) "
                f"{state.best.get('path')}"
            )
        )
    return Group(*parts)


def watch(
    round_log: Path,
    is_done: Callable[[], bool] | None = None,
    *,
    follow: bool = True,
    refresh_s: float = 1.0,
    console: Console | None = None,
) -> RunState:
    """Show the round log live until the run ends (or once, when follow is False).

    Args:
        round_log: the rounds.jsonl file (it may not exist yet).
        is_done: extra stop condition, for example "the SuperLink exited".
        follow: keep reading until run_end appears or is_done() is true.
        refresh_s: seconds between reads.
        console: Rich console to draw on; defaults to stdout.

    Returns:
        The run state after the last read.
    """
    state = RunState()
    offset = 0
    console = console or Console()
    with Live(
        render(state), console=console, refresh_per_second=4, transient=False, auto_refresh=False
    ) as live:
        while True:
            events, offset = read_events(round_log, offset)
            for event in events:
                state.apply(event)
            live.update(render(state), refresh=True)
            if not follow or state.finished is not None or (is_done is not None and is_done()):
                break
            time.sleep(refresh_s)
    # One last read so a run_end written just before is_done() turned true is shown.
    events, offset = read_events(round_log, offset)
    for event in events:
        state.apply(event)
    return state
