"""Binary detection metrics at slice and study level, with cluster-bootstrap confidence intervals.

Conventions used throughout: ``labels`` are 0/1 with 1 = stone, ``probs`` are positive-class
probabilities in [0, 1], and a slice is predicted positive when ``probs >= threshold``.
A metric that is undefined for the input (a single class, no predicted positives, no items) is
NaN and comes with an ``UndefinedMetricWarning`` instead of an error. Invalid input (wrong shape,
labels other than 0/1, probabilities outside [0, 1]) raises ValueError.
"""

from __future__ import annotations

import logging
import math
import warnings
from enum import StrEnum
from typing import Any, NamedTuple

import numpy as np

from nephrolith.common._metrics_core import (
    SCORE_METRICS,
    UndefinedMetricWarning,
    bootstrap_replicates,
    check_groups,
    check_inputs,
    check_threshold,
    percentile_interval,
    ranking_scores,
    score_table,
    threshold_scores,
)
from nephrolith.common.constants import CLASS_NAMES

__all__ = [
    "SCORE_METRICS",
    "GroupScores",
    "ThresholdMethod",
    "UndefinedMetricWarning",
    "aggregate_by_group",
    "binary_metrics",
    "bootstrap_ci",
    "bootstrap_replicates",
    "choose_threshold",
    "evaluate",
    "percentile_interval",
    "pr_curve",
    "roc_curve",
    "to_jsonable",
]

logger = logging.getLogger(__name__)


class ThresholdMethod(StrEnum):
    """Ways to choose an operating point on a validation set."""

    YOUDEN = "youden"
    SENSITIVITY = "sensitivity"


class GroupScores(NamedTuple):
    """Study-level labels and scores, one entry per group, ordered by sorted group id."""

    group_ids: np.ndarray
    labels: np.ndarray
    probs: np.ndarray


# --- point estimates and curves -----------------------------------------------------------


def binary_metrics(labels: Any, probs: Any, threshold: float) -> dict[str, Any]:
    """Compute threshold and ranking metrics for one set of binary predictions.

    Args:
        labels: ground truth, shape (N,), values 0/1 (1 = stone).
        probs: positive-class probabilities, shape (N,), finite, in [0, 1].
        threshold: operating point; an item is predicted positive when its prob >= threshold.

    Returns:
        Floats ``accuracy``, ``precision``, ``recall`` (sensitivity), ``specificity``, ``f1``,
        ``roc_auc``, ``pr_auc`` and ``prevalence``, and ints ``tp``, ``fp``, ``tn``, ``fn``,
        ``n``, ``n_pos``, ``n_neg``. ``roc_auc`` is the Mann-Whitney statistic with ties counted
        as one half. ``pr_auc`` is the average precision, step-wise without interpolation as in
        scikit-learn's ``average_precision_score``. Undefined metrics are NaN.

    Raises:
        ValueError: an argument has the wrong shape, type or value range.

    Warns:
        UndefinedMetricWarning: one warning naming every metric that is NaN and why.
    """
    labels, probs = check_inputs(labels, probs)
    threshold = check_threshold(threshold)

    predicted = probs >= threshold
    positive = labels == 1
    tp = int(np.sum(predicted & positive))
    fp = int(np.sum(predicted & ~positive))
    tn = int(np.sum(~predicted & ~positive))
    fn = int(np.sum(~predicted & positive))
    n_pos, n_neg = tp + fn, tn + fp

    _, _, positives, negatives = score_table(labels, probs)
    scores = {**threshold_scores(tp, fp, tn, fn), **ranking_scores(positives, negatives)}
    result: dict[str, Any] = {name: float(scores[name]) for name in SCORE_METRICS}
    result.update(tp=tp, fp=fp, tn=tn, fn=fn, n=labels.size, n_pos=n_pos, n_neg=n_neg)
    result["prevalence"] = n_pos / labels.size if labels.size else math.nan

    undefined = [name for name in (*SCORE_METRICS, "prevalence") if math.isnan(result[name])]
    if undefined:
        warnings.warn(
            f"{', '.join(undefined)} undefined for {labels.size} items with {n_pos} positive, "
            f"{n_neg} negative and {tp + fp} predicted positive at threshold {threshold:g}; "
            "reported as NaN",
            UndefinedMetricWarning,
            stacklevel=2,
        )
    return result


