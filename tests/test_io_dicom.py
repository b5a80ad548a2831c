"""Tests of the DICOM readers on files written with pydicom and on real CT samples."""

from __future__ import annotations

import io
import logging
import random
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import generate_frames
from pydicom.pixels import apply_modality_lut
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    MRImageStorage,
    RLELossless,
    generate_uid,
)

from nephrolith.common.errors import DataError
from nephrolith.common.io import is_supported, read_dicom_series, read_image, read_study

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def write_ct(
    path: Path,
    stored: np.ndarray,
    *,
    slope: float | None = 1.0,
    intercept: float | None = -1024.0,
    signed: bool = True,
    position: tuple[float, float, float] | None = (0.0, 0.0, 0.0),
    orientation: tuple[float, ...] | None = AXIAL,
    spacing: tuple[float, float] | None = (0.7, 0.8),
    instance: int = 1,
    series_uid: str = "1.2.826.0.1.3680043.8.498.1",
    modality: str = "CT",
    photometric: str = "MONOCHROME2",
    padding: tuple[int, int | None] | None = None,
    bits_stored: int = 16,
    transfer_syntax: str = ExplicitVRLittleEndian,
) -> Path:
    """Write a one-frame 16-bit DICOM image with the given stored values and tags."""
    file_meta = FileMetaDataset()
    sop_class = MRImageStorage if modality == "MR" else CTImageStorage
    file_meta.MediaStorageSOPClassUID = sop_class
    file_meta.MediaStorageSOPInstanceUID = generate_uid()
    file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = file_meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = file_meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.SeriesInstanceUID = series_uid
    ds.InstanceNumber = instance
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = int(signed)
    ds.SliceThickness = 2.5
    if slope is not None:
        ds.RescaleSlope = slope
    if intercept is not None:
        ds.RescaleIntercept = intercept
    if position is not None:
        ds.ImagePositionPatient = list(position)
    if orientation is not None:
        ds.ImageOrientationPatient = list(orientation)
    if spacing is not None:
        ds.PixelSpacing = list(spacing)
    if padding is not None:
        vr = "SS" if signed else "US"
        ds.add_new(0x00280120, vr, padding[0])
        if padding[1] is not None:
            ds.add_new(0x00280121, vr, padding[1])
    ds.PixelData = stored.astype("<i2" if signed else "<u2").tobytes()
    if transfer_syntax != ExplicitVRLittleEndian:
        ds.compress(transfer_syntax)
    ds.save_as(path, enforce_file_format=True)
    return path


def grid(values: list[list[int]]) -> np.ndarray:
    """Return a small stored-value image."""
    return np.array(values, dtype=np.int32)


# Rescale, padding, photometric and pixel representation on written files.


def test_intercept_minus_1024(tmp_path: Path) -> None:
    path = write_ct(tmp_path / "a.dcm", grid([[0, 1024], [2048, 1064]]), signed=False)
    image = read_image(path)
    assert image.is_hu
    assert image.source == "dicom"
    assert image.pixels.dtype == np.float32
    assert image.pixels.tolist() == [[-1024.0, 0.0], [1024.0, 40.0]]
    assert image.spacing_mm == (0.7, 0.8)


def test_slope_2_intercept_minus_1000(tmp_path: Path) -> None:
    path = write_ct(tmp_path / "a.dcm", grid([[500, 520], [0, 1000]]), slope=2, intercept=-1000)
    assert read_image(path).pixels.tolist() == [[0.0, 40.0], [-1000.0, 1000.0]]


def test_padding_value_becomes_air(tmp_path: Path) -> None:
    stored = grid([[-2000, 40], [-2000, -1000]])
    path = write_ct(tmp_path / "a.dcm", stored, intercept=0, padding=(-2000, None))
    image = read_image(path)
    assert image.pixels.tolist() == [[-1024.0, 40.0], [-1024.0, -1000.0]]
    assert image.meta["padded_pixels"] == 2


