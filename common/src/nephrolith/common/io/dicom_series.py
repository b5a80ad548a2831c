"""DICOM series to one HU volume: file discovery, series grouping, slice checks and slice order."""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from nephrolith.common.constants import MAX_VOXELS_PER_VOLUME
from nephrolith.common.errors import DataError
from nephrolith.common.image import CTImage
from nephrolith.common.io.dicom import (
    check_ct_header,
    decode_pixels,
    frame_orientation,
    frame_position,
    nominal_slice_gap,
    number_of_frames,
    pixel_spacing,
    read_dataset,
    read_dicom_file,
    stored_to_hu,
)
from nephrolith.common.io.geometry import DUPLICATE_POSITION_MM, stack_axial, upward_normal

logger = logging.getLogger(__name__)

# Direction cosines and pixel spacings that differ by less than this count as equal.
ORIENTATION_TOLERANCE = 1e-3
SPACING_RELATIVE_TOLERANCE = 1e-3


@dataclass
class _SliceHeader:
    """Header facts of one file of a series, read without its pixel data."""

    path: Path
    name: str
    series_uid: str
    shape: tuple[int, int]
    frames: int
    instance_number: int | None
    orientation: tuple[np.ndarray, np.ndarray] | None
    position: np.ndarray | None
    spacing: tuple[float, float] | None


def _list_files(
    folder_or_paths: str | Path | Iterable[str | Path],
) -> tuple[list[Path], str, Path | None]:
    """Return the candidate files, a name for messages and the folder names are relative to."""
    if isinstance(folder_or_paths, str | Path):
        root = Path(folder_or_paths)
        if root.is_dir():
            files = sorted(
                path
                for path in root.rglob("*")
                if path.is_file()
                and not any(part.startswith(".") for part in path.relative_to(root).parts)
            )
            if not files:
                raise DataError(f"{root}: folder is empty; expected the DICOM files of one series.")
            return files, str(root), root
        if root.is_file():
            return [root], str(root), root.parent
        raise DataError(
            f"{root}: folder not found; expected a folder of DICOM files. Check the path."
        )
    files = [Path(path) for path in folder_or_paths]
    if not files:
        raise DataError("no DICOM files given; expected the paths of the slices of one series.")
    return files, f"series of {len(files)} files", None


def _display_name(path: Path, root: Path | None) -> str:
    """Return the path relative to the series folder, or the file name for explicit lists."""
    if root is not None:
        try:
            return str(path.relative_to(root))
        except ValueError:
            pass
    return path.name


def _reason(err: Exception, path: Path) -> str:
    """Return the error message without the leading file path."""
    text = str(err)
    prefix = f"{path}: "
    return text[len(prefix) :] if text.startswith(prefix) else text


def _read_header(path: Path, name: str) -> _SliceHeader:
    """Read and check the header of one file of a series."""
    ds = read_dataset(path, stop_before_pixels=True)
    check_ct_header(ds, path, require_pixels=False)
    try:
        instance = ds.get("InstanceNumber")
        instance = int(instance) if instance not in (None, "") else None
    except (TypeError, ValueError) as err:
        raise DataError(f"{path}: InstanceNumber {instance!r} is not an integer.") from err
    return _SliceHeader(
        path=path,
        name=name,
        series_uid=str(ds.get("SeriesInstanceUID", "") or ""),
        shape=(int(ds.Rows), int(ds.Columns)),
        frames=number_of_frames(ds, path),
        instance_number=instance,
        orientation=frame_orientation(ds, path),
        position=frame_position(ds, path),
        spacing=pixel_spacing(ds, path),
    )


def _raise_no_usable_slice(
    where: str, skipped: list[tuple[str, str]], unsupported: list[str]
) -> None:
    """Raise the error for a series without a single usable slice."""
    if unsupported and len(unsupported) == len(skipped):
        raise NotImplementedError(f"{where}: no usable CT slice; {unsupported[0]}")
    examples = "; ".join(f"{name}: {reason}" for name, reason in skipped[:3])
    raise DataError(
        f"{where}: none of {len(skipped)} files is a usable CT slice ({examples}). Expected a "
        "folder with the DICOM files of one CT series."
    )


def _choose_series(
    headers: list[_SliceHeader], where: str, meta: dict[str, Any]
) -> list[_SliceHeader]:
    """Return the headers of the largest series and warn when other series are present."""
    groups: dict[str, list[_SliceHeader]] = {}
    for header in headers:
        groups.setdefault(header.series_uid, []).append(header)
    ranked = sorted(groups.items(), key=lambda item: (-len(item[1]), item[0]))
    meta["series_uid"] = ranked[0][0]
    if len(ranked) > 1:
        meta["other_series"] = [(uid, len(members)) for uid, members in ranked[1:]]
        logger.warning(
            "%s: %d series found; reading the largest (%d files) and ignoring %d files of the "
            "others. Pass one series folder to choose another.",
            where,
            len(ranked),
            len(ranked[0][1]),
            sum(len(m) for _, m in ranked[1:]),
        )
    return ranked[0][1]