def _warn_one_class(function: str, n_pos: float, n_neg: float) -> None:
    warnings.warn(
        f"{function}: {int(n_pos)} positive and {int(n_neg)} negative items; the rate over an "
        "absent class is NaN",
        UndefinedMetricWarning,
        stacklevel=3,
    )


def _corner_indices(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Return the indices of the end points and of every point where the polyline turns."""
    dx, dy = np.diff(x), np.diff(y)
    turns = dx[:-1] * dy[1:] != dy[:-1] * dx[1:]
    return np.flatnonzero(np.concatenate([[True], turns, [True]]))


def roc_curve(
    labels: Any, probs: Any, drop_intermediate: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Compute the ROC curve over every distinct score.

    Args:
        labels: ground truth, shape (N,), values 0/1.
        probs: positive-class probabilities, shape (N,), in [0, 1].
        drop_intermediate: drop points lying on a straight segment between their neighbours;
            the area under the curve is unchanged.

    Returns:
        ``(fpr, tpr, thresholds)`` with thresholds decreasing. The first threshold is ``inf``
        (nothing predicted positive, point (0, 0)); point i predicts positive when
        prob >= thresholds[i]. The rate over an absent class is NaN, with a warning.
    """
    labels, probs = check_inputs(labels, probs)
    scores, _, positives, negatives = score_table(labels, probs)

    tps = np.concatenate([[0.0], np.cumsum(positives[::-1])])
    fps = np.concatenate([[0.0], np.cumsum(negatives[::-1])])
    thresholds = np.concatenate([[np.inf], scores[::-1]])
    n_pos, n_neg = tps[-1], fps[-1]
    if n_pos == 0 or n_neg == 0:
        _warn_one_class("roc_curve", n_pos, n_neg)
    tpr = tps / n_pos if n_pos > 0 else np.full(tps.shape, np.nan)
    fpr = fps / n_neg if n_neg > 0 else np.full(fps.shape, np.nan)

    if drop_intermediate and thresholds.size > 2:
        keep = _corner_indices(fpr, tpr)
        fpr, tpr, thresholds = fpr[keep], tpr[keep], thresholds[keep]
    return fpr, tpr, thresholds


def pr_curve(labels: Any, probs: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Compute the precision-recall curve over every distinct score.

    Returns:
        ``(precision, recall, thresholds)`` with thresholds decreasing (the distinct scores);
        point i predicts positive when prob >= thresholds[i]. Recall is NaN without positives.
        Unlike scikit-learn's ``precision_recall_curve`` no (recall 0, precision 1) end point
        is appended.
    """
    labels, probs = check_inputs(labels, probs)
    scores, _, positives, negatives = score_table(labels, probs)

    tps = np.cumsum(positives[::-1])
    predicted = tps + np.cumsum(negatives[::-1])
    n_pos = positives.sum()
    if n_pos == 0:
        _warn_one_class("pr_curve", n_pos, negatives.sum())
    recall = tps / n_pos if n_pos > 0 else np.full(tps.shape, np.nan)
    # Every distinct score belongs to at least one item, so predicted > 0 everywhere.
    return tps / predicted, recall, scores[::-1].copy()


def aggregate_by_group(labels: Any, probs: Any, groups: Any) -> GroupScores:
    """Reduce slice predictions to one prediction per group (study, series or patient).

    A group is positive when any of its slices is positive, and its score is its highest slice
    score, so a study is flagged as soon as one slice shows a stone.

    Args:
        labels: slice ground truth, shape (N,), values 0/1.
        probs: slice probabilities, shape (N,), in [0, 1].
        groups: group id of each slice, shape (N,), ids of one sortable type.

    Returns:
        GroupScores ``(group_ids, labels, probs)`` ordered by sorted group id.
    """
    labels, probs = check_inputs(labels, probs)
    groups = check_groups(groups, labels.size)

    group_ids, group_index = np.unique(groups, return_inverse=True)
    group_labels = np.zeros(group_ids.size, dtype=np.int8)
    group_probs = np.zeros(group_ids.size, dtype=np.float64)
    np.maximum.at(group_labels, group_index, labels)
    np.maximum.at(group_probs, group_index, probs)
    return GroupScores(group_ids, group_labels, group_probs)


def choose_threshold(
    labels: Any, probs: Any, method: str = ThresholdMethod.YOUDEN, target: float = 0.9
) -> float:
    """Choose an operating point on validation predictions.

    Args:
        labels: ground truth, shape (N,), values 0/1; both classes must be present.
        probs: positive-class probabilities, shape (N,), in [0, 1].
        method: ``"youden"`` maximises sensitivity + specificity - 1; ``"sensitivity"`` returns
            the highest threshold whose sensitivity is at least ``target``. Ties go to the
            highest threshold, which predicts the fewest positives.
        target: sensitivity to reach, in (0, 1]; used by ``"sensitivity"`` only.

    Returns:
        One of the observed scores, to be used as ``probs >= threshold``.

    Raises:
        ValueError: unknown method, target outside (0, 1], or only one class present.
    """
    labels, probs = check_inputs(labels, probs)
    try:
        method = ThresholdMethod(method)
    except ValueError as err:
        choices = [m.value for m in ThresholdMethod]
        raise ValueError(f"method: expected one of {choices}, got {method!r}") from err
    n_pos = int(labels.sum())
    if n_pos == 0 or n_pos == labels.size:
        raise ValueError(
            f"labels: choosing a threshold needs both classes, got {n_pos} positive and "
            f"{labels.size - n_pos} negative; use a validation split with both classes"
        )

    fpr, tpr, thresholds = roc_curve(labels, probs)
    # Drop the inf point, which predicts nothing positive and is no usable threshold.
    fpr, tpr, thresholds = fpr[1:], tpr[1:], thresholds[1:]
    if method is ThresholdMethod.YOUDEN:
        best = int(np.argmax(tpr - fpr))
    else:
        if not 0.0 < target <= 1.0:
            raise ValueError(f"target: expected a sensitivity in (0, 1], got {target!r}")
        # tpr rises to 1 at the lowest score, so the target is always reached.
        best = int(np.argmax(tpr >= target))
    return float(thresholds[best])


def bootstrap_ci(
    labels: Any,
    probs: Any,
    groups: Any,
    threshold: float,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, tuple[float, float]]:
    """Compute percentile bootstrap confidence intervals, resampling whole groups.

    Replicates where a metric is undefined are skipped for that metric. The number used per
    metric is logged as a warning when some were skipped, and ``evaluate`` returns it. See
    bootstrap_replicates for the arguments and the resampling.

    Returns:
        ``{metric: (low, high)}`` for every name in SCORE_METRICS; (NaN, NaN) when no replicate
        defines the metric.
    """
    replicates = bootstrap_replicates(labels, probs, groups, threshold, n_boot, seed)
    intervals, _ = _intervals(replicates, level)
    return intervals


def _intervals(
    replicates: dict[str, np.ndarray], level: float
) -> tuple[dict[str, tuple[float, float]], dict[str, int]]:
    """Return the percentile interval and the number of replicates used for every metric."""
    intervals: dict[str, tuple[float, float]] = {}
    used: dict[str, int] = {}
    for name in SCORE_METRICS:
        low, high, used[name] = percentile_interval(replicates[name], level)
        intervals[name] = (low, high)

    n_boot = replicates[SCORE_METRICS[0]].size
    short = {name: count for name, count in used.items() if count < n_boot}
    if short:
        logger.warning(
            "bootstrap: replicates used per CI out of %d: %s; the others leave it undefined",
            n_boot,
            ", ".join(f"{name} {count}" for name, count in short.items()),
        )
    return intervals, used


# --- full evaluation ----------------------------------------------------------------------


def to_jsonable(value: Any) -> Any:
    """Convert numpy values, tuples and non-finite floats (to None) into plain JSON types."""
    if isinstance(value, dict):
        return {str(key): to_jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [to_jsonable(item) for item in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _level_report(
    labels: np.ndarray,
    probs: np.ndarray,
    groups: np.ndarray,
    threshold: float,
    n_boot: int,
    seed: int,
    level: float,
) -> dict[str, Any]:
    point = binary_metrics(labels, probs, threshold)
    replicates = bootstrap_replicates(labels, probs, groups, threshold, n_boot, seed)
    ci, used = _intervals(replicates, level)

    roc = None
    if 0 < point["n_pos"] < point["n"]:
        fpr, tpr, thresholds = roc_curve(labels, probs, drop_intermediate=True)
        roc = {"fpr": fpr, "tpr": tpr, "thresholds": thresholds}
    confusion = {
        "class_names": list(CLASS_NAMES),
        "matrix": [[point["tn"], point["fp"]], [point["fn"], point["tp"]]],
    }
    return {
        "metrics": point,
        "ci": ci,
        "ci_replicates_used": used,
        "confusion": confusion,
        "roc": roc,
    }


def _evaluate_levels(
    labels: np.ndarray,
    probs: np.ndarray,
    groups: np.ndarray,
    threshold: float,
    n_boot: int,
    seed: int,
    level: float,
) -> dict[str, Any]:
    by_group = aggregate_by_group(labels, probs, groups)
    return {
        "image": _level_report(labels, probs, groups, threshold, n_boot, seed, level),
        "group": _level_report(
            by_group.labels, by_group.probs, by_group.group_ids, threshold, n_boot, seed, level
        ),
    }


def evaluate(
    labels: Any,
    probs: Any,
    groups: Any,
    threshold: float,
    sites: Any = None,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, Any]:
    """Evaluate slice predictions at image and group level, overall and per site.

    Image level treats every slice as an item, with CIs from resampling groups. Group level
    first reduces each group with aggregate_by_group (positive when any slice is, score = max
    slice score) and resamples groups. When ``sites`` is given, a group id is only matched
    within its site, so "p1" at two hospitals are two studies.

    Args:
        labels: slice ground truth, shape (N,), values 0/1.
        probs: slice probabilities, shape (N,), in [0, 1].
        groups: study/patient id per slice, shape (N,).
        threshold: operating point, probs >= threshold is positive.
        sites: optional site id per slice, shape (N,).
        n_boot: bootstrap replicates per level and site.
        seed: bootstrap seed, reused for every level and site.
        level: confidence level of the percentile intervals.

    Returns:
        A JSON-ready dict ``{"threshold", "n_boot", "seed", "level", "image", "group",
        "per_site"}``. ``image`` and ``group`` each hold ``metrics`` (binary_metrics),
        ``ci`` ({metric: [low, high]}), ``ci_replicates_used`` ({metric: count}),
        ``confusion`` ({"class_names", "matrix": [[tn, fp], [fn, tp]]}) and ``roc``
        ({"fpr", "tpr", "thresholds"} without collinear points, or None for one class).
        ``per_site`` maps each site to ``{"image", "group"}`` ({} without sites). NaN and
        infinite values (undefined metrics, the first ROC threshold) become None.
    """
    labels, probs = check_inputs(labels, probs)
    groups = check_groups(groups, labels.size)
    threshold = check_threshold(threshold)
    if not 0.0 < level < 1.0:
        raise ValueError(f"level: expected a confidence level in (0, 1), got {level!r}")

    per_site: dict[str, Any] = {}
    if sites is not None:
        sites = check_groups(sites, labels.size, name="sites")
        # Number (site, group) pairs so equal group ids at different sites stay apart.
        pairs = np.stack([sites.astype(str), groups.astype(str)], axis=1)
        _, groups = np.unique(pairs, axis=0, return_inverse=True)
        groups = groups.reshape(-1)
        for site in np.unique(sites):
            mask = sites == site
            per_site[str(site)] = _evaluate_levels(
                labels[mask], probs[mask], groups[mask], threshold, n_boot, seed, level
            )

    overall = _evaluate_levels(labels, probs, groups, threshold, n_boot, seed, level)
    report = {
        "threshold": threshold,
        "n_boot": int(n_boot),
        "seed": seed,
        "level": level,
        **overall,
        "per_site": per_site,
    }
    return to_jsonable(report)
