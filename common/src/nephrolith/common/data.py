"""Datasets of a CT folder: discovery, checks, splits, site partitions and preprocessed arrays.

Records and manifests live in `manifest`, folder discovery in `discovery`, splits
and partitions in `splits`. Their public names are re-exported here, so callers
only import `data`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import statistics
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from nephrolith.common import __version__
from nephrolith.common.config import PreprocessConfig, to_dict
from nephrolith.common.discovery import discover, discover_with_rejects
from nephrolith.common.errors import DataError
from nephrolith.common.manifest import (
    ACCEPTED_LABELS,
    SPLIT_NAMES,
    Record,
    Reject,
    binary_label_of,
    read_series_groups,
    relative_name,
    write_manifest,
)
from nephrolith.common.splits import (
    assign_splits,
    dirichlet_partition,
    group_folds,
    group_label,
    group_records,
    iid_partition,
    split_counts,
)

logger = logging.getLogger(__name__)

# Bump when the cached arrays change meaning, so old cache files are not reused.
_CACHE_VERSION = 1

__all__ = [
    "ACCEPTED_LABELS",
    "SPLIT_NAMES",
    "CheckResult",
    "Record",
    "assign_splits",
    "binary_label_of",
    "check_folder",
    "dirichlet_partition",
    "discover",
    "discover_with_rejects",
    "group_folds",
    "group_label",
    "group_records",
    "iid_partition",
    "load_split",
    "read_series_groups",
    "split_counts",
    "write_manifest",
]


# -- folder check -------------------------------------------------------------------------------


@dataclass
class CheckResult:
    """Outcome of `check_folder`.

    Attributes:
        records_ok: records whose file or series opened.
        rejects: (path relative to the folder, reason) for every unusable entry.
        summary: counts per label, binary class, group, format, intensity kind
            ("hu"/"display") and image size, plus `warnings` (list of sentences).
    """

    records_ok: list[Record]
    rejects: list[Reject]
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def records(self) -> list[Record]:
        """The usable records (same as `records_ok`)."""
        return self.records_ok

    @property
    def ok(self) -> bool:
        """True when nothing was rejected and at least one record is usable."""
        return bool(self.records_ok) and not self.rejects


def read_record(record: Record) -> Any:
    """Open a record with the readers: a DICOM series for a folder, else one file.

    Returns:
        The CTImage of the record.

    Raises:
        DataError, NotImplementedError: as the readers raise them.
    """
    from nephrolith.common.io import read_dicom_series, read_image

    if record.path.is_dir():
        return read_dicom_series(record.path)
    return read_image(record.path)


def _inspect_one(path: str) -> dict[str, Any]:
    """Open one record (in this or a spawned worker) and return its facts or an error reason."""
    record = Record(Path(path), None, None, None, path)
    try:
        ct = read_record(record)
    except (DataError, NotImplementedError) as err:
        return {"error": str(err)}
    except Exception as err:  # noqa: BLE001 - a reader bug on one file must not end the check
        return {
            "error": f"reader failed unexpectedly ({type(err).__name__}: {err}); "
            "report this file's format as a bug",
            "unexpected": True,
        }
    return {
        "source": ct.source,
        "is_hu": ct.is_hu,
        "shape": tuple(int(n) for n in ct.pixels.shape),
        "n_slices": int(ct.pixels.shape[0]) if ct.is_volume else 1,
        "skipped": [(str(name), str(reason)) for name, reason in ct.meta.get("skipped", [])],
    }


def _map_records(function: Callable[..., Any], paths: list[str], workers: int, *args: Any) -> Any:
    """Yield function(path, *args) for each path, in order, here or in spawned workers."""
    if workers <= 1 or len(paths) < 2 * workers:
        yield from (function(path, *args) for path in paths)
        return
    # NOTE: spawn, not fork: a forked child of a process that has run TensorFlow hangs on
    # its first TF op, and workers only need the readers and OpenCV.
    context = multiprocessing.get_context("spawn")
    repeated = [[arg] * len(paths) for arg in args]
    chunk = max(1, len(paths) // (8 * workers))
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        yield from pool.map(function, paths, *repeated, chunksize=chunk)


def check_folder(
    folder: Path,
    open_files: bool = True,
    progress: Callable[[int, int], None] | None = None,
    workers: int = 1,
) -> CheckResult:
    """Discover a folder's records and open every one of them with the readers.

    Never stops at a bad file: each failure becomes a reject with the reader's message.

    Args:
        folder: the CT data folder or manifest (see `discover_with_rejects` for layouts).
        open_files: open every file (default); False only lists and counts.
        progress: called as progress(done, total) after each record.
        workers: processes opening files (spawned); 1 opens them in this process.

    Returns:
        The usable records, the rejects and summary tables.

    Raises:
        DataError: when the folder or the manifest's columns are missing.
    """
    records, rejects = discover_with_rejects(folder)
    folder = Path(folder).parent if Path(folder).is_file() else Path(folder)
    ok: list[Record] = []
    formats: Counter[str] = Counter()
    intensity: Counter[str] = Counter()
    sizes: Counter[str] = Counter()
    n_slices = 0

    facts = (
        _map_records(_inspect_one, [str(r.path) for r in records], workers)
        if open_files
        else ({} for _ in records)
    )
    for index, (record, fact) in enumerate(zip(records, facts, strict=True), start=1):
        name = relative_name(record.path, folder)
        if "error" in fact:
            if fact.get("unexpected"):
                logger.error("%s: %s", name, fact["error"])
            rejects.append((name, fact["error"]))
        else:
            ok.append(record)
        if "source" in fact:
            formats[fact["source"]] += 1
            intensity["hu" if fact["is_hu"] else "display"] += 1
            sizes["x".join(str(n) for n in fact["shape"])] += 1
            n_slices += fact["n_slices"]
            rejects.extend(
                (f"{name}/{slice_name}", f"slice skipped from the series: {reason}")
                for slice_name, reason in fact["skipped"]
            )
        if progress is not None:
            progress(index, len(records))

    summary = summarize(ok, folder)
    summary.update(
        formats=dict(formats),
        intensity=dict(intensity),
        sizes=dict(sizes.most_common()),
        n_slices=n_slices if open_files else None,
        n_rejects=len(rejects),
    )
    if open_files and len(intensity) > 1:
        summary["warnings"].append(
            "the folder mixes HU images (DICOM/NIfTI) with display-windowed exports (PNG/JPG); "
            "they look different after preprocessing, so keep one kind per site if possible"
        )
    logger.info("%s: %d records usable, %d rejected", folder, len(ok), len(rejects))
    return CheckResult(ok, rejects, summary)


def summarize(records: Sequence[Record], folder: Path | None = None) -> dict[str, Any]:
    """Count records per label, class, group and split, and list data warnings."""
    groups = group_records(records)
    sizes = [len(members) for members in groups.values()]
    binary = Counter(
        {1: "stone", 0: "no_stone", None: "unlabelled"}[r.binary_label] for r in records
    )
    group_classes = Counter(
        {1: "stone", 0: "no_stone", -1: "unlabelled"}[group_label(m)] for m in groups.values()
    )
    warnings: list[str] = []

    by_file = [
        r
        for r in records
        if folder is not None and r.group == relative_name(r.path, folder) and not r.path.is_dir()
    ]
    if by_file:
        warnings.append(
            f"{len(by_file)} of {len(records)} records have no patient_id or group and are grouped "
            "by their own file: neighbouring slices of one scan can end up in different splits "
            "(leakage). Add patient_id or group to the manifest or a series_groups.csv"
        )
    if records and len({r.binary_label for r in records} - {None}) < 2:
        warnings.append(
            "only one class (stone or no_stone) is present; a model cannot learn "
            "the task from this folder alone"
        )
    if binary.get("unlabelled"):
        warnings.append(
            f"{binary['unlabelled']} records have no label; they can be used for "
            "inference but not for training or evaluation"
        )
    return {
        "n_records": len(records),
        "labels": dict(sorted(Counter(r.label or "" for r in records).items())),
        "binary": dict(binary),
        "n_groups": len(groups),
        "groups_per_class": dict(group_classes),
        "records_per_group": (
            {"min": min(sizes), "median": statistics.median(sizes), "max": max(sizes)}
            if sizes
            else {}
        ),
        "groups": {key: len(members) for key, members in groups.items()},
        "n_patients": len({r.patient_id for r in records if r.patient_id}),
        "splits": split_counts(records),
        "sites": dict(Counter(r.site or "" for r in records)),
        "warnings": warnings,
    }


# -- arrays for training and evaluation ---------------------------------------------------------


def _load_one(path: str, cfg: PreprocessConfig) -> tuple[np.ndarray | None, str | None]:
    """Read and preprocess one record in this or a spawned worker process."""
    from nephrolith.common import dip

    record = Record(Path(path), None, None, None, path)
    try:
        return dip.preprocess_image(read_record(record), cfg), None
    except (DataError, NotImplementedError) as err:
        return None, str(err)


def _stat_key(path: Path) -> list[Any]:
    """Return (name, mtime, size) of a file or of every file of a series folder."""
    try:
        files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
        return [(p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in files]
    except OSError:
        # A missing file gets its own key, and the reader reports it when the split is loaded.
        return [(path.name, None, None)]


def _cache_file(
    records: Sequence[Record], split: str | None, cfg: PreprocessConfig, cache_dir: Path
) -> Path:
    """Name the cache file by a hash of the files' paths, times and sizes, labels and cfg."""
    # NOTE: changes to the reader or DIP code within one package version are not part of the
    # key. Empty the cache folder after editing them.
    key = {
        "version": _CACHE_VERSION,
        "package": __version__,
        "split": split,
        "cfg": to_dict(cfg),
        "records": [
            [str(r.path), _stat_key(r.path), r.binary_label, r.slice_labels, r.group]
            for r in records
        ],
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
    return Path(cache_dir) / f"{split or 'all'}-{digest[:20]}.npz"


def _labels_for(record: Record, n_slices: int) -> np.ndarray:
    if record.slice_labels is not None:
        if len(record.slice_labels) != n_slices:
            raise DataError(
                f"{record.path}: {len(record.slice_labels)} per-slice labels for "
                f"{n_slices} slices; give one label per slice or none"
            )
        return np.asarray(record.slice_labels, dtype=np.int64)
    return np.full(n_slices, record.binary_label, dtype=np.int64)


def load_split(
    records: Sequence[Record],
    split: str | None,
    cfg: PreprocessConfig,
    cache_dir: Path | None = None,
    workers: int = 1,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Read and preprocess the slices of one split into arrays.

    Every slice of a volume or DICOM series becomes one example carrying the
    record's label, unless the record has per-slice labels. Records that fail
    to read are skipped with a warning.

    Args:
        records: labelled records (unlabelled ones raise).
        split: "train", "val", "test", or None for all records.
        cfg: preprocessing settings, as saved with the model.
        cache_dir: when given, results are stored there as .npz and reused while
            the files (path, mtime, size), labels, groups and cfg are unchanged.
        workers: processes for reading and preprocessing (spawned); 1 runs in this process.

    Returns:
        x float32 (N, S, S, 3) in 0..255, y int64 (N,) with 1 = stone, and the
        group of each example.

    Raises:
        DataError: when the split has no records, a record has no label, or no
            record could be read.
    """
    selected = [r for r in records if split is None or r.split == split]
    if not selected:
        raise DataError(
            f"no records in split {split!r}; assign splits first (assign_splits) "
            f"or check the manifest's split column ({', '.join(SPLIT_NAMES)})"
        )
    unlabelled = [r for r in selected if r.binary_label is None and r.slice_labels is None]
    if unlabelled:
        raise DataError(
            f"{unlabelled[0].path}: no label; {len(unlabelled)} records of split "
            f"{split!r} are unlabelled and cannot be used for training or evaluation"
        )

    cache = _cache_file(selected, split, cfg, cache_dir) if cache_dir is not None else None
    if cache is not None and cache.is_file():
        with np.load(cache) as stored:
            logger.info("split %s: %d slices from cache %s", split, len(stored["y"]), cache)
            return stored["x"], stored["y"], [str(g) for g in stored["groups"]]

    loaded = list(_map_records(_load_one, [str(r.path) for r in selected], workers, cfg))
    x, y, groups = _assemble(selected, loaded, cfg, split)

    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(cache.name + ".tmp")
        with open(tmp, "wb") as handle:
            np.savez(handle, x=x, y=y, groups=np.asarray(groups, dtype=str))
        os.replace(tmp, cache)
    return x, y, groups


def _assemble(
    records: Sequence[Record],
    loaded: list[tuple[np.ndarray | None, str | None]],
    cfg: PreprocessConfig,
    split: str | None,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Stack per-record arrays into one, freeing each part as it is copied."""
    failed = [(r.path, reason) for r, (_, reason) in zip(records, loaded, strict=True) if reason]
    for path, reason in failed[:5]:
        logger.warning("split %s: skipped %s: %s", split, path, reason)
    if len(failed) == len(records):
        raise DataError(
            f"split {split!r}: none of {len(records)} records could be read; "
            "run a folder check to see why"
        )
    if failed:
        logger.warning("split %s: %d of %d records skipped", split, len(failed), len(records))

    total = sum(len(a) for a, _ in loaded if a is not None)
    size = cfg.image_size
    x = np.empty((total, size, size, 3), dtype=np.float32)
    y = np.empty(total, dtype=np.int64)
    groups: list[str] = []
    start = 0
    for index, record in enumerate(records):
        array = loaded[index][0]
        if array is None:
            continue
        end = start + len(array)
        x[start:end] = array
        y[start:end] = _labels_for(record, len(array))
        groups.extend([record.group] * len(array))
        loaded[index] = (None, None)
        start = end
    logger.info(
        "split %s: %d slices from %d records, %d stone",
        split,
        total,
        len(records) - len(failed),
        int(y.sum()),
    )
    return x, y, groups
