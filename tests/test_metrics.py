"""Tests of nephrolith.common.metrics against hand-computed values and scikit-learn."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
from sklearn import metrics as sk

from nephrolith.common import metrics
from nephrolith.common.metrics import UndefinedMetricWarning

# Hand table: 4 positives, 6 negatives, ties at 0.6 across the classes.
HAND_LABELS = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
HAND_PROBS = [0.9, 0.8, 0.6, 0.3, 0.7, 0.6, 0.4, 0.2, 0.1, 0.05]
# At threshold 0.5 the predicted positives are 0.9, 0.8, 0.6 (labels 1) and 0.7, 0.6 (labels 0):
#   TP = 3 (0.9, 0.8, 0.6)   FP = 2 (0.7, 0.6)
#   FN = 1 (0.3)             TN = 4 (0.4, 0.2, 0.1, 0.05)
# accuracy 7/10, precision 3/5, recall 3/4, specificity 4/6, F1 = 2*3 / (2*3 + 2 + 1) = 6/9.
# ROC AUC over 4 * 6 = 24 pairs, negatives below each positive (ties count 1/2):
#   0.9 -> 6, 0.8 -> 6, 0.6 -> 4 + 0.5 (tie with the negative 0.6), 0.3 -> 3; sum 19.5 -> 19.5/24.
# Average precision, thresholds from high to low, at each new positive:
#   0.9: P 1/1, 0.8: P 2/2, 0.6: P 3/5, 0.3: P 4/7; each adds recall 1/4.
HAND_EXPECTED = {
    "tp": 3,
    "fp": 2,
    "tn": 4,
    "fn": 1,
    "n": 10,
    "n_pos": 4,
    "n_neg": 6,
    "accuracy": 0.7,
    "precision": 0.6,
    "recall": 0.75,
    "specificity": 4 / 6,
    "f1": 6 / 9,
    "roc_auc": 19.5 / 24,
    "pr_auc": (1 + 1 + 3 / 5 + 4 / 7) / 4,
    "prevalence": 0.4,
}


def _random_table(seed: int, n: int, decimals: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels with both classes and probabilities rounded to create many ties."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    labels[:2] = [0, 1]
    probs = np.clip(np.round(0.35 * labels + 0.65 * rng.random(n), decimals), 0, 1)
    return labels, probs


def _clustered_table(
    n_groups: int, per_group: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Slices whose scores share a per-group offset, as slices of one study do."""
    rng = np.random.default_rng(seed)
    group_labels = np.arange(n_groups) % 2
    offsets = rng.normal(0, 0.15, n_groups)
    labels = np.repeat(group_labels, per_group)
    groups = np.repeat([f"g{i:03d}" for i in range(n_groups)], per_group)
    probs = 0.3 + 0.3 * labels + np.repeat(offsets, per_group) + rng.normal(0, 0.1, labels.size)
    return labels, np.clip(probs, 0, 1), groups


# --- binary_metrics ---------------------------------------------------------------------


def test_binary_metrics_hand_table():
    result = metrics.binary_metrics(HAND_LABELS, HAND_PROBS, 0.5)
    for name, expected in HAND_EXPECTED.items():
        assert result[name] == pytest.approx(expected, abs=1e-12), name


def test_threshold_is_inclusive():
    # 0.6 is both a positive and a negative score, and >= 0.6 predicts both as positive.
    result = metrics.binary_metrics(HAND_LABELS, HAND_PROBS, 0.6)
    assert (result["tp"], result["fp"]) == (3, 2)
    result = metrics.binary_metrics(HAND_LABELS, HAND_PROBS, 0.61)
    assert (result["tp"], result["fp"]) == (2, 1)


