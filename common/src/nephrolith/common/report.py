"""Evaluation report files: JSON, ROC, confusion and learning-curve PNGs, and one HTML page.

Plots use ``matplotlib.figure.Figure`` directly (rendered by the Agg backend on save), not
pyplot, so writing a report changes no global matplotlib state and needs no display.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from nephrolith.common.constants import CLASS_NAMES
from nephrolith.common.metrics import SCORE_METRICS, to_jsonable

logger = logging.getLogger(__name__)

LEVELS: tuple[str, ...] = ("image", "group")
METRIC_LABELS: dict[str, str] = {
    "accuracy": "Accuracy",
    "precision": "Precision (PPV)",
    "recall": "Recall (sensitivity)",
    "specificity": "Specificity",
    "f1": "F1",
    "roc_auc": "ROC AUC",
    "pr_auc": "PR AUC (average precision)",
}
# Confusion counts that every level must contain, because the plot and the tables show them.
_COUNT_KEYS: tuple[str, ...] = ("n", "n_pos", "n_neg", "tp", "fp", "tn", "fn")
# Keys of a history entry that give its position on the x axis, in order of preference.
HISTORY_X_KEYS: tuple[str, ...] = ("round", "epoch")
# Parts of a history key that mark a [0, 1] score for the learning curve's right-hand axis.
HISTORY_SCORE_PARTS: tuple[str, ...] = (
    "auc",
    "acc",
    "precision",
    "recall",
    "sensitivity",
    "specificity",
    "f1",
)

# Leave out matplotlib's default Software tag (its version and home page URL).
_PNG_METADATA: dict[str, str | None] = {"Software": None}

_CSS = """
body { font-family: sans-serif; margin: 2em; max-width: 70em; color: #222; }
table { border-collapse: collapse; margin-bottom: 1.5em; }
th, td { border: 1px solid #bbb; padding: 0.3em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
small { color: #555; }
img { max-width: 32em; margin: 0.5em; border: 1px solid #ddd; }
"""


def _check_report(report: Any) -> None:
    if not isinstance(report, Mapping):
        raise ValueError(f"report: expected a dict from metrics.evaluate, got {type(report)}")
    for level in LEVELS:
        section = report.get(level)
        if not isinstance(section, Mapping) or not isinstance(section.get("metrics"), Mapping):
            raise ValueError(
                f"report[{level!r}]: expected a dict with 'metrics', got {type(section)}; "
                "build the report with metrics.evaluate"
            )
        missing = [key for key in _COUNT_KEYS if key not in section["metrics"]]
        if missing:
            raise ValueError(
                f"report[{level!r}]['metrics']: missing {', '.join(missing)}; "
                "build the report with metrics.evaluate"
            )
    history = report.get("history")
    if history is not None and (
        isinstance(history, (str, bytes))
        or not isinstance(history, Sequence)
        or not all(isinstance(entry, Mapping) for entry in history)
    ):
        raise ValueError(
            "report['history']: expected a list of dicts such as "
            "{'epoch': 1, 'loss': 0.4, 'val_auc': 0.8}"
        )


def write_report(
    report: Mapping[str, Any], out_dir: Path | str, title: str = "nephrolith evaluation"
) -> dict[str, Path]:
    """Write an evaluation report as JSON, PNG plots and a self-contained HTML page.

    Args:
        report: the dict returned by ``metrics.evaluate``, optionally with a ``history`` list of
            per-epoch or per-round dicts (``epoch`` or ``round``, ``loss``, ``val_auc``, ...).
        out_dir: folder to write into; created when missing. Existing report files are replaced.
        title: page and figure title.

    Returns:
        Written paths under the keys ``json`` (report.json), ``roc`` (roc.png), ``confusion``
        (confusion.png, image level), ``learning_curve`` (learning_curve.png, only when the
        history has loss or [0, 1] score values) and ``html`` (report.html, plots embedded as
        base64).

    Raises:
        ValueError: the report lacks the image/group sections or has a malformed history.
    """
    _check_report(report)
    report = to_jsonable(report)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    paths: dict[str, Path] = {"json": out_dir / "report.json"}
    paths["json"].write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")

    paths["roc"] = _plot_roc(report, out_dir / "roc.png", title)
    paths["confusion"] = _plot_confusion(report, out_dir / "confusion.png", title)
    learning_curve = _plot_history(report.get("history") or [], out_dir / "learning_curve.png")
    if learning_curve is not None:
        paths["learning_curve"] = learning_curve

    plots = [paths[key] for key in ("roc", "confusion", "learning_curve") if key in paths]
    paths["html"] = out_dir / "report.html"
    paths["html"].write_text(_render_html(report, title, plots), encoding="utf-8")
    logger.info("report written to %s (%s)", out_dir, ", ".join(p.name for p in paths.values()))
    return paths


# --- plots --------------------------------------------------------------------------------


def _plot_roc(report: Mapping[str, Any], path: Path, title: str) -> Path:
    figure = Figure(figsize=(5.5, 5.0), dpi=100)
    axes = figure.add_subplot()
    axes.plot([0, 1], [0, 1], linestyle="--", color="0.6", label="chance")
    for level, color in zip(LEVELS, ("tab:blue", "tab:orange"), strict=True):
        section = report[level]
        roc = section.get("roc")
        if not roc:
            # A single-class level has no ROC curve, so the legend marks it instead of a line.
            axes.plot([], [], color=color, label=f"{level}: no curve (one class)")
            continue
        auc = _format_with_ci(
            section["metrics"].get("roc_auc"), section.get("ci", {}).get("roc_auc")
        )
        # Straight segments: tied scores move a ROC curve diagonally, not in steps.
        axes.plot(roc["fpr"], roc["tpr"], color=color, label=f"{level}: AUC {auc}")
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1.02)
    axes.set_xlabel("False positive rate (1 - specificity)")
    axes.set_ylabel("True positive rate (sensitivity)")
    axes.set_title(f"{title}: ROC", fontsize=10)
    axes.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, format="png", metadata=_PNG_METADATA)
    return path


def _plot_confusion(report: Mapping[str, Any], path: Path, title: str) -> Path:
    metrics = report["image"]["metrics"]
    matrix = np.array([[metrics["tn"], metrics["fp"]], [metrics["fn"], metrics["tp"]]])
    figure = Figure(figsize=(4.5, 4.0), dpi=100)
    axes = figure.add_subplot()
    axes.imshow(matrix, cmap="Blues", vmin=0, vmax=max(int(matrix.max()), 1))

    # Dark cells get white text so the count stays readable.
    for (row, column), count in np.ndenumerate(matrix):
        dark = count > 0.6 * max(int(matrix.max()), 1)
        axes.text(
            column,
            row,
            str(count),
            ha="center",
            va="center",
            color="white" if dark else "black",
            fontsize=14,
        )
    axes.set_xticks([0, 1], labels=list(CLASS_NAMES))
    axes.set_yticks([0, 1], labels=list(CLASS_NAMES))
    axes.set_xlabel("Predicted")
    axes.set_ylabel("True")
    threshold = report.get("threshold")
    suffix = f", threshold {threshold:g}" if isinstance(threshold, (int, float)) else ""
    axes.set_title(f"{title}: slices{suffix}", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, format="png", metadata=_PNG_METADATA)
    return path


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _history_series(history: Sequence[Mapping[str, Any]]) -> tuple[list[float], dict[str, list]]:
    """Return the x values and {name: y values} of the losses and [0, 1] scores of a history.

    Other numeric keys (epoch seconds, throughput, learning rate) are left out because they
    would distort both y axes.
    """
    x_key = next((key for key in HISTORY_X_KEYS if key in history[0]), None)
    x_values = []
    for index, entry in enumerate(history):
        x_value = entry.get(x_key) if x_key else None
        x_values.append(float(x_value) if _is_number(x_value) else float(index + 1))

    names = sorted({key for entry in history for key in entry if key not in HISTORY_X_KEYS})
    series: dict[str, list] = {}
    skipped = []
    for name in names:
        values = [float(v) if _is_number(v) else math.nan for v in (e.get(name) for e in history)]
        present = [v for v in values if not math.isnan(v)]
        is_score = any(part in name.lower() for part in HISTORY_SCORE_PARTS) and all(
            0.0 <= v <= 1.0 for v in present
        )
        if present and ("loss" in name.lower() or is_score):
            series[name] = values
        else:
            skipped.append(name)
    if skipped:
        logger.debug("learning curve leaves out history keys: %s", ", ".join(skipped))
    return x_values, series


def _plot_history(history: Sequence[Mapping[str, Any]], path: Path) -> Path | None:
    if not history:
        return None
    x_values, series = _history_series(history)
    if not series:
        logger.warning(
            "report history has no loss or [0, 1] score values; learning_curve.png not written"
        )
        return None

    figure = Figure(figsize=(6.0, 4.0), dpi=100)
    loss_axes = figure.add_subplot()
    # Losses and [0, 1] scores differ in scale, so scores get their own y axis on the right.
    score_axes = loss_axes.twinx()
    for index, (name, values) in enumerate(series.items()):
        axes = loss_axes if "loss" in name.lower() else score_axes
        axes.plot(
            x_values,
            values,
            marker="o",
            markersize=3,
            label=name,
            color=f"C{index % 10}",
            linestyle="--" if axes is score_axes else "-",
        )
    x_key = next((key for key in HISTORY_X_KEYS if key in history[0]), "step")
    loss_axes.set_xlabel(x_key)
    loss_axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    loss_axes.set_ylabel("loss")
    score_axes.set_ylabel("score")
    handles = loss_axes.get_legend_handles_labels()
    score_handles = score_axes.get_legend_handles_labels()
    loss_axes.legend(handles[0] + score_handles[0], handles[1] + score_handles[1], fontsize=8)
    loss_axes.set_title("Learning curve", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, format="png", metadata=_PNG_METADATA)
    return path


# --- HTML ---------------------------------------------------------------------------------


def _format_value(value: Any) -> str:
    """Format a metric for display: 3 decimals for floats, "n/a" for undefined (None)."""
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def _format_with_ci(value: Any, interval: Any) -> str:
    text = _format_value(value)
    if interval and interval[0] is not None and interval[1] is not None:
        text += f" [{interval[0]:.3f}, {interval[1]:.3f}]"
    return text


def _metric_cell(section: Mapping[str, Any], name: str) -> str:
    value = _format_value(section["metrics"].get(name))
    interval = section.get("ci", {}).get(name)
    if interval and interval[0] is not None and interval[1] is not None:
        return f"{value}<br><small>[{interval[0]:.3f}, {interval[1]:.3f}]</small>"
    return value


def _metrics_table(report: Mapping[str, Any]) -> str:
    rows = ["<tr><th>Metric</th><th>Image level</th><th>Group level</th></tr>"]
    for name in SCORE_METRICS:
        cells = "".join(f"<td>{_metric_cell(report[level], name)}</td>" for level in LEVELS)
        rows.append(f"<tr><td>{html.escape(METRIC_LABELS[name])}</td>{cells}</tr>")
    for name in _COUNT_KEYS:
        cells = "".join(
            f"<td>{_format_value(report[level]['metrics'].get(name))}</td>" for level in LEVELS
        )
        rows.append(f"<tr><td>{name}</td>{cells}</tr>")
    return "<table>\n" + "\n".join(rows) + "\n</table>"


def _per_site_table(per_site: Mapping[str, Any]) -> str:
    if not per_site:
        return "<p>No site ids were given.</p>"
    header = "".join(f"<th>{html.escape(METRIC_LABELS[name])}</th>" for name in SCORE_METRICS)
    rows = [f"<tr><th>Site</th><th>Level</th><th>n (positive)</th>{header}</tr>"]
    for site, levels in per_site.items():
        for level in LEVELS:
            section = levels[level]
            counts = f"{section['metrics'].get('n')} ({section['metrics'].get('n_pos')})"
            cells = "".join(f"<td>{_metric_cell(section, name)}</td>" for name in SCORE_METRICS)
            rows.append(
                f"<tr><td>{html.escape(str(site))}</td><td>{level}</td><td>{counts}</td>{cells}</tr>"
            )
    return "<table>\n" + "\n".join(rows) + "\n</table>"


def _embedded_image(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    alt = html.escape(path.stem.replace("_", " "))
    return f'<img alt="{alt}" src="data:image/png;base64,{data}">'


def _render_html(report: Mapping[str, Any], title: str, plots: Sequence[Path]) -> str:
    threshold = report.get("threshold")
    threshold = f"{threshold:g}" if isinstance(threshold, (int, float)) else "n/a"
    level = report.get("level", 0.95)
    n_boot = report.get("n_boot", "?")
    method = (
        f"A slice is predicted positive when its probability is at least {threshold}. "
        f"Intervals are {level * 100:g}% percentile bootstrap intervals from {n_boot} "
        "replicates that resample whole groups (studies), so correlated slices of one study "
        "stay together. At group level a study is positive when any of its slices is, and its "
        "score is its highest slice score. n/a marks a metric that is undefined for the data "
        "(for example ROC AUC with one class)."
    )
    body = [
        f"<h1>{html.escape(title)}</h1>",
        f"<p>{html.escape(method)}</p>",
        "<h2>Metrics</h2>",
        _metrics_table(report),
        "<h2>Per site</h2>",
        _per_site_table(report.get("per_site") or {}),
        "<h2>Plots</h2>",
        "\n".join(_embedded_image(path) for path in plots),
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )
