"""Tests of nephrolith.common.report: files written, valid PNGs, self-contained HTML."""

from __future__ import annotations

import base64
import json
import re

import cv2
import numpy as np
import pytest
from PIL import Image

from nephrolith.common import metrics, report
from nephrolith.common.metrics import UndefinedMetricWarning


ALL_COUNTS = dict.fromkeys(("n", "n_pos", "n_neg", "tp", "fp", "tn", "fn"), 0)


@pytest.fixture(scope="module")
def evaluation() -> dict:
    rng = np.random.default_rng(0)
    n_groups, per_group = 24, 8
    labels = np.repeat(np.arange(n_groups) % 2, per_group)
    groups = np.repeat([f"study-{i:02d}" for i in range(n_groups)], per_group)
    sites = np.repeat(["north", "south"], n_groups * per_group // 2)
    probs = np.clip(0.3 + 0.35 * labels + rng.normal(0, 0.15, labels.size), 0, 1)
    return metrics.evaluate(labels, probs, groups, 0.5, sites=sites, n_boot=200, seed=0)


def _assert_png(path, min_width=200):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.width >= min_width
    pixels = cv2.imread(str(path))
    assert pixels is not None
    assert pixels.std() > 0  # not a blank canvas


def test_write_report_files(tmp_path, evaluation):
    paths = report.write_report(evaluation, tmp_path / "out", "Test run")

    assert set(paths) == {"json", "roc", "confusion", "html"}
    for path in paths.values():
        assert path.is_file()
        assert path.parent == tmp_path / "out"
    assert paths["json"].name == "report.json"
    _assert_png(paths["roc"])
    _assert_png(paths["confusion"])
    assert json.loads(paths["json"].read_text()) == evaluation


def test_html_contains_metric_values(tmp_path, evaluation):
    paths = report.write_report(evaluation, tmp_path, "Test run")
    page = paths["html"].read_text(encoding="utf-8")

    for level in ("image", "group"):
        section = evaluation[level]
        for name in metrics.SCORE_METRICS:
            assert f"{section['metrics'][name]:.3f}" in page, (level, name)
            low, high = section["ci"][name]
            assert f"[{low:.3f}, {high:.3f}]" in page, (level, name)
    assert f"<td>{evaluation['image']['metrics']['tp']}</td>" in page
    site_auc = evaluation["per_site"]["north"]["image"]["metrics"]["roc_auc"]
    assert f"{site_auc:.3f}" in page
    assert "north" in page
    assert "south" in page


def test_html_is_self_contained(tmp_path, evaluation):
    paths = report.write_report(evaluation, tmp_path, "Test run")
    page = paths["html"].read_text(encoding="utf-8")

    assert not re.search(r"https?://", page)
    assert "<script" not in page
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 2
    assert base64.b64decode(images[0]) == paths["roc"].read_bytes()
    assert not re.findall(r'src="(?!data:)', page)


def test_html_escapes_title(tmp_path, evaluation):
    paths = report.write_report(evaluation, tmp_path, "<b>site & test</b>")
    page = paths["html"].read_text(encoding="utf-8")
    assert "&lt;b&gt;site &amp; test&lt;/b&gt;" in page
    assert "<b>site" not in page


def test_learning_curve_written_with_history(tmp_path, evaluation):
    history = [
        {"round": 1, "loss": 0.69, "val_auc": 0.61, "note": "warm-up", "seconds": 41.5},
        {"round": 2, "loss": 0.52, "val_auc": 0.74},
        {"round": 3, "loss": 0.47, "val_auc": None},
    ]
    paths = report.write_report({**evaluation, "history": history}, tmp_path, "Rounds")
    assert "learning_curve" in paths
    _assert_png(paths["learning_curve"])
    page = paths["html"].read_text(encoding="utf-8")
    assert len(re.findall(r"data:image/png;base64,", page)) == 3
    assert json.loads(paths["json"].read_text())["history"] == history


def test_history_without_numbers_writes_no_curve(tmp_path, evaluation):
    history = [{"epoch": 1, "seconds": 12.0, "val_auc": None}]
    paths = report.write_report({**evaluation, "history": history}, tmp_path, "t")
    assert "learning_curve" not in paths
    assert not (tmp_path / "learning_curve.png").exists()


def test_one_class_report_shows_na(tmp_path):
    with pytest.warns(UndefinedMetricWarning):
        evaluation = metrics.evaluate(
            [0, 0, 0, 0], [0.1, 0.6, 0.2, 0.3], ["a", "a", "b", "b"], 0.5, n_boot=20
        )
    paths = report.write_report(evaluation, tmp_path, "No stones")
    page = paths["html"].read_text(encoding="utf-8")
    assert "n/a" in page
    _assert_png(paths["roc"])
    assert json.loads(paths["json"].read_text())["image"]["metrics"]["roc_auc"] is None


def test_report_with_nan_is_written_as_null(tmp_path, evaluation):
    # A caller may add raw floats, but NaN must not reach the JSON file as a bare NaN token.
    paths = report.write_report({**evaluation, "extra": float("nan")}, tmp_path, "t")
    text = paths["json"].read_text()
    assert "NaN" not in text
    assert json.loads(text)["extra"] is None


@pytest.mark.parametrize(
    ("bad_report", "match"),
    [
        ([], "report: expected a dict"),
        ({"image": {"metrics": ALL_COUNTS}}, r"report\['group'\]"),
        ({"image": {}, "group": {"metrics": {}}}, r"report\['image'\]"),
        ({"image": {"metrics": {}}, "group": {"metrics": {}}}, "missing n, n_pos"),
    ],
)
def test_malformed_report_raises(tmp_path, bad_report, match):
    with pytest.raises(ValueError, match=match):
        report.write_report(bad_report, tmp_path, "t")


def test_malformed_history_raises(tmp_path, evaluation):
    with pytest.raises(ValueError, match="history"):
        report.write_report({**evaluation, "history": "epoch 1"}, tmp_path, "t")


def test_learning_curve_leaves_out_timing_keys():
    history = [
        {"epoch": 1, "loss": 0.7, "val_loss": 0.8, "val_auc": 0.6, "seconds": 40.0, "note": "a"},
        {"epoch": 2, "loss": 0.5, "val_loss": 0.6, "val_auc": None, "images_per_s": 12.5},
    ]
    x_values, series = report._history_series(history)
    assert x_values == [1.0, 2.0]
    assert set(series) == {"loss", "val_loss", "val_auc"}
    assert series["loss"] == [0.7, 0.5]
    assert series["val_auc"][0] == 0.6
    assert np.isnan(series["val_auc"][1])
