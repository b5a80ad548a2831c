"""Tests of folder discovery, manifests, folder checks and split loading, on real and tmp files."""

from __future__ import annotations

import csv
import logging
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
from nephrolith.common import data
from nephrolith.common.config import PreprocessConfig
from nephrolith.common.errors import DataError
from nephrolith.common.manifest import Record
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

SMALL = PreprocessConfig(image_size=32, clahe=False, unsharp_amount=0.0)


def write_ct_series(
    folder: Path, n_slices: int, size: int = 24, series_uid: str | None = None
) -> None:
    """Write an axial CT series (int16, slope 1, intercept -1024, 2 mm apart) into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    study_uid = generate_uid()
    for index in range(n_slices):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(
            str(folder / f"slice{index:03d}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128
        )
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.Modality = "CT"
        ds.InstanceNumber = index + 1
        ds.ImagePositionPatient = [0.0, 0.0, 2.0 * index]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing = [0.8, 0.8]
        ds.SliceThickness = 2.0
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleSlope = 1
        ds.RescaleIntercept = -1024
        pixels = np.full((size, size), 1024 + 40, dtype=np.int16)
        pixels[8:12, 8:12] = 1024 + 800 + 50 * index
        ds.PixelData = pixels.tobytes()
        ds.save_as(folder / f"slice{index:03d}.dcm", enforce_file_format=True)


def write_png(path: Path, value: int = 100, size: int = 20) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = np.full((size, size), value, dtype=np.uint8)
    image[5:9, 5:9] = 255
    if not cv2.imwrite(str(path), image):
        raise OSError(f"could not write {path}")


def write_manifest_rows(folder: Path, header: list[str], rows: list[list[str]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "manifest.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return folder / "manifest.csv"


# -- discovery on the real data -----------------------------------------------------------------


def test_discover_islam_subset_counts(islam_subset: Path) -> None:
    records = data.discover(islam_subset)

    assert len(records) == 1914
    assert len({r.group for r in records}) == 52
    assert sum(r.binary_label for r in records) == 494
    assert Counter(r.label for r in records) == {
        "normal": 500,
        "cyst": 420,
        "stone": 494,
        "tumor": 500,
    }
    assert all(r.path.is_file() and r.path.is_absolute() for r in records)
    assert all(r.patient_id is None and r.split is None for r in records)


def test_discover_islam_groups_from_series_groups(islam_subset: Path) -> None:
    records = {r.path.name: r for r in data.discover(islam_subset)}

    # First rows of series_groups.csv: Cyst 1 alone in cyst-g01, Cyst 2 and 3 in cyst-g02.
    assert records["Cyst- (1).jpg"].group == "cyst-g01"
    assert records["Cyst- (2).jpg"].group == "cyst-g02"
    assert records["Cyst- (3).jpg"].group == "cyst-g02"


def test_discover_stone_boxes_linked_groups(stone_boxes: Path) -> None:
    records = data.discover(stone_boxes)
    by_number = {int(r.path.name.split("---")[1].split("-")[0]): r for r in records}

    assert len(records) == 335
    assert all(r.binary_label == 1 for r in records)
    # Linked scans take the subset's group id; the others keep their own isb-gNN.
    assert {by_number[n].group for n in range(1331, 1346)} == {"stone-g14"}
    assert {by_number[n].group for n in (1346, 1374, 1375, 1376, 1377)} == {"stone-g01"}
    assert by_number[1000].group == "isb-g01"
    assert len({r.group for r in records}) == 18


def test_discover_accepts_manifest_path(islam_subset: Path) -> None:
    assert len(data.discover(islam_subset / "manifest.csv")) == 1914


def test_discover_missing_folder_raises(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        data.discover(tmp_path / "absent")


# -- manifests ----------------------------------------------------------------------------------


def test_manifest_missing_columns_named(tmp_path: Path) -> None:
    write_manifest_rows(tmp_path, ["path", "label"], [["a.png", "stone"]])

    with pytest.raises(DataError, match=r"missing column\(s\) patient_id, split") as info:
        data.discover(tmp_path)
    assert "manifest.csv" in str(info.value)


def test_manifest_rejects_named(tmp_path: Path) -> None:
    write_png(tmp_path / "img" / "a.png")
    write_png(tmp_path / "img" / "b.png")
    write_png(tmp_path / "img" / "c.png")
    write_png(tmp_path / "img" / "d.png")
    write_manifest_rows(
        tmp_path,
        ["path", "label", "patient_id", "split"],
        [
            ["img/a.png", "Stone", "p1", "train"],
            ["img/missing.png", "stone", "p1", ""],
            ["img/b.png", "kidney", "p2", ""],
            ["img/a.png", "stone", "p1", ""],
            ["img/c.png", "normal", "p3", "holdout"],
            ["img/d.png", "", "p4", ""],
        ],
    )

    records, rejects = data.discover_with_rejects(tmp_path)
    reasons = dict(rejects)

    assert [r.path.name for r in records] == ["a.png", "d.png"]
    assert (
        records[0].label == "stone" and records[0].binary_label == 1 and records[0].split == "train"
    )
    assert records[1].label is None
    assert records[1].binary_label is None
    assert "file not found (line 3 of manifest.csv)" in reasons["img/missing.png"]
    assert "unknown label 'kidney'" in reasons["img/b.png"]
    assert "accepted labels: 0, 1, cyst, negative, no_stone, normal" in reasons["img/b.png"]
    assert "unknown split 'holdout'" in reasons["img/c.png"]
    assert len(rejects) == 4
    assert any("listed twice in manifest.csv (lines 2 and 5)" in reason for _, reason in rejects)


def test_manifest_group_priority(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    for name in "abcd":
        write_png(tmp_path / f"{name}.png")
    write_manifest_rows(
        tmp_path,
        ["path", "label", "patient_id", "split", "group", "site"],
        [
            ["a.png", "stone", "p1", "", "g1", "h1"],
            ["b.png", "stone", "", "", "g1", ""],
            ["c.png", "normal", "", "", "", ""],
            ["d.png", "normal", "", "", "", ""],
        ],
    )
    with open(tmp_path / "series_groups.csv", "w", encoding="utf-8") as handle:
        handle.write("path,series_group\nc.png,scan7\n")

    with caplog.at_level(logging.WARNING):
        records = {r.path.name: r for r in data.discover(tmp_path)}

    assert records["a.png"].group == "p1"
    assert records["a.png"].site == "h1"
    assert records["b.png"].group == "g1"
    assert records["c.png"].group == "scan7"
    assert records["d.png"].group == "d.png"
    assert "1 of 4 records have no patient_id, group or series group" in caplog.text
    assert "leakage" in caplog.text


def test_write_manifest_round_trip(tmp_path: Path) -> None:
    for name in ("a.png", "sub/b.png", "c.png"):
        write_png(tmp_path / name)
    outside = tmp_path.parent / f"{tmp_path.name}-outside.png"
    write_png(outside)
    records = [
        Record((tmp_path / "a.png").resolve(), "stone", 1, "p1", "p1", "train", "h1"),
        Record((tmp_path / "sub/b.png").resolve(), "cyst", 0, None, "scan2", "test", None),
        Record((tmp_path / "c.png").resolve(), None, None, None, "c.png", None, None),
        Record(outside.resolve(), "normal", 0, None, "far", "val", None),
    ]

    data.write_manifest(records, tmp_path / "manifest.csv")
    lines = (tmp_path / "manifest.csv").read_text(encoding="utf-8").splitlines()
    again = data.discover(tmp_path)

    assert lines[0] == "path,label,patient_id,split,group,site"
    assert lines[1] == "a.png,stone,p1,train,p1,h1"
    assert lines[2] == "sub/b.png,cyst,,test,scan2,"
    assert lines[4].startswith(outside.resolve().as_posix())
    assert again == records
    outside.unlink()


# -- class sub-folders and the folder check -----------------------------------------------------


@pytest.fixture()
def class_folder(tmp_path: Path) -> Path:
    """A class-folder layout with good images, a DICOM series and four kinds of bad entries."""
    root = tmp_path / "site"
    write_png(root / "stone" / "s1.png", 120)
    write_png(root / "Normal" / "n1.png", 60)
    write_png(root / "Normal" / "n2.jpg", 80)
    write_ct_series(root / "stone" / "patient7", 3)
    (root / "stone" / "empty.jpg").write_bytes(b"")
    (root / "Normal" / "notes.png").write_text("this is not an image\n", encoding="utf-8")
    (root / "Normal" / "scan.bmp").write_bytes(b"BM" + bytes(60))
    write_png(root / "misc" / "x.png")
    write_png(root / "loose.png")
    (root / "README.md").write_text("site data\n", encoding="utf-8")
    return root


def test_class_folders_discovered(class_folder: Path) -> None:
    records, rejects = data.discover_with_rejects(class_folder)
    by_name = {r.path.name: r for r in records}
    reasons = dict(rejects)

    assert sorted(by_name) == ["empty.jpg", "n1.png", "n2.jpg", "notes.png", "patient7", "s1.png"]
    assert by_name["patient7"].is_series and by_name["patient7"].label == "stone"
    assert by_name["patient7"].group == "stone/patient7"
    assert by_name["n1.png"].label == "normal"
    assert by_name["n1.png"].binary_label == 0
    assert "'.bmp'" in reasons["Normal/scan.bmp"]
    assert "class folder name 'misc' is not a known label" in reasons["misc/"]
    assert "outside a class folder" in reasons["loose.png"]
    assert len(rejects) == 3


def test_series_folder_with_two_series_rejected(tmp_path: Path) -> None:
    write_ct_series(tmp_path / "stone" / "mixed", 2, series_uid="1.2.3.1")
    write_ct_series(tmp_path / "stone" / "mixed2", 2, series_uid="1.2.3.2")
    for file in (tmp_path / "stone" / "mixed2").iterdir():
        file.rename(tmp_path / "stone" / "mixed" / f"b-{file.name}")

    records, rejects = data.discover_with_rejects(tmp_path)

    assert records == []
    assert "holds 2 DICOM series" in dict(rejects)["stone/mixed/"]


def test_class_folder_wrapper_descended(tmp_path: Path) -> None:
    write_png(tmp_path / "images" / "Stone" / "a.png")
    write_png(tmp_path / "images" / "Cyst" / "b.png")

    records = data.discover(tmp_path)

    assert sorted((r.path.name, r.label) for r in records) == [
        ("a.png", "stone"),
        ("b.png", "cyst"),
    ]


def test_check_folder_rejects_bad_files(class_folder: Path) -> None:
    result = data.check_folder(class_folder)
    reasons = dict(result.rejects)

    assert sorted(r.path.name for r in result.records_ok) == [
        "n1.png",
        "n2.jpg",
        "patient7",
        "s1.png",
    ]
    assert "stone/empty.jpg" in reasons
    assert "empty" in reasons["stone/empty.jpg"].lower()
    assert "Normal/notes.png" in reasons
    assert len(result.rejects) == 5
    assert not result.ok
    summary = result.summary
    assert summary["labels"] == {"normal": 2, "stone": 2}
    assert summary["binary"] == {"stone": 2, "no_stone": 2}
    assert summary["intensity"] == {"display": 3, "hu": 1}
    assert summary["sizes"]["20x20"] == 3
    assert summary["sizes"]["3x24x24"] == 1
    assert summary["n_slices"] == 6
    assert any("grouped by their own file" in w for w in summary["warnings"])
    assert any("mixes HU images" in w for w in summary["warnings"])


def test_check_folder_real_subset(islam_subset: Path) -> None:
    result = data.check_folder(islam_subset)

    assert len(result.records_ok) == 1914
    assert result.rejects == []
    assert result.summary["sizes"] == {"256x256": 1914}
    assert result.summary["intensity"] == {"display": 1914}
    assert result.summary["n_groups"] == 52
    assert result.summary["groups_per_class"] == {"stone": 23, "no_stone": 29}
    assert result.summary["warnings"] == []


# -- load_split ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def twenty_real(islam_subset: Path) -> list[Record]:
    """10 stone and 10 normal real slices, split 12 train / 8 test by group."""
    records = data.discover(islam_subset)
    stones = [r for r in records if r.label == "stone"][:10]
    normals = [r for r in records if r.label == "normal"][:10]
    chosen = stones + normals
    return [
        Record(r.path, r.label, r.binary_label, None, r.group, "test" if i % 5 < 2 else "train")
        for i, r in enumerate(chosen)
    ]


def test_load_split_real_shapes(twenty_real: list[Record]) -> None:
    x, y, groups = data.load_split(twenty_real, "train", SMALL)

    expected = [r for r in twenty_real if r.split == "train"]
    assert x.shape == (12, 32, 32, 3)
    assert x.dtype == np.float32
    assert y.dtype == np.int64
    assert y.tolist() == [r.binary_label for r in expected]
    assert groups == [r.group for r in expected]
    assert x.min() >= 0.0
    assert x.max() <= 255.0
    assert np.array_equal(x[..., 0], x[..., 2])


def test_load_split_cache_keyed(twenty_real: list[Record], tmp_path: Path) -> None:
    first = data.load_split(twenty_real, "test", SMALL, cache_dir=tmp_path)
    cached = list(tmp_path.glob("test-*.npz"))
    second = data.load_split(twenty_real, "test", SMALL, cache_dir=tmp_path)
    other_cfg = data.load_split(
        twenty_real, "test", PreprocessConfig(image_size=16), cache_dir=tmp_path
    )

    assert len(cached) == 1
    assert np.array_equal(first[0], second[0])
    assert np.array_equal(first[1], second[1])
    assert first[2] == second[2]
    assert other_cfg[0].shape == (8, 16, 16, 3)
    assert len(list(tmp_path.glob("test-*.npz"))) == 2


def test_load_split_series_slices(tmp_path: Path) -> None:
    write_ct_series(tmp_path / "p1", 4)
    series = Record(tmp_path / "p1", "stone", 1, "p1", "p1", "train")
    per_slice = Record(tmp_path / "p1", "stone", 1, "p1", "p1", "train", slice_labels=(0, 1, 1, 0))
    wrong = Record(tmp_path / "p1", "stone", 1, "p1", "p1", "train", slice_labels=(0, 1))

    x, y, groups = data.load_split([series], "train", SMALL)
    _, y_slices, _ = data.load_split([per_slice], "train", SMALL)

    assert x.shape == (4, 32, 32, 3)
    assert y.tolist() == [1, 1, 1, 1]
    assert groups == ["p1"] * 4
    assert y_slices.tolist() == [0, 1, 1, 0]
    with pytest.raises(DataError, match="2 per-slice labels for 4 slices"):
        data.load_split([wrong], "train", SMALL)


def test_load_split_bad_records(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_png(tmp_path / "good.png")
    (tmp_path / "bad.png").write_bytes(b"")
    good = Record(tmp_path / "good.png", "stone", 1, None, "g", "val")
    bad = Record(tmp_path / "bad.png", "normal", 0, None, "b", "val")

    with caplog.at_level(logging.WARNING):
        x, y, _ = data.load_split([good, bad], "val", SMALL)

    assert x.shape == (1, 32, 32, 3)
    assert y.tolist() == [1]
    assert "bad.png" in caplog.text
    with pytest.raises(DataError, match="none of 1 records could be read"):
        data.load_split([bad], "val", SMALL)
    with pytest.raises(DataError, match="no records in split 'test'"):
        data.load_split([good], "test", SMALL)
    with pytest.raises(DataError, match="no label"):
        data.load_split([Record(good.path, None, None, None, "g", "val")], "val", SMALL)


def test_load_split_spawn_workers(twenty_real: list[Record]) -> None:
    sequential = data.load_split(twenty_real, None, SMALL)
    pooled = data.load_split(twenty_real, None, SMALL, workers=2)

    assert np.array_equal(sequential[0], pooled[0])
    assert sequential[1].tolist() == pooled[1].tolist()
    assert sequential[2] == pooled[2]


def test_check_folder_spawn_workers(class_folder: Path) -> None:
    sequential = data.check_folder(class_folder)
    pooled = data.check_folder(class_folder, workers=2)

    assert pooled.records_ok == sequential.records_ok
    assert pooled.rejects == sequential.rejects
    assert pooled.summary == sequential.summary