def test_padding_range_limit(tmp_path: Path) -> None:
    stored = grid([[0, 5], [10, 11]])
    path = write_ct(tmp_path / "a.dcm", stored, signed=False, padding=(0, 10))
    # Stored 0..10 are padding, while 11 - 1024 = -1013 HU is a real (air) value.
    assert read_image(path).pixels.tolist() == [[-1024.0, -1024.0], [-1024.0, -1013.0]]


def test_monochrome1_keeps_hu(tmp_path: Path) -> None:
    # The Modality LUT (rescale) comes before the display inversion MONOCHROME1 asks for,
    # so the HU values equal those of the same stored values in MONOCHROME2.
    stored = grid([[0, 1024], [1064, 3000]])
    path = write_ct(tmp_path / "m1.dcm", stored, signed=False, photometric="MONOCHROME1")
    image = read_image(path)
    assert image.pixels.tolist() == [[-1024.0, 0.0], [40.0, 1976.0]]
    assert image.meta["photometric"] == "MONOCHROME1"
    ds = pydicom.dcmread(path)
    assert np.array_equal(image.pixels, apply_modality_lut(ds.pixel_array, ds))


def test_missing_rescale_on_hu_values(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    stored = grid([[-1000, -50], [40, 900]])
    path = write_ct(tmp_path / "a.dcm", stored, slope=None, intercept=None)
    with caplog.at_level(logging.WARNING):
        image = read_image(path)
    assert image.pixels.tolist() == [[-1000.0, -50.0], [40.0, 900.0]]
    assert image.meta["rescale_assumed"] is True
    assert "rescale tags missing" in caplog.text


def test_missing_rescale_on_unsigned_rejected(tmp_path: Path) -> None:
    stored = grid([[24, 974], [1064, 1924]])
    path = write_ct(tmp_path / "a.dcm", stored, signed=False, slope=None, intercept=None)
    with pytest.raises(DataError, match="do not look like HU"):
        read_image(path)


def test_signed_and_unsigned_pixels(tmp_path: Path) -> None:
    signed = write_ct(tmp_path / "s.dcm", grid([[-1000, 60]]), signed=True, intercept=0)
    unsigned = write_ct(tmp_path / "u.dcm", grid([[24, 1084]]), signed=False)
    assert read_image(signed).pixels.tolist() == [[-1000.0, 60.0]]
    assert read_image(unsigned).pixels.tolist() == [[-1000.0, 60.0]]


def test_bits_stored_12_masks_high_bits(tmp_path: Path) -> None:
    # Bit 12 lies above BitsStored 12 and must be ignored: 0x1000 | 24 is stored value 24.
    stored = grid([[0x1000 | 24, 24]])
    path = write_ct(tmp_path / "a.dcm", stored, signed=False, bits_stored=12)
    assert read_image(path).pixels.tolist() == [[-1000.0, -1000.0]]


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless])
def test_compressed_transfer_syntax(tmp_path: Path, syntax: str) -> None:
    stored = (np.arange(64 * 64).reshape(64, 64) % 2000 - 1000).astype(np.int32)
    path = write_ct(tmp_path / "c.dcm", stored, intercept=0, transfer_syntax=syntax)
    image = read_image(path)
    assert image.meta["transfer_syntax"] == syntax
    assert np.array_equal(image.pixels, stored.astype(np.float32))


def test_flipped_axial_slice_in_radiological_view(tmp_path: Path) -> None:
    # Rows run posterior to anterior and columns left to right: both axes must be reversed.
    stored = grid([[1000, 0, 0], [0, 0, 0]])
    path = write_ct(tmp_path / "a.dcm", stored, intercept=0, orientation=(-1, 0, 0, 0, -1, 0))
    image = read_image(path)
    assert image.pixels[1, 2] == 1000.0
    assert image.pixels[0, 0] == 0.0
    assert image.meta["plane"] == "axial"


# Rejected files.


def test_mr_modality_not_implemented(tmp_path: Path) -> None:
    path = write_ct(tmp_path / "mr.dcm", grid([[0, 1]]), modality="MR")
    with pytest.raises(NotImplementedError, match="'MR'"):
        read_image(path)