@pytest.mark.parametrize(
    ("seed", "n", "decimals", "threshold"),
    [(0, 10, 1, 0.5), (1, 37, 1, 0.4), (2, 200, 2, 0.55), (3, 500, 1, 0.7), (4, 64, 3, 0.3)],
)
def test_binary_metrics_match_sklearn(seed, n, decimals, threshold):
    labels, probs = _random_table(seed, n, decimals)
    predicted = (probs >= threshold).astype(int)
    result = metrics.binary_metrics(labels, probs, threshold)

    tn, fp, fn, tp = sk.confusion_matrix(labels, predicted, labels=[0, 1]).ravel()
    assert (result["tn"], result["fp"], result["fn"], result["tp"]) == (tn, fp, fn, tp)
    assert result["accuracy"] == pytest.approx(sk.accuracy_score(labels, predicted))
    assert result["precision"] == pytest.approx(sk.precision_score(labels, predicted))
    assert result["recall"] == pytest.approx(sk.recall_score(labels, predicted))
    assert result["specificity"] == pytest.approx(sk.recall_score(labels, predicted, pos_label=0))
    assert result["f1"] == pytest.approx(sk.f1_score(labels, predicted))
    assert result["roc_auc"] == pytest.approx(sk.roc_auc_score(labels, probs), abs=1e-12)
    assert result["pr_auc"] == pytest.approx(sk.average_precision_score(labels, probs), abs=1e-12)


def test_all_scores_tied_give_auc_half():
    result = metrics.binary_metrics([0, 1, 0, 1, 1], [0.5] * 5, 0.5)
    assert result["roc_auc"] == 0.5
    assert result["pr_auc"] == pytest.approx(0.6)  # one threshold: precision 3/5 at recall 1


def test_bool_labels_accepted():
    result = metrics.binary_metrics(np.array(HAND_LABELS, dtype=bool), HAND_PROBS, 0.5)
    assert result["tp"] == 3


def test_one_class_gives_nan_and_warning():
    with pytest.warns(UndefinedMetricWarning, match="recall") as record:
        result = metrics.binary_metrics([0, 0, 0, 0], [0.1, 0.7, 0.3, 0.2], 0.5)
    message = str(record[0].message)
    assert "roc_auc" in message
    assert "pr_auc" in message
    assert math.isnan(result["recall"])
    assert math.isnan(result["roc_auc"])
    assert math.isnan(result["pr_auc"])
    assert result["specificity"] == pytest.approx(0.75)
    assert result["precision"] == 0.0  # one predicted positive, which is false
    assert result["n_pos"] == 0


def test_only_positives_leave_specificity_nan():
    with pytest.warns(UndefinedMetricWarning, match="specificity, roc_auc"):
        result = metrics.binary_metrics([1, 1, 1], [0.9, 0.2, 0.6], 0.5)
    assert math.isnan(result["specificity"])
    assert math.isnan(result["roc_auc"])
    assert result["recall"] == pytest.approx(2 / 3)
    assert result["pr_auc"] == 1.0


def test_no_predicted_positive_gives_nan_precision():
    with pytest.warns(UndefinedMetricWarning, match="precision"):
        result = metrics.binary_metrics([0, 1, 0, 1], [0.1, 0.2, 0.3, 0.4], 0.9)
    assert math.isnan(result["precision"])
    assert result["recall"] == 0.0
    assert result["f1"] == 0.0  # 2*0 / (0 + 0 + 2) is defined
    assert result["roc_auc"] == pytest.approx(sk.roc_auc_score([0, 1, 0, 1], [0.1, 0.2, 0.3, 0.4]))


def test_empty_input_gives_all_nan():
    with pytest.warns(UndefinedMetricWarning, match="accuracy"):
        result = metrics.binary_metrics([], [], 0.5)
    assert result["n"] == 0
    for name in (*metrics.SCORE_METRICS, "prevalence"):
        assert math.isnan(result[name]), name