def _most_common(values: list[tuple[float, ...]]) -> tuple[float, ...]:
    """Return the most frequent value, comparing values rounded to 3 decimals."""
    counts = Counter(tuple(np.round(value, 3)) for value in values)
    return counts.most_common(1)[0][0]


def _keep_consistent(
    headers: list[_SliceHeader], skipped: list[tuple[str, str]]
) -> list[_SliceHeader]:
    """Drop slices whose shape, orientation or pixel spacing differs from the majority."""
    shape = Counter(header.shape for header in headers).most_common(1)[0][0]
    oriented = [np.concatenate(h.orientation) for h in headers if h.orientation is not None]
    orientation = np.array(_most_common(oriented)) if oriented else None
    spaced = [h.spacing for h in headers if h.spacing is not None]
    spacing = np.array(_most_common(spaced)) if spaced else None

    kept = []
    for header in headers:
        reason = None
        if header.shape != shape:
            reason = (
                f"shape {header.shape[0]} x {header.shape[1]} differs from {shape[0]} x {shape[1]}"
            )
        elif orientation is not None and (
            header.orientation is None
            or not np.allclose(
                np.concatenate(header.orientation), orientation, atol=ORIENTATION_TOLERANCE
            )
        ):
            reason = "ImageOrientationPatient differs from the other slices"
        elif spacing is not None and (
            header.spacing is None
            or not np.allclose(header.spacing, spacing, rtol=SPACING_RELATIVE_TOLERANCE)
        ):
            reason = f"PixelSpacing {header.spacing} differs from {tuple(spacing)}"
        elif header.frames > 1:
            reason = f"multi-frame file ({header.frames} frames) inside a series of single slices"
        if reason is None:
            kept.append(header)
        else:
            skipped.append((header.name, reason))
    return kept


def _order_by_position(
    headers: list[_SliceHeader], skipped: list[tuple[str, str]]
) -> list[_SliceHeader]:
    """Return the slices sorted along the normal, without those lacking or sharing a position."""
    placed = [header for header in headers if header.position is not None]
    for header in headers:
        if header.position is None:
            skipped.append((header.name, "ImagePositionPatient is missing"))
    normal = upward_normal(*placed[0].orientation)
    placed.sort(key=lambda header: float(header.position @ normal))
    kept = [placed[0]]
    for header in placed[1:]:
        if float((header.position - kept[-1].position) @ normal) < DUPLICATE_POSITION_MM:
            skipped.append((header.name, f"same ImagePositionPatient as {kept[-1].name}"))
        else:
            kept.append(header)
    return kept


def _decode_slices(
    headers: list[_SliceHeader], skipped: list[tuple[str, str]], facts: Counter[str]
) -> tuple[list[_SliceHeader], list[np.ndarray]]:
    """Decode each slice to HU, skipping corrupt slices."""
    kept, slices = [], []
    for header in headers:
        try:
            ds: Dataset = read_dataset(header.path)
            check_ct_header(ds, header.path)
            hu, slice_facts = stored_to_hu(ds, decode_pixels(ds, header.path), header.path)
        except (DataError, NotImplementedError) as err:
            skipped.append((header.name, _reason(err, header.path)))
            continue
        facts["rescale_assumed"] += int(slice_facts["rescale_assumed"])
        facts["padded_pixels"] += slice_facts["padded_pixels"]
        kept.append(header)
        slices.append(hu[0])
    return kept, slices


