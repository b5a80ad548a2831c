"""Single DICOM files to Hounsfield units: header checks, decoding, rescale, padding, geometry.

Tags read: Modality, SamplesPerPixel, Rows, Columns, NumberOfFrames, PixelRepresentation (through
pydicom), RescaleSlope, RescaleIntercept, PixelPaddingValue, PixelPaddingRangeLimit,
PhotometricInterpretation, PixelSpacing, ImageOrientationPatient, ImagePositionPatient,
SpacingBetweenSlices, SliceThickness, and for enhanced multi-frame files the same attributes
inside the shared and per-frame functional group sequences (PS3.3 C.7.6.16).
"""

from __future__ import annotations

import logging
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import get_decoder

from nephrolith.common.constants import MAX_PIXELS_PER_SLICE, MAX_VOXELS_PER_VOLUME
from nephrolith.common.errors import DataError
from nephrolith.common.image import CTImage
from nephrolith.common.io._files import check_file, describe_content
from nephrolith.common.io.geometry import plane_name, radiological_flip, stack_axial

logger = logging.getLogger(__name__)

# Padded pixels (outside the reconstruction circle) become air.
AIR_HU = -1024.0

# Modalities that are plausible for a kidney work-up but that the CT model cannot use.
UNSUPPORTED_MODALITIES = frozenset({"MR"})

# Without rescale tags the stored values are taken as HU only when some pixel lies below this
# value: every abdominal CT slice contains air (-1000 HU) or at least fat (about -100 HU), while
# unsigned stored values (HU + 1024, typically 0..4095) never go below 0.
HU_LIKE_MAX_MINIMUM = -200.0

# Errors pydicom and its decoder plugins raise on corrupt or truncated files.
_READ_ERRORS = (EOFError, OSError, ValueError, struct.error, KeyError, TypeError, AttributeError)
_DECODE_ERRORS = (*_READ_ERRORS, RuntimeError, IndexError)


def read_dataset(path: Path, *, stop_before_pixels: bool = False) -> Dataset:
    """Read a DICOM Part 10 file, mapping pydicom failures to DataError.

    Raises:
        DataError: missing, empty, non-DICOM, truncated or corrupt file.
    """
    check_file(path, "a DICOM file")
    try:
        return pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
    except InvalidDicomError as err:
        raise DataError(
            f"{path}: not a DICOM file (no 'DICM' marker at byte 128, {describe_content(path)}); "
            "expected a DICOM Part 10 file. Export the image as DICOM, or give PNG, JPEG and "
            "NIfTI files their usual extension."
        ) from err
    except _READ_ERRORS as err:
        raise DataError(
            f"{path}: DICOM header is corrupt or truncated ({type(err).__name__}: {err}); "
            "copy the file again from the PACS or the scanner export."
        ) from err


def number_of_frames(ds: Dataset, path: Path) -> int:
    """Return NumberOfFrames, 1 when the tag is absent or empty."""
    value = ds.get("NumberOfFrames")
    if value in (None, ""):
        return 1
    try:
        frames = int(value)
    except (TypeError, ValueError) as err:
        raise DataError(f"{path}: NumberOfFrames {value!r} is not an integer.") from err
    if frames < 1:
        raise DataError(f"{path}: NumberOfFrames is {frames}; expected at least 1.")
    return frames


def _to_float(value: Any, keyword: str, path: Path) -> float:
    """Convert a numeric tag value to float, raising DataError naming the tag."""
    try:
        return float(value)
    except (TypeError, ValueError) as err:
        raise DataError(f"{path}: {keyword} {value!r} is not a number; fix the header.") from err


