"""Helpers shared by the inference API tests: tiny checkpoints, DICOM writers, multipart bodies."""

from __future__ import annotations

import io
import os
import re
import subprocess
import time
import uuid
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

REPO_ROOT = Path(__file__).resolve().parents[1]
PYTHON = REPO_ROOT / ".venv" / "bin" / "python"

# Identifiers written into test DICOM files; they must never reach a log line.
PATIENT_NAME = "Doe^Johnathan"
PATIENT_ID = "PID-98765-XYZ"


def make_checkpoint(directory: Path, threshold: float = 0.5, image_size: int = 64) -> Path:
    """Save a randomly initialised tiny model with its preprocessing into `directory`."""
    from nephrolith.common import weights
    from nephrolith.common.config import PreprocessConfig, to_dict
    from nephrolith.common.model import build_model, tiny_model_config

    model = build_model(tiny_model_config(image_size))
    metadata = {
        "preprocess": to_dict(PreprocessConfig(image_size=image_size)),
        "class_names": ["no_stone", "stone"],
        "threshold": threshold,
        "provenance": {"trained_on": "nothing (random init, test checkpoint)"},
    }
    return weights.save_checkpoint(directory, model, metadata)


def write_dicom(
    path: Path,
    hu: np.ndarray,
    *,
    modality: str = "CT",
    spacing_mm: tuple[float, float] = (0.7, 0.7),
    z_mm: float = 0.0,
    slice_thickness_mm: float = 2.0,
) -> Path:
    """Write one int16 DICOM slice (slope 1, intercept -1024) holding `hu`."""
    meta = FileMetaDataset()
    sop_class = MRImageStorage if modality == "MR" else CTImageStorage
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.2"
    ds.Rows, ds.Columns = hu.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleSlope = 1
    ds.RescaleIntercept = -1024
    ds.PixelSpacing = list(spacing_mm)
    ds.SliceThickness = slice_thickness_mm
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [0.0, 0.0, z_mm]
    stored = np.round(hu + 1024).astype(np.int16)
    ds.PixelData = stored.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def phantom_slice(size: int = 96, stone_hu: float = 900.0) -> np.ndarray:
    """Return an abdomen-like HU slice: air, a soft-tissue disc and a small dense stone."""
    rows, cols = np.mgrid[0:size, 0:size]
    centre = size / 2
    hu = np.full((size, size), -1000.0)
    hu[(rows - centre) ** 2 + (cols - centre) ** 2 < (0.4 * size) ** 2] = 40.0
    hu[40:44, 50:53] = stone_hu
    return hu


def multipart(field: str, filename: str, content: bytes) -> tuple[bytes, str]:
    """Return (body, content type) of a multipart/form-data request with one file field."""
    boundary = uuid.uuid4().hex
    body = (
        (
            f"--{boundary}\r\n"
            f'Content-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + content
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


def file_field(content: bytes, filename: str = "upload.bin") -> dict:
    """Return Flask test client form data with `content` as the 'file' field."""
    return {"file": (io.BytesIO(content), filename)}


def server_command(checkpoint: Path, console_script: bool = True) -> list[str]:
    """Return the command starting the API on 127.0.0.1 with a free port (--port 0)."""
    options = ["--host", "127.0.0.1", "--port", "0", "--threads", "4"]
    if console_script:
        script = REPO_ROOT / ".venv" / "bin" / "nephrolith-client"
        return [str(script), "--log-level", "INFO", "serve", "--model", str(checkpoint), *options]
    return [str(PYTHON), "-m", "nephrolith.client.serve", "--checkpoint", str(checkpoint), *options]


def start_server(
    command: list[str], log_path: Path, env: dict[str, str] | None = None, timeout_s: float = 120.0
) -> tuple[subprocess.Popen, int]:
    """Start the API server command and wait until it logs the port it listens on.

    Returns:
        (process, port).

    Raises:
        RuntimeError: when the server exits or does not log its port in time.
    """
    full_env = {**os.environ, **(env or {})}
    with open(log_path, "wb") as log:
        # The child keeps its own copy of the file descriptor.
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=full_env, cwd=REPO_ROOT
        )
    deadline = time.monotonic() + timeout_s
    pattern = re.compile(rb"on http://127\.0\.0\.1:(\d+)")
    while time.monotonic() < deadline:
        match = pattern.search(log_path.read_bytes())
        if match:
            return process, int(match.group(1))
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{log_path.read_text()}")
        time.sleep(0.2)
    process.kill()
    raise RuntimeError(
        f"server did not report its port within {timeout_s} s:\n{log_path.read_text()}"
    )


def stop_server(process: subprocess.Popen, timeout_s: float = 30.0) -> int:
    """Send SIGTERM and return the exit code (kills the process after `timeout_s`)."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
    return process.returncode
