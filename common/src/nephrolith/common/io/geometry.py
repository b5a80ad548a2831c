"""Patient-space geometry of DICOM slices: radiological view, slice order and slice spacing.

Coordinates are DICOM patient coordinates (LPS): +x to the patient's left, +y posterior,
+z superior (PS3.3 C.7.6.2.1.1).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nephrolith.common.errors import DataError

# Two slices closer than this along the normal (mm) are taken as duplicates of one position.
DUPLICATE_POSITION_MM = 1e-3


@dataclass(frozen=True)
class InPlaneFlip:
    """Array operations that turn an axial slice into the radiological view.

    Attributes:
        transpose: swap rows and columns (slice stored rotated by 90 degrees).
        flip_rows: reverse the row order so rows run anterior to posterior.
        flip_cols: reverse the column order so columns run from patient right to left.
    """

    transpose: bool = False
    flip_rows: bool = False
    flip_cols: bool = False

    def apply(self, pixels: np.ndarray) -> np.ndarray:
        """Return `pixels` (..., H, W) in the radiological view, as a contiguous array."""
        if self.transpose:
            pixels = np.swapaxes(pixels, -1, -2)
        if self.flip_rows:
            pixels = pixels[..., ::-1, :]
        if self.flip_cols:
            pixels = pixels[..., :, ::-1]
        return np.ascontiguousarray(pixels)

    def spacing(self, row_col: tuple[float, float]) -> tuple[float, float]:
        """Return the (row, col) pixel spacing after the flip."""
        return (row_col[1], row_col[0]) if self.transpose else row_col


def radiological_flip(row_cosine: np.ndarray, col_cosine: np.ndarray) -> InPlaneFlip:
    """Return the flip that makes an axial slice's rows run A->P and columns R->L.

    DICOM patient coordinates are LPS: +x points to the patient's left and +y posterior, so
    the target is a row direction (ImageOrientationPatient[:3]) along +x and a column
    direction (ImageOrientationPatient[3:]) along +y.
    """
    transpose = abs(row_cosine[1]) > abs(row_cosine[0])
    if transpose:
        row_cosine, col_cosine = col_cosine, row_cosine
    return InPlaneFlip(transpose, flip_rows=col_cosine[1] < 0, flip_cols=row_cosine[0] < 0)


def plane_name(normal: np.ndarray) -> str:
    """Return "sagittal", "coronal" or "axial" for the patient axis closest to `normal`."""
    return ("sagittal", "coronal", "axial")[int(np.argmax(np.abs(normal)))]


def upward_normal(row_cosine: np.ndarray, col_cosine: np.ndarray) -> np.ndarray:
    """Return the slice normal, signed so that it points superior (+z in LPS)."""
    normal = np.cross(row_cosine, col_cosine)
    return -normal if normal[2] < 0 else normal


def slice_spacing(projections: np.ndarray) -> tuple[float, bool]:
    """Return the median gap between sorted slice positions and whether the gaps are uneven.

    Gaps count as uneven when one differs from the median by more than 5 % and 0.01 mm, which
    tolerates rounding in ImagePositionPatient but flags a missing slice or a mixed series.
    """
    gaps = np.diff(np.sort(projections))
    median = float(np.median(gaps))
    uneven = bool(np.any(np.abs(gaps - median) > max(0.05 * median, 0.01)))
    return median, uneven


def stack_axial(
    slices: list[np.ndarray],
    positions: np.ndarray,
    orientation: tuple[np.ndarray, np.ndarray],
    where: str,
) -> tuple[np.ndarray, float | None, InPlaneFlip, bool]:
    """Order axial slices from inferior to superior and turn them into the radiological view.

    Args:
        slices: N arrays (H, W) of one shape.
        positions: ImagePositionPatient of each slice, (N, 3) in mm.
        orientation: (row cosine, column cosine) shared by all slices.
        where: file or folder named in error messages.

    Returns:
        Volume (N, H, W), median slice gap in mm (None for one slice), the in-plane flip
        that was applied, and whether the gaps are uneven.

    Raises:
        NotImplementedError: the slices are sagittal or coronal.
        DataError: two slices share one position.
    """
    normal = upward_normal(*orientation)
    plane = plane_name(normal)
    if plane != "axial":
        raise NotImplementedError(
            f"{where}: {plane} slices are not supported; the detector reads axial CT. "
            "Export the axial series or reformat the volume to axial slices."
        )
    projections = positions @ normal
    order = np.argsort(projections, kind="stable")
    gap, uneven = (None, False)
    if len(slices) > 1:
        gap, uneven = slice_spacing(projections)
        if np.min(np.diff(projections[order])) < DUPLICATE_POSITION_MM:
            raise DataError(
                f"{where}: two slices share one ImagePositionPatient; expected one slice per "
                "position. Remove the duplicate slices or export a single series."
            )
    flip = radiological_flip(*orientation)
    volume = flip.apply(np.stack([slices[index] for index in order]))
    return volume, gap, flip, uneven
