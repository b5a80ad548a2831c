"""Dataset records, source labels and the manifest CSV (read, write, series groups)."""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from nephrolith.common.constants import NEGATIVE_LABELS, POSITIVE_LABELS
from nephrolith.common.errors import DataError

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.csv"
SERIES_GROUPS_NAME = "series_groups.csv"
MANIFEST_REQUIRED = ("path", "label", "patient_id", "split")
MANIFEST_COLUMNS = ("path", "label", "patient_id", "split", "group", "site")
SPLIT_NAMES = ("train", "val", "test")
SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}
ACCEPTED_LABELS = tuple(sorted(NEGATIVE_LABELS | POSITIVE_LABELS))


Reject = tuple[str, str]


@dataclass(frozen=True)
class Record:
    """One labelled study: an image file, a volume file or a DICOM series folder.

    Attributes:
        path: absolute path of the file, or of the folder for a DICOM series.
        label: source label in lower case (for example "normal", "cyst", "stone"),
            None when the study is unlabelled.
        binary_label: 1 for stone, 0 for no stone, None when unlabelled.
        patient_id: patient identifier from the manifest, None when unknown.
        group: unit that must stay on one side of a split and one site of a
            partition: the patient id, else a scan group, else the file's own path.
        split: "train", "val", "test" or None when not assigned yet.
        site: hospital the study belongs to, None when not assigned.
        slice_labels: per-slice binary labels of a volume or series in slice order;
            None means every slice takes `binary_label`.
    """

    path: Path
    label: str | None
    binary_label: int | None
    patient_id: str | None
    group: str
    split: str | None = None
    site: str | None = None
    slice_labels: tuple[int, ...] | None = None

    @property
    def is_series(self) -> bool:
        """True when the record is a folder holding one DICOM series."""
        return self.path.is_dir()


def binary_label_of(label: str) -> int:
    """Map a source label to 1 (stone) or 0 (no stone).

    Raises:
        DataError: when the label is in neither constants.POSITIVE_LABELS nor
            constants.NEGATIVE_LABELS.
    """
    key = label.strip().lower()
    if key in POSITIVE_LABELS:
        return 1
    if key in NEGATIVE_LABELS:
        return 0
    raise DataError(
        f"unknown label {label!r}; accepted labels: {', '.join(ACCEPTED_LABELS)} "
        "(fix the label or the class folder name)"
    )


def normalize_split(value: str | None) -> str | None:
    """Return "train", "val", "test" or None for an empty value.

    Raises:
        DataError: on any other value.
    """
    key = (value or "").strip().lower()
    if not key:
        return None
    if key not in SPLIT_ALIASES:
        raise DataError(
            f"unknown split {value!r}; expected one of {', '.join(SPLIT_NAMES)} or empty"
        )
    return SPLIT_ALIASES[key]


def relative_name(path: Path, folder: Path) -> str:
    """Return `path` relative to `folder` in POSIX form, or the absolute path when outside it."""
    try:
        return path.resolve().relative_to(folder.resolve()).as_posix()
    except ValueError:
        return path.resolve().as_posix()


# -- series groups ------------------------------------------------------------------------------