def read_dicom_series(folder_or_paths: str | Path | Iterable[str | Path]) -> CTImage:
    """Read the slices of one CT series into an HU volume (D, H, W).

    Slices are grouped by SeriesInstanceUID (de-identified files with empty UIDs form one
    group). When a folder contains several series, the largest is read and the others are
    listed in meta["other_series"] with a warning. Slices are ordered by the projection of
    ImagePositionPatient onto the slice normal, from inferior to superior, and turned into the
    radiological view (rows anterior to posterior, columns patient right to left). The z
    spacing is the median gap between positions; uneven gaps give a warning.

    Files that cannot be used (not DICOM, corrupt, another modality, another shape,
    orientation or pixel spacing than the majority, duplicate position) are skipped with a
    warning and listed in meta["skipped"] as (name, reason).

    Args:
        folder_or_paths: a folder (searched recursively, hidden files ignored) or the paths
            of the slices.

    Returns:
        CTImage with source "dicom-series", spacing_mm (z, row, col) and meta keys
        "skipped", "series_uid", "other_series" (when several), "spacing_uneven",
        "rescale_assumed_slices", "padded_pixels", "slice_order".

    Raises:
        DataError: no usable CT slice, or a volume above MAX_VOXELS_PER_VOLUME.
        NotImplementedError: every file is of an unsupported kind (MR, colour), or the
            series is sagittal or coronal.
    """
    files, where, root = _list_files(folder_or_paths)
    skipped: list[tuple[str, str]] = []
    unsupported: list[str] = []
    meta: dict[str, Any] = {"skipped": skipped}

    # Headers first, so no pixel is decoded for files that will be dropped.
    headers = []
    for path in files:
        name = _display_name(path, root)
        try:
            headers.append(_read_header(path, name))
        except NotImplementedError as err:
            unsupported.append(_reason(err, path))
            skipped.append((name, _reason(err, path)))
        except DataError as err:
            skipped.append((name, _reason(err, path)))
    if not headers:
        _raise_no_usable_slice(where, skipped, unsupported)

    chosen = _choose_series(headers, where, meta)
    if len(chosen) == 1 and chosen[0].frames > 1:
        volume = read_dicom_file(chosen[0].path)
        return dataclasses.replace(volume, meta={**volume.meta, **meta}, path=str(where))
    chosen = _keep_consistent(chosen, skipped)
    if not chosen:
        _raise_no_usable_slice(where, skipped, unsupported)
    rows, cols = chosen[0].shape
    if len(chosen) * rows * cols > MAX_VOXELS_PER_VOLUME:
        raise DataError(
            f"{where}: {len(chosen)} slices of {rows} x {cols} exceed the limit of "
            f"{MAX_VOXELS_PER_VOLUME} voxels; split the series."
        )
    return _assemble(chosen, skipped, where, meta, unsupported)


def _assemble(
    chosen: list[_SliceHeader],
    skipped: list[tuple[str, str]],
    where: str,
    meta: dict[str, Any],
    unsupported: list[str],
) -> CTImage:
    """Order, decode and stack the slices of the chosen series."""
    geometric = chosen[0].orientation is not None and any(h.position is not None for h in chosen)
    if geometric:
        chosen = _order_by_position(chosen, skipped)
    else:
        # NOTE: without positions the order comes from InstanceNumber, whose direction
        # (head first or feet first) the standard leaves open.
        logger.warning("%s: no ImagePositionPatient; slices ordered by InstanceNumber", where)
        chosen.sort(
            key=lambda header: (header.instance_number is None, header.instance_number or 0)
        )
    facts: Counter[str] = Counter()
    chosen, slices = _decode_slices(chosen, skipped, facts)
    if not slices:
        _raise_no_usable_slice(where, skipped, unsupported)

    spacing = chosen[0].spacing
    if geometric:
        positions = np.stack([header.position for header in chosen])
        volume, gap, flip, uneven = stack_axial(slices, positions, chosen[0].orientation, where)
        spacing = flip.spacing(spacing) if spacing else None
        meta["slice_order"] = "position"
    else:
        volume, uneven = np.stack(slices), False
        gap = nominal_slice_gap(read_dataset(chosen[0].path, stop_before_pixels=True))
        meta["slice_order"] = "instance-number"
    if gap is None and len(slices) == 1:
        gap = nominal_slice_gap(read_dataset(chosen[0].path, stop_before_pixels=True))

    # One warning per kind of problem, with counts, instead of one per slice.
    if uneven:
        logger.warning(
            "%s: uneven slice spacing (a slice may be missing); using the median gap %.3f mm",
            where,
            gap,
        )
    if facts["rescale_assumed"]:
        logger.warning(
            "%s: %d slices lack rescale tags; their stored values already look like HU",
            where,
            facts["rescale_assumed"],
        )
    if skipped:
        logger.warning(
            "%s: skipped %d of %d files, first: %s: %s",
            where,
            len(skipped),
            len(skipped) + len(slices),
            *skipped[0],
        )
    meta.update(
        spacing_uneven=uneven,
        rescale_assumed_slices=facts["rescale_assumed"],
        padded_pixels=facts["padded_pixels"],
    )
    spacing_mm = (gap, *spacing) if gap is not None and spacing else None
    return CTImage(
        pixels=volume,
        is_hu=True,
        spacing_mm=spacing_mm,
        source="dicom-series",
        path=where,
        meta=meta,
    )