@pytest.mark.parametrize(
    ("labels", "probs", "threshold", "match"),
    [
        ([0, 2, 1], [0.1, 0.2, 0.3], 0.5, "labels: expected only 0 and 1"),
        ([0, 0.5], [0.1, 0.2], 0.5, "labels: expected only 0 and 1"),
        (["stone", "no_stone"], [0.1, 0.2], 0.5, "labels: expected numbers"),
        ([0, 1], [0.1, 1.2], 0.5, "probs: expected finite probabilities"),
        ([0, 1], [0.1, float("nan")], 0.5, "probs: expected finite probabilities"),
        ([0, 1], [-0.1, 0.5], 0.5, "probs"),
        ([0, 1, 1], [0.1, 0.2], 0.5, "same length"),
        ([0, 1], [[0.9, 0.1], [0.2, 0.8]], 0.5, "probs: expected a 1-D array"),
        ([0, 1], [0.1, 0.2], 1.5, "threshold"),
        ([0, 1], [0.1, 0.2], float("nan"), "threshold"),
    ],
)
def test_invalid_input_raises(labels, probs, threshold, match):
    with pytest.raises(ValueError, match=match):
        metrics.binary_metrics(labels, probs, threshold)


# --- curves -----------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_roc_curve_matches_sklearn(seed):
    labels, probs = _random_table(seed, 80, 1)
    fpr, tpr, thresholds = metrics.roc_curve(labels, probs)
    sk_fpr, sk_tpr, sk_thresholds = sk.roc_curve(labels, probs, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)
    np.testing.assert_array_equal(thresholds, sk_thresholds)


def test_roc_curve_drop_intermediate_keeps_area():
    labels, probs = _random_table(5, 300, 2)
    full = metrics.roc_curve(labels, probs)
    reduced = metrics.roc_curve(labels, probs, drop_intermediate=True)
    assert reduced[0].size < full[0].size
    area = np.trapezoid(reduced[1], reduced[0])
    assert area == pytest.approx(sk.roc_auc_score(labels, probs), abs=1e-12)
    assert (reduced[0][0], reduced[1][0]) == (0.0, 0.0)
    assert (reduced[0][-1], reduced[1][-1]) == (1.0, 1.0)


def test_roc_curve_one_class_warns():
    with pytest.warns(UndefinedMetricWarning, match="roc_curve"):
        fpr, tpr, _ = metrics.roc_curve([1, 1], [0.2, 0.8])
    assert np.isnan(fpr).all()
    np.testing.assert_allclose(tpr, [0.0, 0.5, 1.0])


@pytest.mark.parametrize("seed", [0, 3])
def test_pr_curve_matches_sklearn(seed):
    labels, probs = _random_table(seed, 90, 1)
    precision, recall, thresholds = metrics.pr_curve(labels, probs)
    sk_precision, sk_recall, sk_thresholds = sk.precision_recall_curve(labels, probs)
    # scikit-learn orders by increasing threshold and appends the point (recall 0, precision 1).
    np.testing.assert_allclose(precision, sk_precision[:-1][::-1])
    np.testing.assert_allclose(recall, sk_recall[:-1][::-1])
    np.testing.assert_array_equal(thresholds, sk_thresholds[::-1])


# --- aggregate_by_group -----------------------------------------------------------------


def test_aggregate_by_group_hand_table():
    # Group a: labels 0, 0, probs 0.4, 0.3 -> label 0, score 0.4
    # Group b: labels 0, 1, probs 0.2, 0.9 -> label 1 (any positive slice), score 0.9
    # Group c: labels 0, 0, probs 0.1, 0.7 -> label 0, score 0.7
    groups = ["b", "a", "b", "c", "a", "c"]
    labels = [0, 0, 1, 0, 0, 0]
    probs = [0.2, 0.4, 0.9, 0.1, 0.3, 0.7]
    result = metrics.aggregate_by_group(labels, probs, groups)
    assert list(result.group_ids) == ["a", "b", "c"]
    assert list(result.labels) == [0, 1, 0]
    np.testing.assert_allclose(result.probs, [0.4, 0.9, 0.7])