def read_series_groups(folder: Path) -> dict[str, str]:
    """Read `series_groups.csv` of a folder into {relative path: group id}.

    A non-empty `linked_islam_subset_group` column wins over `series_group`, so a
    scan continued in another folder (the Islam stone-boxes folder) maps to the
    group id of its other part and both parts stay on one side of a split.

    Returns:
        An empty dict when the file does not exist.

    Raises:
        DataError: when the file lacks the `path` or `series_group` column.
    """
    table = folder / SERIES_GROUPS_NAME
    if not table.is_file():
        return {}
    with open(table, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = [c.strip().lower() for c in reader.fieldnames or []]
        missing = [c for c in ("path", "series_group") if c not in columns]
        if missing:
            raise DataError(
                f"{table}: missing column(s) {', '.join(missing)}; expected at least "
                f"path,series_group, got {','.join(columns) or 'no header'}"
            )
        groups: dict[str, str] = {}
        for row in reader:
            row = {k.strip().lower(): (v or "").strip() for k, v in row.items() if k}
            group = row.get("linked_islam_subset_group") or row["series_group"]
            if row["path"] and group:
                groups[Path(row["path"]).as_posix()] = group
    logger.info("%s: %d paths in %d scan groups", table, len(groups), len(set(groups.values())))
    return groups


def choose_group(
    rel: str, patient_id: str | None, group: str | None, series_groups: dict[str, str]
) -> tuple[str, bool]:
    """Return (group id, True when it fell back to the file's own path)."""
    if patient_id:
        return patient_id, False
    if group:
        return group, False
    if rel in series_groups:
        return series_groups[rel], False
    return rel, True


def warn_image_grouping(n_by_image: int, n_total: int, folder: Path) -> None:
    """Log the leakage warning for records grouped by their own file."""
    if n_by_image:
        logger.warning(
            "%s: %d of %d records have no patient_id, group or series group and are grouped "
            "by their own file; neighbouring slices of one scan can then land in different "
            "splits (leakage). Add patient_id or group to manifest.csv, or a series_groups.csv",
            folder,
            n_by_image,
            n_total,
        )


# -- manifest.csv -------------------------------------------------------------------------------


def read_manifest(table: Path) -> tuple[list[Record], list[Reject]]:
    """Read a manifest CSV whose paths are relative to the manifest's folder.

    Columns path,label,patient_id,split are required; group and site are optional.
    An empty label gives an unlabelled record.

    Returns:
        (records, rejects) where each reject is (path as written, reason).

    Raises:
        DataError: when the manifest is missing or lacks a required column.
    """
    folder = table.parent
    series_groups = read_series_groups(folder)
    records: list[Record] = []
    rejects: list[Reject] = []
    seen: dict[str, int] = {}
    n_by_image = 0
    with open(table, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = [c.strip().lower() for c in reader.fieldnames or []]
        missing = [c for c in MANIFEST_REQUIRED if c not in columns]
        if missing:
            raise DataError(
                f"{table}: missing column(s) {', '.join(missing)}; required columns are "
                f"{','.join(MANIFEST_REQUIRED)} (optional: group, site), got "
                f"{','.join(columns) or 'no header'}. Add the column(s), empty values are allowed"
            )
        for line, row in enumerate(reader, start=2):
            row = {k.strip().lower(): (v or "").strip() for k, v in row.items() if k}
            written = row["path"]
            if not written:
                rejects.append((f"{table.name}:{line}", "empty path"))
                continue
            rel = Path(written).as_posix()
            if rel in seen:
                rejects.append(
                    (written, f"listed twice in {table.name} (lines {seen[rel]} and {line})")
                )
                continue
            seen[rel] = line
            path = folder / written
            if not path.exists():
                rejects.append(
                    (
                        written,
                        f"file not found (line {line} of {table.name}); "
                        "fix the path relative to the manifest's folder",
                    )
                )
                continue
            try:
                label = row["label"].lower() or None
                binary = binary_label_of(label) if label else None
                split = normalize_split(row["split"])
            except DataError as err:
                rejects.append((written, f"{err} (line {line} of {table.name})"))
                continue
            patient_id = row["patient_id"] or None
            group, by_image = choose_group(rel, patient_id, row.get("group"), series_groups)
            n_by_image += by_image
            records.append(
                Record(
                    path.resolve(), label, binary, patient_id, group, split, row.get("site") or None
                )
            )
    warn_image_grouping(n_by_image, len(records), folder)
    return records, rejects


def write_manifest(records: Iterable[Record], path: Path) -> Path:
    """Write records as a manifest CSV with columns path,label,patient_id,split,group,site.

    Paths are written relative to the manifest's folder when they are inside it,
    otherwise absolute. Missing values are written as empty cells.

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(MANIFEST_COLUMNS)
        for record in records:
            writer.writerow(
                [
                    relative_name(record.path, path.parent),
                    record.label or "",
                    record.patient_id or "",
                    record.split or "",
                    record.group,
                    record.site or "",
                ]
            )
    os.replace(tmp, path)
    return path