def check_ct_header(ds: Dataset, path: Path, *, require_pixels: bool = True) -> None:
    """Check that a dataset is a greyscale CT image of a decodable size.

    Raises:
        NotImplementedError: MR modality or a colour image (SamplesPerPixel > 1).
        DataError: other modality, no pixel data, missing Rows/Columns, or a size above
            MAX_PIXELS_PER_SLICE (possible decompression bomb) or MAX_VOXELS_PER_VOLUME.
    """
    modality = str(ds.get("Modality", "") or "").strip().upper()
    if modality in UNSUPPORTED_MODALITIES:
        raise NotImplementedError(
            f"{path}: Modality {modality!r} is not supported; the stone detector needs CT in "
            "Hounsfield units. Select the CT series of the study."
        )
    if modality != "CT":
        raise DataError(
            f"{path}: expected Modality 'CT', got {modality!r}; select the CT image series "
            "(reports, dose sheets and other modalities cannot be read)."
        )
    if require_pixels and "PixelData" not in ds:
        raise DataError(f"{path}: the DICOM file has no PixelData; expected a CT image.")
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if samples != 1:
        raise NotImplementedError(
            f"{path}: colour DICOM ({samples} samples per pixel, "
            f"{ds.get('PhotometricInterpretation', '')!r}) is not supported; expected a "
            "greyscale CT image, not a screen capture."
        )
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2") or "MONOCHROME2")
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise NotImplementedError(
            f"{path}: PhotometricInterpretation {photometric!r} is not supported; expected "
            "MONOCHROME1 or MONOCHROME2 for a CT image."
        )
    rows, cols = ds.get("Rows"), ds.get("Columns")
    if not rows or not cols:
        raise DataError(
            f"{path}: Rows or Columns is missing; expected the image size in the header."
        )
    if int(rows) * int(cols) > MAX_PIXELS_PER_SLICE:
        raise DataError(
            f"{path}: image of {rows} x {cols} pixels exceeds the limit of "
            f"{MAX_PIXELS_PER_SLICE} pixels per slice; rejected before decoding."
        )
    frames = number_of_frames(ds, path)
    if frames * int(rows) * int(cols) > MAX_VOXELS_PER_VOLUME:
        raise DataError(
            f"{path}: {frames} frames of {rows} x {cols} pixels exceed the limit of "
            f"{MAX_VOXELS_PER_VOLUME} voxels; rejected before decoding."
        )


def decode_pixels(ds: Dataset, path: Path) -> np.ndarray:
    """Decode the stored pixel values into an array (F, H, W), F = number of frames.

    pydicom applies PixelRepresentation (signed or unsigned) and masks to BitsStored.

    Raises:
        NotImplementedError: no decoder exists or is installed for the transfer syntax.
        DataError: the pixel data is truncated or corrupt.
    """
    tsyntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if tsyntax:
        try:
            decoder = get_decoder(tsyntax)
        except NotImplementedError as err:
            raise NotImplementedError(
                f"{path}: transfer syntax {tsyntax.name} cannot be decoded; convert the file to "
                "an uncompressed, JPEG 2000, JPEG-LS or RLE transfer syntax."
            ) from err
        if not decoder.is_available:
            raise NotImplementedError(
                f"{path}: no installed plugin decodes {tsyntax.name}; install pylibjpeg with "
                "pylibjpeg-libjpeg, pylibjpeg-openjpeg and pylibjpeg-rle."
            )
    try:
        stored = np.asarray(ds.pixel_array)
    except _DECODE_ERRORS as err:
        raise DataError(
            f"{path}: pixel data could not be decoded ({type(err).__name__}: {err}); the file "
            "is probably truncated or corrupt. Copy it again from the PACS or scanner export."
        ) from err
    frames = number_of_frames(ds, path)
    if stored.ndim == 2 and frames == 1:
        stored = stored[np.newaxis]
    if stored.ndim != 3 or stored.shape[0] != frames:
        raise DataError(
            f"{path}: decoded pixels have shape {stored.shape}; expected {frames} frame(s) of "
            f"{ds.Rows} x {ds.Columns}."
        )
    return stored


def _functional_group_item(ds: Dataset, sequence: str, frame: int) -> Dataset | None:
    """Return the first item of `sequence` for `frame`, per-frame first, then shared."""
    for groups_name, index in (
        ("PerFrameFunctionalGroupsSequence", frame),
        ("SharedFunctionalGroupsSequence", 0),
    ):
        groups = ds.get(groups_name)
        if groups and len(groups) > index:
            items = groups[index].get(sequence)
            if items:
                return items[0]
    return None


def _frame_attribute(ds: Dataset, sequence: str, keyword: str, frame: int) -> Any:
    """Return an attribute from the functional groups of `frame`, else from the top level."""
    item = _functional_group_item(ds, sequence, frame)
    if item is not None and keyword in item:
        return item.get(keyword)
    return ds.get(keyword)


def _padding_mask(ds: Dataset, stored: np.ndarray) -> np.ndarray:
    """Return True where stored values are PixelPaddingValue or inside the padding range."""
    value = ds.get("PixelPaddingValue")
    if value is None:
        return np.zeros(stored.shape, dtype=bool)
    limit = ds.get("PixelPaddingRangeLimit")
    if limit is None:
        return stored == int(value)
    low, high = sorted((int(value), int(limit)))
    return (stored >= low) & (stored <= high)


