"""Numerical core of the metrics: input checks, vectorised metric kernels and the group bootstrap.

The kernels work on counts or weights with any leading batch axes, so one code path serves the
point estimates in ``metrics`` and thousands of bootstrap replicates at once. Import the public
names from ``nephrolith.common.metrics``.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

# Metrics that take values in [0, 1] and get a bootstrap confidence interval.
SCORE_METRICS: tuple[str, ...] = (
    "accuracy",
    "precision",
    "recall",
    "specificity",
    "f1",
    "roc_auc",
    "pr_auc",
)
# Largest number of float64 cells one bootstrap chunk allocates (about 32 MB per array).
_CHUNK_CELLS = 4_000_000


class UndefinedMetricWarning(UserWarning):
    """A metric is undefined for the input and is reported as NaN."""


# --- input checks -------------------------------------------------------------------------


def check_inputs(labels: Any, probs: Any) -> tuple[np.ndarray, np.ndarray]:
    """Return labels as int8 and probs as float64, or raise ValueError naming the bad argument."""
    labels_arr = np.asarray(labels)
    probs_arr = np.asarray(probs)
    for name, arr in (("labels", labels_arr), ("probs", probs_arr)):
        if arr.ndim != 1:
            raise ValueError(
                f"{name}: expected a 1-D array, got shape {arr.shape}; pass one value per slice "
                "(for a two-column softmax output pass probs[:, 1])"
            )
        numeric = np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)
        if arr.size and not (numeric or arr.dtype == bool):
            raise ValueError(
                f"{name}: expected numbers, got dtype {arr.dtype}; map class names to 0/1 first"
            )
    if labels_arr.shape != probs_arr.shape:
        raise ValueError(
            f"labels and probs: expected the same length, got {labels_arr.size} labels and "
            f"{probs_arr.size} probs"
        )

    bad_labels = np.flatnonzero((labels_arr != 0) & (labels_arr != 1))
    if bad_labels.size:
        first = bad_labels[0]
        raise ValueError(
            f"labels: expected only 0 and 1, got {labels_arr[first]!r} at index {first} "
            f"({bad_labels.size} invalid values)"
        )
    probs_arr = probs_arr.astype(np.float64)
    bad_probs = np.flatnonzero(~np.isfinite(probs_arr) | (probs_arr < 0) | (probs_arr > 1))
    if bad_probs.size:
        first = bad_probs[0]
        raise ValueError(
            f"probs: expected finite probabilities in [0, 1], got {probs_arr[first]!r} at index "
            f"{first} ({bad_probs.size} invalid values); apply a sigmoid or softmax to logits"
        )
    return labels_arr.astype(np.int8), probs_arr


def check_groups(groups: Any, n: int, name: str = "groups") -> np.ndarray:
    groups_arr = np.asarray(groups)
    if groups_arr.ndim != 1 or groups_arr.size != n:
        raise ValueError(f"{name}: expected a 1-D array of {n} ids, got shape {groups_arr.shape}")
    try:
        np.unique(groups_arr)
    except TypeError as err:
        raise ValueError(
            f"{name}: ids cannot be sorted ({err}); pass ids of one type, e.g. all strings"
        ) from err
    return groups_arr


def check_threshold(threshold: Any) -> float:
    value = float(threshold)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"threshold: expected a probability in [0, 1], got {threshold!r}")
    return value


# --- metric kernels (vectorised over leading axes) ----------------------------------------


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    safe = np.where(denominator > 0, denominator, 1)
    return np.where(denominator > 0, numerator / safe, np.nan)


def threshold_scores(tp: Any, fp: Any, tn: Any, fn: Any) -> dict[str, np.ndarray]:
    """Return the confusion-matrix metrics; NaN where a denominator is zero."""
    tp, fp, tn, fn = (np.asarray(v, dtype=np.float64) for v in (tp, fp, tn, fn))
    return {
        "accuracy": _ratio(tp + tn, tp + fp + tn + fn),
        "precision": _ratio(tp, tp + fp),
        "recall": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
    }


def score_table(labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, ...]:
    """Return unique scores (ascending), score index per item, positives and negatives per score."""
    scores, score_index = np.unique(probs, return_inverse=True)
    positives = np.bincount(score_index, weights=labels, minlength=scores.size)
    negatives = np.bincount(score_index, weights=1 - labels, minlength=scores.size)
    return scores, score_index, positives, negatives


def ranking_scores(positives: np.ndarray, negatives: np.ndarray) -> dict[str, np.ndarray]:
    """Return ROC AUC and average precision from weights per unique score (last axis ascending).

    ROC AUC is the Mann-Whitney statistic: the probability that a random positive scores above a
    random negative, with ties counted as one half. Average precision is the step-wise sum
    sum_k (R_k - R_{k-1}) P_k over thresholds from high to low, without interpolation.
    """
    n_pos = positives.sum(axis=-1)
    n_neg = negatives.sum(axis=-1)

    negatives_below = np.cumsum(negatives, axis=-1) - negatives
    pairs_won = (positives * (negatives_below + 0.5 * negatives)).sum(axis=-1)
    roc_auc = _ratio(pairs_won, n_pos * n_neg)

    # At threshold k every item scoring >= scores[k] is predicted positive.
    tp_at = np.flip(np.cumsum(np.flip(positives, -1), axis=-1), -1)
    predicted_at = tp_at + np.flip(np.cumsum(np.flip(negatives, -1), axis=-1), -1)
    precision_at = _ratio(tp_at, predicted_at)
    # Scores carrying no positive weight add no recall, so their precision does not count.
    steps = np.where(positives > 0, positives * np.nan_to_num(precision_at), 0.0)
    pr_auc = _ratio(steps.sum(axis=-1), n_pos)
    return {"roc_auc": roc_auc, "pr_auc": pr_auc}


# --- bootstrap ----------------------------------------------------------------------------


def bootstrap_replicates(
    labels: Any, probs: Any, groups: Any, threshold: float, n_boot: int = 1000, seed: int = 0
) -> dict[str, np.ndarray]:
    """Recompute every score metric on bootstrap samples drawn by group (cluster bootstrap).

    Each replicate draws as many groups as there are, with replacement, and concatenates all
    slices of the drawn groups, so a group drawn twice contributes its slices twice. Slices of
    one study are correlated, so resampling single slices would understate the uncertainty.
    Replicates are computed as weighted counts, vectorised over replicates in chunks. The draws
    are ``numpy.random.default_rng(seed).integers(0, n_groups, (n_boot, n_groups))``, indices
    into the sorted unique group ids, so a replicate can be rebuilt outside this function.

    Args:
        labels: slice ground truth, shape (N,), values 0/1.
        probs: slice probabilities, shape (N,), in [0, 1].
        groups: group id per slice, shape (N,).
        threshold: operating point, as in binary_metrics.
        n_boot: number of replicates, >= 1.
        seed: seed of the numpy Generator that draws the groups.

    Returns:
        ``{metric: values}`` for every name in SCORE_METRICS, shape (n_boot,); NaN where a
        replicate leaves the metric undefined (e.g. no positive group drawn).
    """
    labels, probs = check_inputs(labels, probs)
    groups = check_groups(groups, labels.size)
    threshold = check_threshold(threshold)
    if int(n_boot) < 1:
        raise ValueError(f"n_boot: expected at least 1 replicate, got {n_boot!r}")
    n_boot = int(n_boot)
    if labels.size == 0:
        return {name: np.full(n_boot, np.nan) for name in SCORE_METRICS}

    _, group_index = np.unique(groups, return_inverse=True)
    n_groups = int(group_index.max()) + 1
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_groups, size=(n_boot, n_groups))
    # times_drawn[b, g]: how often replicate b drew group g.
    offsets = np.arange(n_boot)[:, None] * n_groups
    times_drawn = np.bincount((draws + offsets).ravel(), minlength=n_boot * n_groups)
    times_drawn = times_drawn.reshape(n_boot, n_groups).astype(np.float64)

    # Confusion cells per group (tp, fp, tn, fn), so replicate counts are one matrix product.
    predicted, positive = probs >= threshold, labels == 1
    cells = np.stack(
        [
            predicted & positive,
            predicted & ~positive,
            ~predicted & ~positive,
            ~predicted & positive,
        ],
        axis=1,
    ).astype(np.float64)
    group_cells = np.zeros((n_groups, 4))
    np.add.at(group_cells, group_index, cells)
    counts = times_drawn @ group_cells
    replicates = threshold_scores(*counts.T)

    # Ranking metrics need positive and negative weight per distinct score and replicate.
    _, score_index, _, _ = score_table(labels, probs)
    n_scores = int(score_index.max()) + 1
    chunk = max(1, _CHUNK_CELLS // max(labels.size, n_scores))
    ranking: dict[str, list[np.ndarray]] = {"roc_auc": [], "pr_auc": []}
    for start in range(0, n_boot, chunk):
        weights = times_drawn[start : start + chunk, group_index]
        rows = weights.shape[0]
        cell = (np.arange(rows)[:, None] * n_scores + score_index[None, :]).ravel()
        pos_w = np.bincount(cell, (weights * labels).ravel(), rows * n_scores)
        neg_w = np.bincount(cell, (weights * (1 - labels)).ravel(), rows * n_scores)
        scores = ranking_scores(pos_w.reshape(rows, -1), neg_w.reshape(rows, -1))
        for name, values in scores.items():
            ranking[name].append(values)
    replicates.update({name: np.concatenate(parts) for name, parts in ranking.items()})
    return replicates


def percentile_interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float, int]:
    """Return the percentile interval of the non-NaN replicates and how many there were."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"level: expected a confidence level in (0, 1), got {level!r}")
    valid = np.asarray(values, dtype=np.float64)
    valid = valid[~np.isnan(valid)]
    if valid.size == 0:
        return math.nan, math.nan, 0
    tail = 100.0 * (1.0 - level) / 2.0
    low, high = np.percentile(valid, [tail, 100.0 - tail])
    return float(low), float(high), int(valid.size)