def test_aggregate_by_group_positive_slice_with_low_score():
    # The positive slice scores 0.1, but the study's score is its maximum, 0.6.
    result = metrics.aggregate_by_group([1, 0], [0.1, 0.6], [7, 7])
    assert list(result.group_ids) == [7]
    assert list(result.labels) == [1]
    assert list(result.probs) == [0.6]


def test_aggregate_by_group_rejects_wrong_length():
    with pytest.raises(ValueError, match="groups"):
        metrics.aggregate_by_group([0, 1], [0.1, 0.2], ["a"])


# --- choose_threshold -------------------------------------------------------------------


def test_choose_threshold_youden_hand_table():
    # Youden J = tpr - fpr per threshold: 0.9 -> .25, 0.8 -> .5, 0.7 -> .33, 0.6 -> .42,
    # 0.4 -> .25, 0.3 -> .5, lower ones less. The tie at .5 goes to the higher threshold 0.8.
    assert metrics.choose_threshold(HAND_LABELS, HAND_PROBS) == 0.8


def test_choose_threshold_sensitivity_hand_table():
    # tpr is 0.75 from threshold 0.6 down and reaches 1.0 at 0.3.
    assert metrics.choose_threshold(HAND_LABELS, HAND_PROBS, "sensitivity", 0.75) == 0.6
    assert metrics.choose_threshold(HAND_LABELS, HAND_PROBS, "sensitivity", 0.9) == 0.3
    assert metrics.choose_threshold(HAND_LABELS, HAND_PROBS, "sensitivity", 1.0) == 0.3


def test_choose_threshold_reaches_target_on_data():
    labels, probs = _random_table(8, 400, 2)
    threshold = metrics.choose_threshold(labels, probs, method="sensitivity", target=0.9)
    result = metrics.binary_metrics(labels, probs, threshold)
    assert result["recall"] >= 0.9


def test_choose_threshold_errors():
    with pytest.raises(ValueError, match="both classes"):
        metrics.choose_threshold([1, 1], [0.2, 0.3])
    with pytest.raises(ValueError, match="method"):
        metrics.choose_threshold(HAND_LABELS, HAND_PROBS, method="f1")
    with pytest.raises(ValueError, match="target"):
        metrics.choose_threshold(HAND_LABELS, HAND_PROBS, method="sensitivity", target=0)


# --- bootstrap --------------------------------------------------------------------------


def test_bootstrap_replicate_equals_concatenated_groups():
    labels, probs, groups = _clustered_table(12, 7, seed=3)
    probs = np.round(probs, 1)  # ties across groups
    threshold, n_boot, seed = 0.5, 6, 11
    replicates = metrics.bootstrap_replicates(labels, probs, groups, threshold, n_boot, seed)

    # Rebuild each replicate from the documented draws by concatenating whole groups.
    group_ids = np.unique(groups)
    draws = np.random.default_rng(seed).integers(0, group_ids.size, (n_boot, group_ids.size))
    for b in range(n_boot):
        index = np.concatenate([np.flatnonzero(groups == group_ids[g]) for g in draws[b]])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UndefinedMetricWarning)
            expected = metrics.binary_metrics(labels[index], probs[index], threshold)
        for name in metrics.SCORE_METRICS:
            assert replicates[name][b] == pytest.approx(expected[name], abs=1e-12, nan_ok=True)


def test_bootstrap_ci_reproducible():
    labels, probs, groups = _clustered_table(30, 10, seed=1)
    first = metrics.bootstrap_ci(labels, probs, groups, 0.5, n_boot=300, seed=4)
    second = metrics.bootstrap_ci(labels, probs, groups, 0.5, n_boot=300, seed=4)
    other = metrics.bootstrap_ci(labels, probs, groups, 0.5, n_boot=300, seed=5)
    assert first == second
    assert first != other


