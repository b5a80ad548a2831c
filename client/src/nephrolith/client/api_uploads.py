"""Upload handling for the inference API: type sniffing, size caps and safe unzipping.

Nothing here trusts a client file name. Uploads are written to a per-request
temporary folder under names this module generates, and the type of a file is
read from its first bytes, not from its name.
"""

from __future__ import annotations

import gzip
import logging
import shutil
import stat
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO

logger = logging.getLogger(__name__)

# Upload kinds, recognised by their first bytes.
KIND_PNG = "png"
KIND_JPEG = "jpeg"
KIND_DICOM = "dicom"
KIND_ZIP = "zip"
KIND_NIFTI = "nifti"
KIND_NIFTI_GZ = "nifti-gz"

SLICE_KINDS = frozenset({KIND_PNG, KIND_JPEG, KIND_DICOM})
STUDY_KINDS = frozenset({KIND_ZIP, KIND_NIFTI, KIND_NIFTI_GZ})

# Suffixes the readers dispatch on, one per kind.
_SUFFIX = {
    KIND_PNG: ".png",
    KIND_JPEG: ".jpg",
    KIND_DICOM: ".dcm",
    KIND_ZIP: ".zip",
    KIND_NIFTI: ".nii",
    KIND_NIFTI_GZ: ".nii.gz",
}

_CHUNK = 1 << 20