def test_other_modality_data_error(tmp_path: Path) -> None:
    path = write_ct(tmp_path / "pt.dcm", grid([[0, 1]]), modality="PT")
    with pytest.raises(DataError, match="expected Modality 'CT', got 'PT'"):
        read_image(path)


def test_rgb_dicom_not_implemented(tmp_path: Path) -> None:
    path = write_ct(tmp_path / "rgb.dcm", grid([[0, 1]]))
    ds = pydicom.dcmread(path)
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = bytes(6)
    ds.save_as(path)
    with pytest.raises(NotImplementedError, match="colour DICOM"):
        read_image(path)


def test_sagittal_series_not_implemented(tmp_path: Path) -> None:
    sagittal = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
    for index in range(2):
        write_ct(
            tmp_path / f"s{index}.dcm",
            grid([[0, 1]]),
            orientation=sagittal,
            position=(float(index), 0.0, 0.0),
        )
    with pytest.raises(NotImplementedError, match="sagittal"):
        read_dicom_series(tmp_path)


def test_zero_byte_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.dcm"
    path.write_bytes(b"")
    with pytest.raises(DataError, match="empty.dcm: file is empty"):
        read_image(path)


def test_truncated_pixel_data(tmp_path: Path) -> None:
    path = write_ct(tmp_path / "t.dcm", np.zeros((64, 64), dtype=np.int32))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 4000])
    with pytest.raises(DataError, match="t.dcm: pixel data could not be decoded"):
        read_image(path)


def test_truncated_header(tmp_path: Path) -> None:
    path = write_ct(tmp_path / "t.dcm", np.zeros((64, 64), dtype=np.int32))
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DataError, match="t.dcm"):
        read_image(path)


def test_text_file_named_dcm(tmp_path: Path) -> None:
    path = tmp_path / "notes.dcm"
    path.write_text("patient list\n" * 40)
    with pytest.raises(DataError, match="not a DICOM file.*text content"):
        read_image(path)


def test_decompression_bomb_rejected_before_decoding(tmp_path: Path) -> None:
    path = write_ct(tmp_path / "bomb.dcm", grid([[0, 1]]))
    ds = pydicom.dcmread(path)
    ds.Rows, ds.Columns = 10000, 10000
    ds.save_as(path)
    with pytest.raises(DataError, match="exceeds the limit"):
        read_image(path)


# Series assembly.


def write_series(
    folder: Path, z_positions: list[float], *, seed: int = 0, orientation: tuple[float, ...] = AXIAL
) -> None:
    """Write one slice per z position; slice k holds HU 100 * k (k in increasing z order).

    Files are written in shuffled order with shuffled InstanceNumber, so neither the file
    names nor the instance numbers give the slice order.
    """
    folder.mkdir(exist_ok=True)
    rng = random.Random(seed)
    ranks = sorted(range(len(z_positions)), key=lambda index: z_positions[index])
    instances = list(range(1, len(z_positions) + 1))
    rng.shuffle(instances)
    order = list(range(len(z_positions)))
    rng.shuffle(order)
    for file_index, index in enumerate(order):
        value = 100 * ranks.index(index)
        stored = np.full((4, 5), value, dtype=np.int32)
        stored[0, 0] = -1000
        write_ct(
            folder / f"IM{file_index:04d}",
            stored,
            intercept=0,
            position=(-10.0, -20.0, z_positions[index]),
            orientation=orientation,
            instance=instances[file_index],
        )


def test_series_shuffled_order(tmp_path: Path) -> None:
    z_positions = [20.0, 12.5, 17.5, 10.0, 15.0]
    write_series(tmp_path / "s", z_positions)
    volume = read_dicom_series(tmp_path / "s")
    assert volume.pixels.shape == (5, 4, 5)
    assert volume.pixels[:, 2, 2].tolist() == [0.0, 100.0, 200.0, 300.0, 400.0]
    assert volume.spacing_mm == (2.5, 0.7, 0.8)
    assert volume.meta["skipped"] == []
    assert volume.meta["spacing_uneven"] is False
    assert volume.source == "dicom-series"


