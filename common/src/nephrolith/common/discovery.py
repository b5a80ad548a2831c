"""Discovery of a CT folder's labelled studies: a manifest.csv or class sub-folders."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from nephrolith.common.constants import DICOM_SUFFIXES, EXPORT_SUFFIXES, NIFTI_SUFFIXES
from nephrolith.common.errors import DataError
from nephrolith.common.manifest import (
    ACCEPTED_LABELS,
    MANIFEST_NAME,
    Record,
    Reject,
    binary_label_of,
    choose_group,
    read_manifest,
    read_series_groups,
    relative_name,
    warn_image_grouping,
)

logger = logging.getLogger(__name__)

# Files of a folder that are documentation or tables, never images.
_IGNORED_SUFFIXES = frozenset({".csv", ".md", ".txt", ".json", ".yaml", ".yml", ".html", ".pdf"})
# A DICOM Part 10 file carries "DICM" after a 128-byte preamble.
_DICOM_MAGIC_OFFSET = 128


def looks_like_dicom(path: Path) -> bool:
    """Check a file for the DICOM Part 10 preamble ("DICM" at byte 128) or a DICOM suffix."""
    try:
        with open(path, "rb") as handle:
            handle.seek(_DICOM_MAGIC_OFFSET)
            if handle.read(4) == b"DICM":
                return True
    except OSError:
        return False
    return path.suffix.lower() in DICOM_SUFFIXES - {""}


def is_image_candidate(path: Path) -> bool:
    """Check by name (and the DICOM preamble) whether a file should be handed to a reader."""
    name = path.name.lower()
    if name.endswith(NIFTI_SUFFIXES) or path.suffix.lower() in EXPORT_SUFFIXES:
        return True
    return looks_like_dicom(path)


def _is_hidden_or_table(path: Path) -> bool:
    return (
        path.name.startswith(".")
        or path.name.upper() == "DICOMDIR"
        or (path.suffix.lower() in _IGNORED_SUFFIXES)
    )


# -- class sub-folders --------------------------------------------------------------------------


def _series_folder(files: Sequence[Path]) -> bool:
    """Check whether every file of a sub-folder is a DICOM slice, so the folder is one study."""
    return len(files) > 0 and all(looks_like_dicom(f) for f in files)


def _series_uids(files: Sequence[Path]) -> set[str]:
    """Return the distinct non-empty SeriesInstanceUID (0020,000E) values of DICOM files."""
    import pydicom

    uids: set[str] = set()
    for file in files:
        try:
            header = pydicom.dcmread(
                file, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"]
            )
        except (OSError, pydicom.errors.InvalidDicomError):
            # The reader reports the unreadable slice when the series is opened.
            continue
        uid = str(header.get("SeriesInstanceUID", "") or "")
        if uid:
            uids.add(uid)
    return uids


def _scan_class_folder(class_dir: Path, label: str, root: Path) -> tuple[list[Path], list[Reject]]:
    """List the studies of one class folder: image files and DICOM series folders."""
    studies: list[Path] = []
    rejects: list[Reject] = []
    for directory, subdirs, names in os.walk(class_dir):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        here = Path(directory)
        files = sorted(here / n for n in names if not _is_hidden_or_table(here / n))

        # A sub-folder made only of DICOM files (and no deeper folders) is one series.
        if here != class_dir and not subdirs and _series_folder(files):
            uids = _series_uids(files)
            if len(uids) > 1:
                rejects.append(
                    (
                        relative_name(here, root) + "/",
                        f"folder holds {len(uids)} DICOM series (SeriesInstanceUID); a "
                        "series folder must hold one series: move each into its own folder",
                    )
                )
            else:
                studies.append(here)
            continue
        for file in files:
            if is_image_candidate(file):
                studies.append(file)
            else:
                rejects.append(
                    (
                        relative_name(file, root),
                        f"unsupported file type {file.suffix or '(no suffix)'!r} in class "
                        f"folder {label!r}; expected DICOM, NIfTI, PNG or JPG",
                    )
                )
    return studies, rejects


def _class_folders(folder: Path) -> tuple[Path, list[Path]]:
    """Find the class sub-folders, looking once inside a single wrapper folder such as images/."""
    subdirs = sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    known = [d for d in subdirs if d.name.lower() in ACCEPTED_LABELS]
    if not known and len(subdirs) == 1:
        inner = subdirs[0]
        inner_dirs = sorted(d for d in inner.iterdir() if d.is_dir() and not d.name.startswith("."))
        if any(d.name.lower() in ACCEPTED_LABELS for d in inner_dirs):
            logger.info("%s: reading class folders inside %s/", folder, inner.name)
            return inner, inner_dirs
    return folder, subdirs


def read_class_folders(folder: Path) -> tuple[list[Record], list[Reject]]:
    """Read a folder laid out as `<folder>/<label>/...` (label = class folder name).

    Returns:
        (records, rejects). Image files outside any class folder and class
        folders with an unknown name are rejected.
    """
    series_groups = read_series_groups(folder)
    base, subdirs = _class_folders(folder)
    records: list[Record] = []
    rejects: list[Reject] = []
    n_by_image = 0

    for file in sorted(p for p in base.iterdir() if p.is_file() and not _is_hidden_or_table(p)):
        if is_image_candidate(file):
            rejects.append(
                (
                    relative_name(file, folder),
                    "image outside a class folder has no label; move it into "
                    f"<folder>/<label>/ with a label among: {', '.join(ACCEPTED_LABELS)}",
                )
            )

    for class_dir in subdirs:
        label = class_dir.name.lower()
        if label not in ACCEPTED_LABELS:
            rejects.append(
                (
                    relative_name(class_dir, folder) + "/",
                    f"class folder name {class_dir.name!r} is not a known label; accepted "
                    f"labels: {', '.join(ACCEPTED_LABELS)}; rename the folder or add a "
                    f"{MANIFEST_NAME}",
                )
            )
            continue
        studies, folder_rejects = _scan_class_folder(class_dir, label, folder)
        rejects.extend(folder_rejects)
        for study in studies:
            rel = relative_name(study, folder)
            group, by_image = choose_group(rel, None, None, series_groups)
            n_by_image += by_image and not study.is_dir()
            records.append(Record(study.resolve(), label, binary_label_of(label), None, group))

    warn_image_grouping(n_by_image, len(records), folder)
    return records, rejects


# -- discovery ----------------------------------------------------------------------------------


def discover_with_rejects(folder: Path) -> tuple[list[Record], list[Reject]]:
    """Find the labelled studies of a folder, with the entries that could not be used.

    The first layout found is used. A manifest .csv is either `folder` itself or
    `folder/manifest.csv`, with columns path,label,patient_id,split and optional
    group,site, and paths relative to its folder. Otherwise the folder contains class
    sub-folders `folder/<label>/...`, where a sub-folder made only of DICOM files
    is one series. A `series_groups.csv` (path,series_group and optionally
    linked_islam_subset_group) beside them gives the group of records without a
    patient id.

    Returns:
        (records, rejects) with rejects as (path relative to the folder, reason).
        Files are not opened here, see `check_folder`.

    Raises:
        DataError: when the folder is missing or the manifest lacks required columns.
    """
    folder = Path(folder)
    if folder.is_file() and folder.suffix.lower() == ".csv":
        records, rejects = read_manifest(folder)
    elif not folder.is_dir():
        raise DataError(f"{folder}: not found; expected a CT data folder or a manifest .csv")
    elif (folder / MANIFEST_NAME).is_file():
        records, rejects = read_manifest(folder / MANIFEST_NAME)
    else:
        records, rejects = read_class_folders(folder)
    logger.info(
        "%s: %d records in %d groups, %d rejected",
        folder,
        len(records),
        len({r.group for r in records}),
        len(rejects),
    )
    return records, rejects


def discover(folder: Path) -> list[Record]:
    """Return the usable records of a folder (see `discover_with_rejects`); rejects are logged."""
    records, rejects = discover_with_rejects(folder)
    for path, reason in rejects[:10]:
        logger.warning("%s: skipped %s: %s", folder, path, reason)
    if len(rejects) > 10:
        logger.warning(
            "%s: %d more entries skipped; run a folder check to list them",
            folder,
            len(rejects) - 10,
        )
    return records
