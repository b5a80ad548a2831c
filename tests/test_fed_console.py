"""The server console rendered from a hand-written round log, attached after the fact."""

from __future__ import annotations

import subprocess
import sys

from rich.console import Console

from nephrolith.server.console import watch
from nephrolith.server.roundlog import RoundLog


def _write_run(path):
    log = RoundLog(path)
    log.write("run_start", strategy="fedprox", num_rounds=2, min_clients=2)
    log.write("round_start", round=1, sampled=["node-1", "node-2", "node-3"], connected=3)
    log.write(
        "train_reply",
        round=1,
        site="hospital-a",
        metrics={"num-examples": 40, "train-loss": 0.61, "train-seconds": 3.2},
        bytes=2_000_000,
    )
    log.write(
        "train_rejected", round=1, site="hospital-b", reason="array 3: 12 NaN or infinite values"
    )
    log.write("train_failure", round=1, site="hospital-c", reason="no reply before the timeout")
    log.write("site_warning", site="hospital-a", message="training split has a single class [0]")
    log.write(
        "train_aggregated",
        round=1,
        participants=["hospital-a"],
        metrics={"num-examples": 40.0, "train-loss": 0.61},
    )
    log.write(
        "evaluate_reply",
        round=1,
        site="hospital-a",
        metrics={"num-examples": 10, "val-loss": 0.52, "val-auc": 0.875},
    )
    log.write(
        "evaluate_aggregated",
        round=1,
        metrics={"num-examples": 10.0, "val-loss": 0.52, "val-auc": 0.875},
    )
    log.write("checkpoint", round=1, kind="best", path="/runs/x/checkpoints/best", score=0.875)
    log.write("round_end", round=1, seconds=12.5)


def test_console_shows_sites_failures_and_metrics(tmp_path):
    # Prepare: one finished round, the run still going.
    path = tmp_path / "rounds.jsonl"
    _write_run(path)
    console = Console(record=True, width=200, force_terminal=False)

    # Execute: attach once, as `nephrolith-server monitor --no-follow` does.
    state = watch(path, follow=False, console=console)
    text = console.export_text()

    # Assert
    assert state.finished is None
    assert "strategy fedprox" in text
    assert "running" in text
    assert "hospital-a" in text
    assert "0.8750" in text  # aggregated and per-site val AUC
    assert "0.6100" in text  # train loss
    assert "hospital-b: array 3: 12 NaN or infinite values" in text
    assert "hospital-c: no reply before the timeout" in text
    assert "warning: hospital-a: training split has a single class [0]" in text
    assert "best checkpoint: round 1" in text
    assert "2.00" in text  # MB received


def test_monitor_command_reads_a_finished_run(tmp_path):
    path = tmp_path / "rounds.jsonl"
    _write_run(path)
    RoundLog(path).write("run_end", status="completed")
    done = subprocess.run(
        [sys.executable, "-m", "nephrolith.server.cli", "monitor", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "finished (completed)" in done.stdout