def test_series_from_path_list(tmp_path: Path) -> None:
    write_series(tmp_path / "s", [3.0, 0.0, 6.0])
    volume = read_dicom_series(sorted((tmp_path / "s").iterdir()))
    assert volume.pixels[:, 1, 1].tolist() == [0.0, 100.0, 200.0]
    assert volume.spacing_mm[0] == 3.0


def test_series_flipped_orientation(tmp_path: Path) -> None:
    # Column direction -y (rows posterior to anterior): rows are reversed, the marker moves.
    write_series(tmp_path / "s", [0.0, 2.0], orientation=(1, 0, 0, 0, -1, 0))
    volume = read_dicom_series(tmp_path / "s")
    assert volume.pixels[0, 3, 0] == -1000.0
    assert volume.pixels[0, 0, 0] == 0.0
    assert volume.pixels[:, 1, 1].tolist() == [0.0, 100.0]


def test_series_corrupt_slice_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "s"
    write_series(folder, [0.0, 2.0, 4.0, 6.0, 8.0])
    victim = next(
        path
        for path in sorted(folder.iterdir())
        if pydicom.dcmread(path).ImagePositionPatient[2] == 4.0
    )
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) - 20])
    (folder / "README.txt").write_text("export notes")
    with caplog.at_level(logging.WARNING):
        volume = read_dicom_series(folder)
    assert volume.pixels.shape[0] == 4
    assert volume.pixels[:, 1, 1].tolist() == [0.0, 100.0, 300.0, 400.0]
    skipped = dict(volume.meta["skipped"])
    assert set(skipped) == {victim.name, "README.txt"}
    assert "pixel data could not be decoded" in skipped[victim.name]
    # Gaps 2, 4, 2: the median is 2 mm and the gap is reported.
    assert volume.spacing_mm[0] == 2.0
    assert volume.meta["spacing_uneven"] is True
    assert "skipped 2 of 6 files" in caplog.text


def test_series_other_shape_skipped(tmp_path: Path) -> None:
    folder = tmp_path / "s"
    write_series(folder, [0.0, 1.0, 2.0])
    write_ct(folder / "odd.dcm", np.zeros((6, 6), dtype=np.int32), position=(0, 0, 3.0))
    volume = read_dicom_series(folder)
    assert volume.pixels.shape == (3, 4, 5)
    assert [name for name, _ in volume.meta["skipped"]] == ["odd.dcm"]


def test_series_duplicate_position_skipped(tmp_path: Path) -> None:
    folder = tmp_path / "s"
    write_series(folder, [0.0, 1.0, 2.0])
    write_ct(folder / "zz_dup.dcm", np.zeros((4, 5), dtype=np.int32), position=(-10, -20, 1.0))
    volume = read_dicom_series(folder)
    assert volume.pixels.shape[0] == 3
    assert "same ImagePositionPatient" in dict(volume.meta["skipped"])["zz_dup.dcm"]


def test_several_series_largest_chosen(tmp_path: Path) -> None:
    folder = tmp_path / "s"
    write_series(folder, [0.0, 1.0, 2.0])
    write_ct(folder / "other.dcm", np.zeros((8, 8), dtype=np.int32), series_uid="1.2.3.4")
    volume = read_dicom_series(folder)
    assert volume.pixels.shape == (3, 4, 5)
    assert volume.meta["other_series"] == [("1.2.3.4", 1)]


def test_mr_series_not_implemented(tmp_path: Path) -> None:
    for index in range(2):
        write_ct(
            tmp_path / f"mr{index}.dcm",
            grid([[0, 1]]),
            modality="MR",
            position=(0, 0, float(index)),
        )
    with pytest.raises(NotImplementedError, match="'MR'"):
        read_dicom_series(tmp_path)


def test_series_without_usable_slice(tmp_path: Path) -> None:
    (tmp_path / "a.dcm").write_bytes(b"")
    (tmp_path / "b.txt").write_text("hello")
    with pytest.raises(DataError, match="none of 2 files is a usable CT slice"):
        read_dicom_series(tmp_path)