class UploadError(Exception):
    """An upload the API rejects, with the HTTP status of the error response."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class ZipLimits:
    """Caps applied to a zipped series before and while it is extracted.

    Attributes:
        max_members: maximum number of file members.
        max_total_bytes: maximum sum of the uncompressed member sizes.
    """

    max_members: int
    max_total_bytes: int


def _is_nifti_header(head: bytes) -> bool:
    # NIfTI-1 starts with sizeof_hdr = 348 and has magic "n+1\0" at byte 344;
    # NIfTI-2 starts with 540 and has "n+2\0" at byte 4.
    if len(head) >= 348:
        for order in ("<", ">"):
            if struct.unpack(order + "i", head[:4])[0] == 348 and head[344:347] == b"n+1":
                return True
    if len(head) >= 8:
        for order in ("<", ">"):
            if struct.unpack(order + "i", head[:4])[0] == 540 and head[4:7] == b"n+2":
                return True
    return False


def sniff_kind(path: Path) -> str | None:
    """Return the upload kind read from the file's leading bytes, or None when unknown.

    DICOM files must be DICOM Part 10 files (128-byte preamble followed by "DICM").
    A gzip stream counts as NIfTI only when its decompressed start is a NIfTI header.
    """
    with open(path, "rb") as handle:
        head = handle.read(1024)
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return KIND_PNG
    if head.startswith(b"\xff\xd8\xff"):
        return KIND_JPEG
    if len(head) >= 132 and head[128:132] == b"DICM":
        return KIND_DICOM
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return KIND_ZIP
    if head.startswith(b"\x1f\x8b"):
        try:
            with gzip.open(path, "rb") as stream:
                inner = stream.read(544)
        except (OSError, EOFError, zlib.error):
            return None
        return KIND_NIFTI_GZ if _is_nifti_header(inner) else None
    if _is_nifti_header(head):
        return KIND_NIFTI
    return None


def save_upload(stream: IO[bytes], folder: Path) -> tuple[Path, str]:
    """Write an uploaded stream under a generated name and rename it after its kind.

    Args:
        stream: the uploaded file's byte stream.
        folder: the request's temporary folder.

    Returns:
        (path, kind) with the file renamed to the suffix the readers expect.

    Raises:
        UploadError: 400 when the upload is empty, 415 when its type is not recognised.
    """
    raw = folder / "upload.bin"
    with open(raw, "wb") as out:
        shutil.copyfileobj(stream, out, _CHUNK)
    if raw.stat().st_size == 0:
        raise UploadError(
            400, "the 'file' field is empty; choose a non-empty file and send it again"
        )

    kind = sniff_kind(raw)
    if kind is None:
        raise UploadError(
            415,
            "unsupported file type: expected PNG, JPEG, DICOM (Part 10, with the 'DICM' "
            "preamble), a .zip of a DICOM series, or a NIfTI .nii/.nii.gz volume",
        )
    path = raw.rename(folder / f"upload{_SUFFIX[kind]}")
    return path, kind


def gunzip_capped(path: Path, max_bytes: int) -> Path:
    """Decompress a .nii.gz upload to .nii, stopping once `max_bytes` are exceeded.

    Checking the size while decompressing catches gzip bombs before they fill
    the disk or the memory.

    Raises:
        UploadError: 422 when the stream is corrupt or decompresses past the cap.
    """
    target = path.with_name("volume.nii")
    written = 0
    try:
        with gzip.open(path, "rb") as source, open(target, "wb") as out:
            while chunk := source.read(_CHUNK):
                written += len(chunk)
                if written > max_bytes:
                    raise UploadError(
                        422,
                        f"the NIfTI volume decompresses to more than {max_bytes // 2**20} MiB "
                        "(possible decompression bomb); send a smaller volume or raise "
                        "NEPHROLITH_MAX_STUDY_MB",
                    )
                out.write(chunk)
    except (OSError, EOFError, zlib.error) as err:
        raise UploadError(
            422, f"the .nii.gz upload is corrupt or truncated ({err}); export the volume again"
        ) from err
    path.unlink()
    return target


def member_escapes(name: str) -> bool:
    """Return True when a zip member name would extract outside its folder (zip-slip)."""
    normalised = name.replace("\\", "/")
    if normalised.startswith("/") or (len(normalised) > 1 and normalised[1] == ":"):
        return True
    return ".." in normalised.split("/")


def _is_symlink(info: zipfile.ZipInfo) -> bool:
    return stat.S_ISLNK(info.external_attr >> 16)


def _check_members(members: list[zipfile.ZipInfo], limits: ZipLimits) -> list[zipfile.ZipInfo]:
    files = []
    for info in members:
        if member_escapes(info.filename):
            raise UploadError(
                422,
                "a zip member path leaves the archive's folder (absolute path or '..'); "
                "zip the series folder itself and send it again",
            )
        if _is_symlink(info):
            raise UploadError(
                422, "the zip contains a symbolic link; zip the DICOM files themselves, not links"
            )
        if info.flag_bits & 0x1:
            raise UploadError(422, "the zip is encrypted; send an unencrypted zip of the series")
        if not info.is_dir():
            files.append(info)
    if not files:
        raise UploadError(422, "the zip contains no files; zip the folder of the DICOM series")
    if len(files) > limits.max_members:
        raise UploadError(
            422,
            f"the zip contains {len(files)} files, more than the limit of {limits.max_members} "
            "(possible zip bomb); send one series per request",
        )
    total = sum(info.file_size for info in files)
    if total > limits.max_total_bytes:
        raise UploadError(
            422,
            f"the zip expands to {total // 2**20} MiB, more than the limit of "
            f"{limits.max_total_bytes // 2**20} MiB (possible zip bomb); send one series "
            "per request or raise NEPHROLITH_MAX_STUDY_MB",
        )
    return files


def _copy_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path, budget: int) -> int:
    # Count real bytes: the sizes in a zip's directory are written by the sender.
    written = 0
    with archive.open(info) as source, open(target, "wb") as out:
        while chunk := source.read(_CHUNK):
            written += len(chunk)
            if written > budget:
                raise UploadError(
                    422,
                    "the zip expands past its stated size and the limit (possible zip bomb); "
                    "send one series per request",
                )
            out.write(chunk)
    return written


def extract_zip(path: Path, folder: Path, limits: ZipLimits) -> Path:
    """Extract a zipped DICOM series into `folder` under generated member names.

    Member names are only checked, never used: the files become 00000.dcm,
    00001.dcm, ... in one flat folder, which is what a series reader expects.

    Args:
        path: the uploaded zip.
        folder: an empty folder to extract into.
        limits: member count and total size caps.

    Returns:
        `folder`.

    Raises:
        UploadError: 422 for a corrupt or encrypted zip, zip-slip member names,
            symbolic links, or a zip over the caps.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            files = _check_members(archive.infolist(), limits)
            budget = limits.max_total_bytes
            for index, info in enumerate(files):
                budget -= _copy_member(archive, info, folder / f"{index:05d}.dcm", budget)
    except UploadError:
        raise
    except (
        zipfile.BadZipFile,
        zlib.error,
        EOFError,
        OSError,
        RuntimeError,
        NotImplementedError,
        ValueError,
    ) as err:
        # RuntimeError: encrypted member; NotImplementedError: unknown compression method.
        raise UploadError(
            422, f"the zip is corrupt or unreadable ({err}); zip the series again and resend"
        ) from err
    logger.debug("extracted %d zip members", len(files))
    return folder