def test_bootstrap_ci_contains_point_estimate():
    labels, probs, groups = _clustered_table(50, 40, seed=2)
    point = metrics.binary_metrics(labels, probs, 0.5)
    intervals = metrics.bootstrap_ci(labels, probs, groups, 0.5, n_boot=500, seed=0)
    for name in metrics.SCORE_METRICS:
        low, high = intervals[name]
        assert low <= point[name] <= high, name
        assert low < high, name


def test_bootstrap_resamples_whole_groups():
    # Every slice of a group is identical and groups have equal size, so a replicate drawn by
    # group is the study-level replicate repeated 5 times: every metric is the same. Drawing
    # single slices instead would give different intervals.
    study_labels, study_probs, _ = _clustered_table(40, 1, seed=6)
    study_ids = np.array([f"s{i:02d}" for i in range(40)])
    slice_labels = np.repeat(study_labels, 5)
    slice_probs = np.repeat(study_probs, 5)
    slice_groups = np.repeat(study_ids, 5)

    by_slice = metrics.bootstrap_ci(slice_labels, slice_probs, slice_groups, 0.5, 400, seed=9)
    by_study = metrics.bootstrap_ci(study_labels, study_probs, study_ids, 0.5, 400, seed=9)
    for name in metrics.SCORE_METRICS:
        np.testing.assert_allclose(by_slice[name], by_study[name], atol=1e-12, err_msg=name)

    each_slice_own_group = np.arange(slice_labels.size)
    naive = metrics.bootstrap_ci(slice_labels, slice_probs, each_slice_own_group, 0.5, 400, 9)
    assert (
        naive["roc_auc"][1] - naive["roc_auc"][0] < by_slice["roc_auc"][1] - by_slice["roc_auc"][0]
    )


def test_bootstrap_ci_wider_with_fewer_groups():
    # Same study structure, 20 studies against 200.
    few = _clustered_table(20, 10, seed=7)
    many = _clustered_table(200, 10, seed=7)
    wide = metrics.bootstrap_ci(*few, 0.5, n_boot=400, seed=0)
    narrow = metrics.bootstrap_ci(*many, 0.5, n_boot=400, seed=0)
    for name in ("accuracy", "roc_auc", "recall", "f1"):
        assert wide[name][1] - wide[name][0] > narrow[name][1] - narrow[name][0], name


def test_bootstrap_skips_undefined_replicates(caplog):
    # One positive group of ten: about 35 % of replicates draw no positive at all.
    labels = np.repeat([1] + [0] * 9, 4)
    probs = np.repeat(np.linspace(0.9, 0.0, 10), 4)
    groups = np.repeat(np.arange(10), 4)
    replicates = metrics.bootstrap_replicates(labels, probs, groups, 0.5, n_boot=500, seed=0)
    undefined = int(np.isnan(replicates["recall"]).sum())
    assert 100 < undefined < 300
    assert not np.isnan(replicates["specificity"]).any()

    with caplog.at_level("WARNING", logger="nephrolith.common.metrics"):
        intervals = metrics.bootstrap_ci(labels, probs, groups, 0.5, n_boot=500, seed=0)
    assert intervals["recall"] == (1.0, 1.0)
    assert f"recall {500 - undefined}" in caplog.text


def test_bootstrap_one_class_gives_nan_interval():
    intervals = metrics.bootstrap_ci([0, 0, 0], [0.1, 0.2, 0.3], ["a", "b", "c"], 0.5, 50)
    assert all(math.isnan(v) for v in intervals["roc_auc"])
    assert intervals["specificity"] == (1.0, 1.0)


def test_bootstrap_rejects_bad_arguments():
    with pytest.raises(ValueError, match="n_boot"):
        metrics.bootstrap_ci([0, 1], [0.1, 0.9], ["a", "b"], 0.5, n_boot=0)
    with pytest.raises(ValueError, match="level"):
        metrics.bootstrap_ci([0, 1], [0.1, 0.9], ["a", "b"], 0.5, n_boot=5, level=95)