def stored_to_hu(ds: Dataset, stored: np.ndarray, path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    """Convert stored values (F, H, W) to HU with RescaleSlope/Intercept and padding.

    HU = stored * RescaleSlope + RescaleIntercept (PS3.3 C.11.1, the Modality LUT). Padded
    pixels become AIR_HU. PhotometricInterpretation MONOCHROME1 does not change the values
    because it only inverts the display, which DICOM applies after the Modality LUT.

    When RescaleSlope or RescaleIntercept is missing, slope 1 and intercept 0 are assumed only
    if the values already look like HU (some pixel below HU_LIKE_MAX_MINIMUM). Otherwise the
    file is rejected, because guessing an intercept would silently shift every HU value.

    Returns:
        Float32 HU array (F, H, W) and facts: "rescale_assumed" (bool), "padded_pixels"
        (count), "photometric".

    Raises:
        DataError: rescale tags missing on values that do not look like HU, or a slope that is
            zero or not finite.
    """
    padding = _padding_mask(ds, stored)
    hu = np.empty(stored.shape, dtype=np.float32)
    assumed = False
    for frame in range(stored.shape[0]):
        slope = _frame_attribute(ds, "PixelValueTransformationSequence", "RescaleSlope", frame)
        intercept = _frame_attribute(
            ds, "PixelValueTransformationSequence", "RescaleIntercept", frame
        )
        if slope in (None, "") or intercept in (None, ""):
            assumed = True
        slope = 1.0 if slope in (None, "") else _to_float(slope, "RescaleSlope", path)
        intercept = (
            0.0 if intercept in (None, "") else _to_float(intercept, "RescaleIntercept", path)
        )
        if not np.isfinite(slope) or slope == 0 or not np.isfinite(intercept):
            raise DataError(
                f"{path}: invalid RescaleSlope {slope} / RescaleIntercept {intercept}; expected "
                "a finite non-zero slope. Fix the header or re-export the series."
            )
        hu[frame] = stored[frame].astype(np.float64) * slope + intercept

    if assumed:
        valid = hu[~padding]
        lowest = float(valid.min()) if valid.size else 0.0
        if lowest >= HU_LIKE_MAX_MINIMUM:
            raise DataError(
                f"{path}: RescaleSlope/RescaleIntercept missing and the stored values "
                f"({lowest:.0f}..{float(valid.max()):.0f}) do not look like HU (no pixel below "
                f"{HU_LIKE_MAX_MINIMUM:.0f}); add the rescale tags or export the series again "
                "from the scanner."
            )
    hu[padding] = AIR_HU
    facts = {
        "rescale_assumed": assumed,
        "padded_pixels": int(padding.sum()),
        "photometric": str(ds.get("PhotometricInterpretation", "")),
    }
    return hu, facts


def _vector(value: Any, length: int, keyword: str, path: Path) -> np.ndarray | None:
    """Return a numeric tag as a float vector of `length`, None when absent."""
    if value in (None, ""):
        return None
    try:
        vector = np.array([float(item) for item in value], dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise DataError(f"{path}: {keyword} {value!r} is not numeric.") from err
    if vector.shape != (length,) or not np.all(np.isfinite(vector)):
        raise DataError(f"{path}: {keyword} has {vector.size} values; expected {length} numbers.")
    return vector


def frame_orientation(
    ds: Dataset, path: Path, frame: int = 0
) -> tuple[np.ndarray, np.ndarray] | None:
    """Return (row cosine, column cosine) from ImageOrientationPatient, None when absent."""
    value = _frame_attribute(ds, "PlaneOrientationSequence", "ImageOrientationPatient", frame)
    cosines = _vector(value, 6, "ImageOrientationPatient", path)
    if cosines is None:
        return None
    return cosines[:3], cosines[3:]


def frame_position(ds: Dataset, path: Path, frame: int = 0) -> np.ndarray | None:
    """Return ImagePositionPatient (mm, LPS) of a frame, None when absent."""
    value = _frame_attribute(ds, "PlanePositionSequence", "ImagePositionPatient", frame)
    return _vector(value, 3, "ImagePositionPatient", path)


def pixel_spacing(ds: Dataset, path: Path, frame: int = 0) -> tuple[float, float] | None:
    """Return PixelSpacing (row spacing, column spacing) in mm, None when absent."""
    value = _frame_attribute(ds, "PixelMeasuresSequence", "PixelSpacing", frame)
    spacing = _vector(value, 2, "PixelSpacing", path)
    if spacing is None:
        return None
    if np.any(spacing <= 0):
        raise DataError(f"{path}: PixelSpacing {list(spacing)} must be positive.")
    return float(spacing[0]), float(spacing[1])


def nominal_slice_gap(ds: Dataset) -> float | None:
    """Return SpacingBetweenSlices, else SliceThickness, in mm, or None when both are absent."""
    for keyword in ("SpacingBetweenSlices", "SliceThickness"):
        value = ds.get(keyword)
        try:
            gap = float(value) if value not in (None, "") else 0.0
        except (TypeError, ValueError):
            continue
        if gap > 0:
            return gap
    return None


def read_dicom_file(path: str | Path) -> CTImage:
    """Read one DICOM file as an HU slice (H, W), or as a volume (D, H, W) when multi-frame.

    Axial images are flipped into the radiological view (rows anterior to posterior, columns
    patient right to left). Other planes are returned as stored, with a warning.

    Raises:
        DataError: unreadable, non-CT, oversized or corrupt file.
        NotImplementedError: MR modality, colour image, undecodable transfer syntax, or a
            multi-frame file that is not axial.
    """
    path = Path(path)
    ds = read_dataset(path)
    check_ct_header(ds, path)
    hu, facts = stored_to_hu(ds, decode_pixels(ds, path), path)
    if facts["rescale_assumed"]:
        logger.warning("%s: rescale tags missing; stored values already look like HU", path.name)
    meta: dict[str, Any] = dict(
        facts, transfer_syntax=str(ds.file_meta.get("TransferSyntaxUID", ""))
    )
    if hu.shape[0] > 1:
        return _assemble_frames(ds, hu, path, meta)

    orientation = frame_orientation(ds, path)
    spacing = pixel_spacing(ds, path)
    pixels = hu[0]
    if orientation is None:
        meta["plane"] = "unknown"
    else:
        meta["plane"] = plane_name(np.cross(*orientation))
        if meta["plane"] == "axial":
            flip = radiological_flip(*orientation)
            pixels = flip.apply(pixels)
            spacing = flip.spacing(spacing) if spacing else None
        else:
            logger.warning(
                "%s: %s slice kept as stored; the model expects axial slices",
                path.name,
                meta["plane"],
            )
    return CTImage(
        pixels=pixels, is_hu=True, spacing_mm=spacing, source="dicom", path=str(path), meta=meta
    )


def _assemble_frames(ds: Dataset, hu: np.ndarray, path: Path, meta: dict[str, Any]) -> CTImage:
    """Order the frames of a multi-frame file by position and return the HU volume."""
    frames = hu.shape[0]
    orientation = frame_orientation(ds, path)
    spacing = pixel_spacing(ds, path)

    # Only enhanced multi-frame files give each frame its own ImagePositionPatient. The single
    # top-level position of other multi-frame files cannot order the frames.
    positions = None
    if ds.get("PerFrameFunctionalGroupsSequence"):
        positions = [frame_position(ds, path, frame) for frame in range(frames)]
    if orientation is None or positions is None or any(item is None for item in positions):
        # NOTE: without per-frame positions the stored frame order and the nominal gap are
        # used, so the volume may run superior to inferior.
        logger.warning(
            "%s: frames carry no ImagePositionPatient; stored frame order kept", path.name
        )
        gap = nominal_slice_gap(ds)
        meta["frame_order"] = "stored"
        volume = hu
    else:
        volume, gap, flip, uneven = stack_axial(
            list(hu), np.stack(positions), orientation, str(path)
        )
        spacing = flip.spacing(spacing) if spacing else None
        meta["frame_order"] = "position"
        meta["spacing_uneven"] = uneven
        if uneven:
            logger.warning(
                "%s: uneven frame spacing; the median gap %.3f mm is used", path.name, gap
            )

    meta["plane"] = "axial" if meta["frame_order"] == "position" else "unknown"
    spacing_mm = (gap, *spacing) if gap is not None and spacing else None
    return CTImage(
        pixels=volume, is_hu=True, spacing_mm=spacing_mm, source="dicom", path=str(path), meta=meta
    )
