"""CT readers: DICOM files and series, NIfTI volumes and PNG/JPEG exports, all returning CTImage.

DICOM and NIfTI give Hounsfield units with spacing in mm; PNG/JPEG give display grey levels
0..255 with is_hu False. Volumes are (D, H, W) from inferior to superior in the radiological
view (rows anterior to posterior, columns patient right to left).
"""

from __future__ import annotations

from pathlib import Path

from nephrolith.common.constants import DICOM_SUFFIXES, EXPORT_SUFFIXES, NIFTI_SUFFIXES
from nephrolith.common.errors import DataError
from nephrolith.common.image import CTImage
from nephrolith.common.io._files import describe_content, has_dicom_marker
from nephrolith.common.io.dicom import read_dicom_file
from nephrolith.common.io.dicom_series import read_dicom_series
from nephrolith.common.io.exports import read_export
from nephrolith.common.io.nifti import read_nifti

__all__ = [
    "SUPPORTED_SUFFIXES",
    "is_supported",
    "read_dicom_file",
    "read_dicom_series",
    "read_export",
    "read_image",
    "read_nifti",
    "read_study",
]

# Lower-case file suffixes read_image accepts. Files with another suffix or none (DICOM
# folders often hold names such as "IM0001" or "CT.1.2.840...") are read as DICOM when they
# carry the "DICM" marker.
SUPPORTED_SUFFIXES: frozenset[str] = frozenset(
    (DICOM_SUFFIXES - {""}) | set(NIFTI_SUFFIXES) | EXPORT_SUFFIXES
)


def _kind(path: Path) -> str | None:
    """Return "nifti", "export" or "dicom" for a file name, None when the suffix is unknown."""
    name = path.name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    suffix = path.suffix.lower()
    if suffix in EXPORT_SUFFIXES:
        return "export"
    if suffix in DICOM_SUFFIXES - {""}:
        return "dicom"
    return None


def is_supported(path: str | Path) -> bool:
    """Return True when read_image would try to read the file.

    True for the suffixes in SUPPORTED_SUFFIXES, and for an existing file with any other
    suffix that carries the DICOM "DICM" marker at byte 128. The file content is not validated
    beyond that, so read_image may still raise DataError.
    """
    path = Path(path)
    if _kind(path) is not None:
        return True
    return path.is_file() and has_dicom_marker(path)


def read_image(path: str | Path) -> CTImage:
    """Read one file: a DICOM slice (multi-frame: volume), a NIfTI volume or a PNG/JPEG slice.

    The reader is chosen by suffix; files with an unknown suffix are read as DICOM when they
    carry the "DICM" marker.

    Raises:
        DataError: unsupported suffix, or a missing, empty, corrupt, truncated, non-CT or
            oversized file (the message names the file and what to do).
        NotImplementedError: plausible but unsupported input (MR, colour DICOM, 4-D NIfTI
            with several volumes, non-axial multi-frame DICOM).
    """
    path = Path(path)
    kind = _kind(path)
    if kind is None and path.is_file() and has_dicom_marker(path):
        kind = "dicom"
    if kind == "nifti":
        return read_nifti(path)
    if kind == "export":
        return read_export(path)
    if kind == "dicom":
        return read_dicom_file(path)
    if path.is_dir():
        raise DataError(
            f"{path}: is a folder; expected a file. Use read_study for a DICOM series folder."
        )
    if not path.exists():
        raise DataError(f"{path}: file not found; expected a DICOM, NIfTI, PNG or JPEG file.")
    raise DataError(
        f"{path}: unsupported file ({describe_content(path)}); expected DICOM, NIfTI "
        f"(.nii, .nii.gz), PNG or JPEG. Supported suffixes: "
        f"{', '.join(sorted(SUPPORTED_SUFFIXES))}."
    )


def read_study(path: str | Path) -> CTImage:
    """Read a study: a folder as one DICOM series, a file with read_image.

    ZIP archives are not opened here; the caller extracts them first.

    Raises:
        DataError: see read_image and read_dicom_series.
        NotImplementedError: see read_image and read_dicom_series.
    """
    path = Path(path)
    if path.is_dir():
        return read_dicom_series(path)
    if path.suffix.lower() == ".zip":
        raise DataError(f"{path}: ZIP archive; extract it and pass the series folder.")
    return read_image(path)
