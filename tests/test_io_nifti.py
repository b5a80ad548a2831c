"""Tests of the NIfTI reader on real volumes and on files written with nibabel."""

from __future__ import annotations

import gzip
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from nephrolith.common.errors import DataError
from nephrolith.common.io import is_supported, read_image, read_study


def write_nifti(
    path: Path,
    data: np.ndarray,
    affine: np.ndarray,
    slope: float | None = None,
    intercept: float | None = None,
) -> Path:
    """Save `data` with `affine`, optionally with scl_slope/scl_inter in the header."""
    image = nib.Nifti1Image(data, affine)
    if slope is not None:
        image.header.set_slope_inter(slope, intercept)
    nib.save(image, path)
    return path


def marker_volume() -> np.ndarray:
    """Return an int16 (x=4, y=3, z=2) volume of -1000 with a 500 HU marker at (0, 0, 1)."""
    data = np.full((4, 3, 2), -1000, dtype=np.int16)
    data[0, 0, 1] = 500
    return data


def test_ras_volume_to_radiological_view(tmp_path: Path) -> None:
    # In RAS, x grows toward the patient's right and y toward anterior, so voxel (0, 0) is
    # left posterior.
    path = write_nifti(tmp_path / "ras.nii.gz", marker_volume(), np.diag([1.0, 2.0, 3.0, 1.0]))
    image = read_image(path)
    assert image.pixels.shape == (2, 3, 4)
    assert image.spacing_mm == (3.0, 2.0, 1.0)
    # Upper slice (D index 1), last row (posterior), last column (patient left).
    assert image.pixels[1, 2, 3] == 500.0
    assert float(image.pixels.sum()) == 500.0 - 1000.0 * 23
    assert image.meta["axcodes"] == "RAS"
    assert image.source == "nifti"
    assert image.is_hu


def test_lps_volume_matches_ras(tmp_path: Path) -> None:
    # The same anatomy stored LPS: x and y axes reversed, affine with negative x and y steps.
    lps = marker_volume()[::-1, ::-1, :].copy()
    affine = np.diag([-1.0, -2.0, 3.0, 1.0])
    path = write_nifti(tmp_path / "lps.nii", lps, affine)
    image = read_image(path)
    assert image.meta["axcodes"] == "LPS"
    assert image.pixels[1, 2, 3] == 500.0
    assert image.spacing_mm == (3.0, 2.0, 1.0)


def test_scl_slope_and_inter(tmp_path: Path) -> None:
    data = np.array([[[500]], [[520]]], dtype=np.int16)
    path = write_nifti(tmp_path / "s.nii", data, np.eye(4), slope=2.0, intercept=-1000.0)
    image = read_image(path)
    # Columns run right to left, so x index 1 (520) comes first.
    assert image.pixels.tolist() == [[[40.0, 0.0]]]


def test_4d_with_several_volumes(tmp_path: Path) -> None:
    path = write_nifti(tmp_path / "t.nii.gz", np.zeros((2, 2, 2, 3), np.int16), np.eye(4))
    with pytest.raises(NotImplementedError, match="3 volumes"):
        read_image(path)


def test_4d_with_one_volume(tmp_path: Path) -> None:
    data = marker_volume()[..., np.newaxis]
    path = write_nifti(tmp_path / "one.nii.gz", data, np.eye(4))
    image = read_image(path)
    assert image.pixels.shape == (2, 3, 4)
    assert image.pixels[1, 2, 3] == 500.0


def test_mask_like_values_warn(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write_nifti(tmp_path / "mask.nii.gz", np.ones((2, 2, 2), np.uint8), np.eye(4))
    with caplog.at_level(logging.WARNING):
        read_image(path)
    assert "mask" in caplog.text


def test_zero_byte_nifti(tmp_path: Path) -> None:
    path = tmp_path / "empty.nii.gz"
    path.write_bytes(b"")
    with pytest.raises(DataError, match="empty.nii.gz: file is empty"):
        read_image(path)


def test_truncated_nifti(tmp_path: Path) -> None:
    path = write_nifti(
        tmp_path / "t.nii.gz", np.arange(4096, dtype=np.int16).reshape(16, 16, 16), np.eye(4)
    )
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="t.nii.gz"):
        read_image(path)


def test_text_named_nii(tmp_path: Path) -> None:
    path = tmp_path / "notes.nii"
    path.write_text("not a volume\n" * 40)
    with pytest.raises(DataError, match="notes.nii: not a readable NIfTI file"):
        read_image(path)


def test_gzip_of_text_named_nii_gz(tmp_path: Path) -> None:
    path = tmp_path / "notes.nii.gz"
    path.write_bytes(gzip.compress(b"not a volume\n" * 40))
    with pytest.raises(DataError, match="notes.nii.gz"):
        read_image(path)


def test_suffixes_supported(tmp_path: Path) -> None:
    assert is_supported(tmp_path / "a.nii")
    assert is_supported(tmp_path / "A.NII.GZ")
    assert not is_supported(tmp_path / "a.gz")


def test_real_example_ct(volume_samples: Path) -> None:
    path = volume_samples / "example_ct.nii.gz"
    image = read_study(path)
    raw = np.asanyarray(nib.load(path).dataobj)
    assert raw.shape == (122, 101, 112)
    assert image.pixels.shape == (112, 101, 122)
    assert image.spacing_mm == (3.0, 3.0, 3.0)
    assert image.pixels.min() == -1207.0
    assert image.pixels.max() == 3382.0
    # The file is RAS, so output [z, y, x] is raw[121 - x, 100 - y, z].
    assert image.pixels[95, 10, 20] == raw[121 - 20, 100 - 10, 95]
    assert np.array_equal(image.pixels[40], raw[::-1, ::-1, 40].T.astype(np.float32))


def test_small_volume_is_slices_82_to_111(volume_samples: Path) -> None:
    full = read_image(volume_samples / "example_ct.nii.gz")
    small = read_image(volume_samples / "example_ct_sm.nii.gz")
    assert small.pixels.shape == (30, 101, 122)
    assert np.array_equal(full.pixels[82:112], small.pixels)