# --- evaluate ---------------------------------------------------------------------------


def test_evaluate_structure_and_values():
    labels, probs, groups = _clustered_table(20, 6, seed=4)
    report = metrics.evaluate(labels, probs, groups, 0.5, n_boot=200, seed=1)
    json.dumps(report, allow_nan=False)

    assert set(report) == {"threshold", "n_boot", "seed", "level", "image", "group", "per_site"}
    assert report["per_site"] == {}
    image = report["image"]
    expected = metrics.binary_metrics(labels, probs, 0.5)
    for name, value in expected.items():
        assert image["metrics"][name] == pytest.approx(value), name
    assert image["confusion"]["matrix"] == [
        [expected["tn"], expected["fp"]],
        [expected["fn"], expected["tp"]],
    ]
    assert image["confusion"]["class_names"] == ["no_stone", "stone"]
    expected_ci = metrics.bootstrap_ci(labels, probs, groups, 0.5, n_boot=200, seed=1)
    for name in metrics.SCORE_METRICS:
        np.testing.assert_allclose(image["ci"][name], expected_ci[name])
        assert image["ci_replicates_used"][name] == 200
    assert image["roc"]["thresholds"][0] is None  # the inf start point
    assert image["roc"]["fpr"][-1] == 1.0

    group = report["group"]
    assert group["metrics"]["n"] == 20
    assert group["metrics"]["n_pos"] == 10


def test_evaluate_per_site_keeps_equal_group_ids_apart():
    # Both sites call their studies p0 and p1, but overall there are four studies, not two.
    labels = [1, 0, 0, 0, 1, 1, 0, 0]
    probs = [0.9, 0.2, 0.3, 0.1, 0.8, 0.4, 0.6, 0.2]
    groups = ["p0", "p0", "p1", "p1", "p0", "p0", "p1", "p1"]
    sites = ["A", "A", "A", "A", "B", "B", "B", "B"]
    report = metrics.evaluate(labels, probs, groups, 0.5, sites=sites, n_boot=50)

    assert report["group"]["metrics"]["n"] == 4
    assert report["group"]["metrics"]["n_pos"] == 2
    assert set(report["per_site"]) == {"A", "B"}
    site_a = report["per_site"]["A"]
    assert site_a["image"]["metrics"]["n"] == 4
    # Site A studies: p0 (label 1, score 0.9), p1 (label 0, score 0.3): both correct.
    assert site_a["group"]["metrics"]["accuracy"] == 1.0
    # Site B studies: p0 (label 1, score 0.8), p1 (label 0, score 0.6): p1 is a false positive.
    assert report["per_site"]["B"]["group"]["metrics"]["fp"] == 1


def test_evaluate_one_class_site_gives_none():
    labels = [1, 0, 1, 0, 0, 0]
    probs = [0.9, 0.2, 0.7, 0.4, 0.1, 0.3]
    groups = ["a", "a", "b", "b", "c", "c"]
    sites = ["X", "X", "X", "X", "Y", "Y"]
    with pytest.warns(UndefinedMetricWarning):
        report = metrics.evaluate(labels, probs, groups, 0.5, sites=sites, n_boot=50)
    json.dumps(report, allow_nan=False)
    site_y = report["per_site"]["Y"]["image"]
    assert site_y["metrics"]["roc_auc"] is None
    assert site_y["metrics"]["recall"] is None
    assert site_y["ci"]["roc_auc"] == [None, None]
    assert site_y["ci_replicates_used"]["roc_auc"] == 0
    assert site_y["roc"] is None


def test_to_jsonable_converts_numpy_and_nan():
    value = {"a": np.float32(0.5), "b": (np.int64(3), float("nan")), 4: np.array([np.inf, 1.0])}
    assert metrics.to_jsonable(value) == {"a": 0.5, "b": [3, None], "4": [None, 1.0]}
