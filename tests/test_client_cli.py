"""End-to-end tests of `nephrolith-client` on a small subset of the real kidney CT slices."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

CLIENT = str(Path(sys.executable).with_name("nephrolith-client"))

# Two groups per class and split role, eight slices each: 64 real slices in all.
GROUPS = {
    "train": ["stone-g04", "stone-g05", "normal-g01", "tumor-g03"],
    "val": ["stone-g23", "cyst-g11"],
    "test": ["stone-g11", "normal-g02"],
}
SLICES_PER_GROUP = 8


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NEPHROLITH_LOG_LEVEL": "WARNING", "COLUMNS": "200"}
    return subprocess.run(
        [CLIENT, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def small_manifest(islam_subset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A manifest of 64 real slices from 8 scan groups with a fixed group split."""
    folder = tmp_path_factory.mktemp("islam-small")
    split_of = {g: split for split, groups in GROUPS.items() for g in groups}
    taken: dict[str, int] = {}
    rows = []
    with (islam_subset / "series_groups.csv").open(newline="") as handle:
        for row in csv.DictReader(handle):
            group = row["series_group"]
            if group not in split_of or taken.get(group, 0) >= SLICES_PER_GROUP:
                continue
            taken[group] = taken.get(group, 0) + 1
            rows.append(
                {
                    "path": str(islam_subset / row["path"]),
                    "label": row["label"],
                    "patient_id": "",
                    "split": split_of[group],
                    "group": group,
                }
            )
    manifest = folder / "manifest.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, ["path", "label", "patient_id", "split", "group"])
        writer.writeheader()
        writer.writerows(rows)
    assert len(rows) == SLICES_PER_GROUP * sum(len(g) for g in GROUPS.values())
    return manifest


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from nephrolith.common.config import to_dict
    from nephrolith.common.model import tiny_model_config

    path = tmp_path_factory.mktemp("config") / "tiny.json"
    model = to_dict(tiny_model_config(64))
    path.write_text(
        json.dumps(
            {
                "model": model,
                "preprocess": {"image_size": 64},
                "train": {"epochs": 2, "batch_size": 16, "patience": 0},
            }
        )
    )
    return path


@pytest.fixture(scope="module")
def trained_run(small_manifest: Path, tiny_config: Path) -> Path:
    out = small_manifest.parent / "run"
    result = _run(
        "train-local",
        str(small_manifest.parent),
        "--manifest",
        str(small_manifest),
        "--config",
        str(tiny_config),
        "--out",
        str(out),
        cwd=small_manifest.parent,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_check_data_writes_group_manifest(islam_subset: Path, tmp_path: Path):
    manifest = tmp_path / "manifest.csv"

    result = _run("check-data", str(islam_subset), "--write-manifest", str(manifest), cwd=tmp_path)

    assert result.returncode == 0, result.stderr[-3000:]
    assert "1914" in result.stderr
    with manifest.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 1914
    sides: dict[str, set[str]] = {}
    for row in rows:
        sides.setdefault(row["group"], set()).add(row["split"])
    assert all(len(s) == 1 for s in sides.values()), "a scan group landed in two splits"
    assert {row["split"] for row in rows} == {"train", "val", "test"}


def test_check_data_lists_rejects_and_keeps_good_files(islam_subset: Path, tmp_path: Path):
    stone = tmp_path / "ct" / "stone"
    stone.mkdir(parents=True)
    good = sorted((islam_subset / "images" / "Stone").glob("*.jpg"))[:2]
    for path in good:
        (stone / path.name).write_bytes(path.read_bytes())
    (stone / "empty.jpg").write_bytes(b"")
    (stone / "notes.png").write_text("not an image")

    result = _run("check-data", str(tmp_path / "ct"), cwd=tmp_path)

    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 rejected files" in result.stderr
    assert "empty.jpg" in result.stderr
    assert "notes.png" in result.stderr


def test_train_local_writes_checkpoint(trained_run: Path):
    metadata = json.loads((trained_run / "checkpoint" / "metadata.json").read_text())

    assert metadata["class_names"] == ["no_stone", "stone"]
    assert 0.0 <= metadata["threshold"] <= 1.0
    assert metadata["preprocess"]["image_size"] == 64
    assert metadata["provenance"]["n_train"] == 32
    assert metadata["provenance"]["n_val"] == 16
    history = json.loads((trained_run / "history.json").read_text())
    assert [entry["epoch"] for entry in history] == [1, 2]


def test_evaluate_writes_report(trained_run: Path, small_manifest: Path):
    out = trained_run / "report"

    result = _run(
        "evaluate",
        str(trained_run / "checkpoint"),
        str(small_manifest.parent),
        "--manifest",
        str(small_manifest),
        "--out",
        str(out),
        "--n-boot",
        "50",
        cwd=small_manifest.parent,
    )

    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["image"]["metrics"]["n"] == 16
    assert report["group"]["metrics"]["n"] == 2
    for name in ("report.html", "roc.png", "confusion.png"):
        assert (out / name).stat().st_size > 0


def test_predict_writes_json_lines(trained_run: Path, islam_subset: Path, tmp_path: Path):
    image = sorted((islam_subset / "images" / "Stone").glob("*.jpg"))[0]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 truncated")

    result = _run(
        "predict",
        str(trained_run / "checkpoint"),
        str(image),
        str(broken),
        "--out",
        str(tmp_path / "pred"),
        cwd=tmp_path,
    )

    assert result.returncode == 0, result.stderr[-3000:]
    lines = [
        json.loads(x) for x in (tmp_path / "pred" / "predictions.jsonl").read_text().splitlines()
    ]
    assert len(lines) == 2
    assert 0.0 <= lines[0]["probability"] <= 1.0
    assert lines[0]["label"] in ("stone", "no_stone")
    assert (tmp_path / "pred" / lines[0]["heatmap"]).stat().st_size > 0
    assert "broken.jpg" in lines[1]["error"]


def test_train_local_reports_missing_manifest_column(tmp_path: Path):
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("path,label\nx.jpg,stone\n")

    result = _run(
        "train-local",
        str(tmp_path),
        "--manifest",
        str(manifest),
        "--out",
        str(tmp_path / "run"),
        cwd=tmp_path,
    )

    assert result.returncode == 1
    assert "patient_id" in result.stderr


@pytest.mark.slow
def test_cross_validate_tests_every_group_once(small_manifest: Path, tiny_config: Path):
    out = small_manifest.parent / "cv"

    result = _run(
        "cross-validate",
        str(small_manifest.parent),
        "--manifest",
        str(small_manifest),
        "--config",
        str(tiny_config),
        "--folds",
        "2",
        "--n-boot",
        "50",
        "--out",
        str(out),
        cwd=small_manifest.parent,
    )

    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    folds = json.loads((out / "folds.json").read_text())
    assert sum(f["n_test"] for f in folds) == 64
    assert sum(f["n_test_groups"] for f in folds) == 8
    assert report["group"]["metrics"]["n"] == 8
