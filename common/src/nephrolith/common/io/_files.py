"""File checks shared by the readers: existence, empty files and format sniffing by magic bytes."""

from __future__ import annotations

from pathlib import Path

from nephrolith.common.errors import DataError

# A DICOM Part 10 file has a 128-byte preamble followed by the marker "DICM" (PS3.10 7.1).
DICOM_MARKER_OFFSET = 128
DICOM_MARKER = b"DICM"

# Leading bytes of the other formats, used only to make error messages precise.
_MAGIC_PREFIXES: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x1f\x8b", "gzip"),
    (b"PK\x03\x04", "ZIP"),
    (b"%PDF", "PDF"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
)


def check_file(path: Path, expected: str) -> None:
    """Raise DataError when `path` is missing, not a regular file or empty.

    Args:
        path: file to check.
        expected: what the caller expects the file to be, for the message (e.g. "a DICOM file").

    Raises:
        DataError: the file does not exist, is a folder or has zero bytes.
    """
    if not path.exists():
        raise DataError(f"{path}: file not found; expected {expected}. Check the path.")
    if not path.is_file():
        raise DataError(f"{path}: not a regular file; expected {expected}.")
    if path.stat().st_size == 0:
        raise DataError(
            f"{path}: file is empty (0 bytes); expected {expected}. "
            "The copy or export was probably interrupted: copy the file again."
        )


def has_dicom_marker(path: Path) -> bool:
    """Return True when the file carries the DICOM Part 10 "DICM" marker at byte 128."""
    try:
        with path.open("rb") as handle:
            handle.seek(DICOM_MARKER_OFFSET)
            return handle.read(len(DICOM_MARKER)) == DICOM_MARKER
    except OSError:
        return False


def sniff_format(path: Path) -> str | None:
    """Return the format name the file's leading bytes point to, or None when unknown.

    Only used to tell the user what a misnamed file really is ("DICOM", "PNG", "JPEG",
    "gzip", "ZIP", "PDF", "JPEG 2000" or "text").
    """
    if has_dicom_marker(path):
        return "DICOM"
    try:
        with path.open("rb") as handle:
            head = handle.read(512)
    except OSError:
        return None
    for prefix, name in _MAGIC_PREFIXES:
        if head.startswith(prefix):
            return name
    if head and all(byte in b"\t\n\r" or 32 <= byte < 127 for byte in head):
        return "text"
    return None


def describe_content(path: Path) -> str:
    """Return a short phrase on what the file looks like, for error messages."""
    found = sniff_format(path)
    if found is None:
        return "content of an unknown format"
    return f"{found} content"
