"""NIfTI volumes to HU arrays (D, H, W) in the radiological view, with spacing from the header."""

from __future__ import annotations

import logging
import struct
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError

from nephrolith.common.constants import MAX_PIXELS_PER_SLICE, MAX_VOXELS_PER_VOLUME
from nephrolith.common.errors import DataError
from nephrolith.common.image import CTImage
from nephrolith.common.io._files import check_file, describe_content

logger = logging.getLogger(__name__)

# A CT volume in HU contains air or fat below this value, but a mask or an MR volume does not.
HU_LIKE_MAX_MINIMUM = -200.0

_NIBABEL_ERRORS = (ImageFileError, OSError, EOFError, ValueError, zlib.error, struct.error)


def _load(path: Path) -> nib.spatialimages.SpatialImage:
    """Open the NIfTI header with nibabel, leaving the voxel data on disk."""
    check_file(path, "a NIfTI volume (.nii or .nii.gz)")
    try:
        image = nib.load(path)
    except _NIBABEL_ERRORS as err:
        raise DataError(
            f"{path}: not a readable NIfTI file ({describe_content(path)}; {type(err).__name__}: "
            f"{err}); expected a NIfTI-1 or NIfTI-2 volume. Copy or convert the file again."
        ) from err
    if not isinstance(image, nib.Nifti1Image | nib.Nifti2Image):
        raise DataError(f"{path}: nibabel read a {type(image).__name__}; expected a NIfTI volume.")
    return image


def _check_shape(image: nib.spatialimages.SpatialImage, path: Path) -> None:
    """Reject more than one volume and oversized volumes before the data is read."""
    shape = image.shape
    if len(shape) > 3 and int(np.prod(shape[3:])) > 1:
        raise NotImplementedError(
            f"{path}: NIfTI of shape {shape} contains {int(np.prod(shape[3:]))} volumes; only "
            "one 3-D CT volume per file is supported. Split the file into single volumes."
        )
    if len(shape) < 2:
        raise DataError(f"{path}: NIfTI of shape {shape}; expected a 3-D volume.")
    if (
        int(shape[0]) * int(shape[1]) > MAX_PIXELS_PER_SLICE
        or int(np.prod(shape)) > MAX_VOXELS_PER_VOLUME
    ):
        raise DataError(
            f"{path}: NIfTI of shape {shape} exceeds the limit of {MAX_PIXELS_PER_SLICE} pixels "
            f"per slice or {MAX_VOXELS_PER_VOLUME} voxels; rejected before reading."
        )


def read_nifti(path: str | Path) -> CTImage:
    """Read a NIfTI CT volume as HU (D, H, W).

    The volume is first reoriented to the closest canonical RAS+ orientation with
    nibabel.as_closest_canonical. Its axis 0 then runs from the patient's left to right, axis 1
    from posterior to anterior and axis 2 from inferior to superior. The array is transposed to
    (z, y, x) and flipped so that D runs inferior to superior, rows anterior to posterior and
    columns from the patient's right to left, which is the radiological view the DICOM readers
    return. Oblique volumes are only permuted and flipped, not resampled. Values come from
    get_fdata, which applies scl_slope and scl_inter. They are assumed to be HU, with a warning
    when they do not look like CT.

    Returns:
        CTImage with source "nifti", spacing_mm (z, row, col) from the zooms and meta
        "axcodes" (orientation of the file on disk) and "affine_known".

    Raises:
        DataError: missing, empty, corrupt, truncated or oversized file.
        NotImplementedError: 4-D file with more than one volume.
    """
    path = Path(path)
    image = _load(path)
    _check_shape(image, path)

    # With sform and qform codes both 0 the affine only scales, so the orientation is a guess.
    header = image.header
    affine_known = int(header["sform_code"]) > 0 or int(header["qform_code"]) > 0
    if not affine_known:
        logger.warning("%s: NIfTI has no sform or qform; orientation assumed RAS", path.name)
    axcodes = "".join(nib.aff2axcodes(image.affine))

    try:
        if image.ndim != 3:
            # A 2-D slice gains a z axis of length 1, and a 4-D or 5-D file with one volume
            # loses its extra axes.
            shape3 = (*image.shape[:2], image.shape[2] if image.ndim > 2 else 1)
            voxels = image.get_fdata(dtype=np.float32).reshape(shape3)
            image = nib.Nifti1Image(voxels, image.affine)
        canonical = nib.as_closest_canonical(image)
        data = canonical.get_fdata(dtype=np.float32)
    except _NIBABEL_ERRORS as err:
        raise DataError(
            f"{path}: NIfTI voxel data could not be read ({type(err).__name__}: {err}); the "
            "file is probably truncated or corrupt. Copy or convert it again."
        ) from err
    if not np.all(np.isfinite(data)):
        raise DataError(f"{path}: NIfTI contains NaN or infinite voxels; expected HU values.")

    # RAS+ (x, y, z) -> (z, y, x), then y reversed (anterior first), x reversed (right first).
    volume = np.ascontiguousarray(np.transpose(data, (2, 1, 0))[:, ::-1, ::-1])
    zooms = canonical.header.get_zooms()[:3]
    spacing_mm = (float(zooms[2]), float(zooms[1]), float(zooms[0]))

    lowest = float(volume.min())
    if lowest >= HU_LIKE_MAX_MINIMUM:
        logger.warning(
            "%s: lowest value %.0f; a CT volume in HU contains air (about -1000). "
            "Check that the file is CT and not a mask or an MR volume",
            path.name,
            lowest,
        )
    meta = {"axcodes": axcodes, "affine_known": affine_known}
    return CTImage(
        pixels=volume, is_hu=True, spacing_mm=spacing_mm, source="nifti", path=str(path), meta=meta
    )