def test_read_study_folder_and_file(tmp_path: Path) -> None:
    write_series(tmp_path / "s", [0.0, 5.0])
    assert read_study(tmp_path / "s").pixels.shape == (2, 4, 5)
    single = read_study(sorted((tmp_path / "s").iterdir())[0])
    assert single.pixels.shape == (4, 5)


def test_is_supported_dicom_without_suffix(tmp_path: Path) -> None:
    path = write_ct(tmp_path / "CT.1.2.840.99", grid([[0, 1]]))
    (tmp_path / "notes.txt").write_text("x")
    assert is_supported(path)
    assert is_supported(tmp_path / "x.dcm")
    assert not is_supported(tmp_path / "notes.txt")
    assert read_image(path).pixels.shape == (1, 2)


# Real CT files.


def test_pydicom_ct_small() -> None:
    path = get_testdata_file("CT_small.dcm")
    image = read_image(path)
    ds = pydicom.dcmread(path)
    assert image.pixels.shape == (128, 128)
    assert image.spacing_mm == pytest.approx((0.661468, 0.661468))
    # Stored 128..2191 with intercept -1024 (read from the header with pydicom).
    assert image.pixels.min() == pytest.approx(-896.0)
    assert image.pixels.max() == pytest.approx(1167.0)
    assert np.array_equal(image.pixels, ds.pixel_array.astype(np.float32) - 1024.0)


def test_pydicom_data_abdominal_slice() -> None:
    try:
        path = get_testdata_file("explicit_VR-UN.dcm")
    except (ValueError, OSError):
        path = None
    if path is None:
        pytest.skip("pydicom-data is not installed; explicit_VR-UN.dcm is unavailable")
    image = read_image(path)
    ds = pydicom.dcmread(path)
    assert image.pixels.shape == (512, 512)
    assert image.spacing_mm == pytest.approx((0.859375, 0.859375))
    # ImageOrientationPatient [1, 0, 0, 0, -1, 0]: stored rows run posterior to anterior.
    assert [float(value) for value in ds.ImageOrientationPatient] == [1, 0, 0, 0, -1, 0]
    expected = apply_modality_lut(ds.pixel_array, ds)[::-1].astype(np.float32)
    assert np.array_equal(image.pixels, expected)
    assert image.pixels.min() == -1024.0


def test_enhanced_ct_multiframe() -> None:
    path = get_testdata_file("eCT_Supplemental.dcm")
    volume = read_image(path)
    ds = pydicom.dcmread(path)
    assert volume.pixels.shape == (2, 512, 512)
    assert volume.spacing_mm[1:] == pytest.approx((0.388672, 0.388672))
    positions = [
        float(item.PlanePositionSequence[0].ImagePositionPatient[2])
        for item in ds.PerFrameFunctionalGroupsSequence
    ]
    order = np.argsort(positions)
    assert volume.spacing_mm[0] == pytest.approx(abs(positions[1] - positions[0]))
    # Row direction is -x (toward the patient's right), so columns are reversed.
    expected = ds.pixel_array[order][:, :, ::-1].astype(np.float32) - 1024.0
    assert np.array_equal(volume.pixels, expected)


def test_jpeg2000_series(volume_samples: Path) -> None:
    folder = volume_samples / "example_ct_dicom"
    volume = read_dicom_series(folder)
    assert volume.pixels.shape == (20, 512, 512)
    assert volume.spacing_mm == pytest.approx((2.0, 0.9765625, 0.9765625))
    assert volume.meta["skipped"] == []

    # Independent decode: Pillow's OpenJPEG reads the JPEG 2000 codestream of each file.
    files = sorted(
        folder.iterdir(),
        key=lambda p: float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]),
    )
    for index in (0, 9, 19):
        ds = pydicom.dcmread(files[index])
        frame = next(generate_frames(ds.PixelData, number_of_frames=1))
        # Pillow returns the 12-bit samples scaled to 16 bits (multiplied by 2**4).
        decoded = np.asarray(Image.open(io.BytesIO(frame)), dtype=np.float32)
        stored = decoded / 2 ** (16 - int(ds.BitsStored))
        expected = stored * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        assert np.array_equal(volume.pixels[index], expected)
