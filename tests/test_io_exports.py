"""Tests of the PNG/JPEG reader on images written with Pillow and on the real kidney JPEGs."""

from __future__ import annotations

import logging
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nephrolith.common.errors import DataError
from nephrolith.common.io import SUPPORTED_SUFFIXES, is_supported, read_image, read_study


def save(path: Path, array: np.ndarray, mode: str | None = None, **params: object) -> Path:
    """Write `array` with Pillow in the given mode."""
    image = Image.fromarray(array) if mode is None else Image.fromarray(array).convert(mode)
    image.save(path, **params)
    return path


def png_header_only(path: Path, width: int, height: int) -> Path:
    """Write a PNG whose IHDR claims width x height but whose IDAT holds one byte."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body))
            + kind
            + body
            + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00")) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)
    return path


def test_png_8bit(tmp_path: Path) -> None:
    array = np.array([[0, 10], [128, 255]], dtype=np.uint8)
    image = read_image(save(tmp_path / "a.png", array))
    assert image.pixels.dtype == np.float32
    assert image.pixels.tolist() == [[0.0, 10.0], [128.0, 255.0]]
    assert not image.is_hu
    assert image.spacing_mm is None
    assert image.source == "png"
    assert image.meta["bit_depth"] == 8


def test_png_16bit_scaled_by_257(tmp_path: Path) -> None:
    array = np.array([[0, 257 * 100], [65535, 257]], dtype=np.uint16)
    image = read_image(save(tmp_path / "a.png", array))
    assert image.pixels.tolist() == [[0.0, 100.0], [255.0, 1.0]]
    assert image.meta["bit_depth"] == 16


def test_rgb_grey_without_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    grey = np.array([[0, 50], [200, 255]], dtype=np.uint8)
    with caplog.at_level(logging.WARNING):
        image = read_image(save(tmp_path / "a.png", np.stack([grey] * 3, axis=-1)))
    assert image.pixels.tolist() == [[0.0, 50.0], [200.0, 255.0]]
    assert image.meta["colour_fraction"] == 0.0
    assert caplog.text == ""


def test_rgb_annotated_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rgb = np.zeros((10, 10, 3), dtype=np.uint8)
    rgb[0, :] = (255, 0, 0)  # a red annotation line: 10 % of the pixels
    with caplog.at_level(logging.WARNING):
        image = read_image(save(tmp_path / "a.png", rgb))
    assert image.meta["colour_fraction"] == pytest.approx(0.1)
    assert "screen capture" in caplog.text
    # BT.601 luma of pure red: 0.299 * 255.
    assert image.pixels[0, 0] == pytest.approx(76.245, abs=1e-3)
    assert image.pixels[5, 5] == 0.0


def test_rgba_alpha_dropped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[..., :3] = 90
    rgba[..., 3] = 255
    rgba[1, 1, 3] = 0
    with caplog.at_level(logging.WARNING):
        image = read_image(save(tmp_path / "a.png", rgba))
    assert image.pixels.tolist() == [[90.0, 90.0], [90.0, 90.0]]
    assert image.meta["transparent_fraction"] == 0.25
    assert "transparent" in caplog.text


def test_palette_png(tmp_path: Path) -> None:
    image = Image.new("P", (2, 2))
    image.putdata([0, 1, 2, 1])
    image.putpalette([10, 10, 10, 64, 64, 64, 200, 200, 200] + [0] * (3 * 253))
    path = tmp_path / "p.png"
    image.save(path)
    assert Image.open(path).mode == "P"
    assert read_image(path).pixels.tolist() == [[10.0, 64.0], [200.0, 64.0]]


def test_la_and_bilevel_png(tmp_path: Path) -> None:
    grey = np.array([[0, 255], [255, 0]], dtype=np.uint8)
    la = read_image(save(tmp_path / "la.png", grey, mode="LA"))
    bilevel = read_image(save(tmp_path / "one.png", grey, mode="1"))
    assert la.pixels.tolist() == [[0.0, 255.0], [255.0, 0.0]]
    assert bilevel.pixels.tolist() == [[0.0, 255.0], [255.0, 0.0]]
    assert bilevel.meta["bit_depth"] == 1


def test_exif_rotated_jpeg(tmp_path: Path) -> None:
    # Stored 16 x 32 (H x W): left half black, right half white. EXIF orientation 6 asks for a
    # 90 degree clockwise turn, which moves the stored left columns to the top rows.
    stored = np.zeros((16, 32), dtype=np.uint8)
    stored[:, 16:] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    path = save(tmp_path / "rot.jpg", stored, exif=exif, quality=95)
    image = read_image(path)
    assert image.pixels.shape == (32, 16)
    assert image.pixels[4, 8] < 10
    assert image.pixels[28, 8] > 245
    assert image.meta["exif_orientation"] == 6
    assert image.source == "jpeg"


def test_real_kidney_jpeg(islam_subset: Path) -> None:
    path = next(iter(sorted((islam_subset / "images" / "Stone").glob("*.jpg"))))
    image = read_study(path)
    assert image.pixels.shape == (256, 256)
    assert image.meta["bit_depth"] == 8
    assert image.meta["mode"] == "L"
    assert 0.0 <= image.pixels.min() and image.pixels.max() <= 255.0
    assert np.array_equal(image.pixels, np.asarray(Image.open(path), dtype=np.float32))


def test_oversized_png_rejected(tmp_path: Path) -> None:
    path = png_header_only(tmp_path / "bomb.png", 10000, 10000)
    with pytest.raises(DataError, match="exceeds the limit"):
        read_image(path)


def test_pillow_bomb_error_wrapped(tmp_path: Path) -> None:
    # Over twice Pillow's MAX_IMAGE_PIXELS, Image.open itself raises DecompressionBombError.
    path = png_header_only(tmp_path / "huge.png", 20000, 20000)
    with pytest.raises(DataError, match="huge.png"):
        read_image(path)


def test_zero_byte_png(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(DataError, match="empty.png: file is empty"):
        read_image(path)


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_truncated_image(tmp_path: Path, suffix: str) -> None:
    rng = np.random.default_rng(0)
    path = save(tmp_path / f"t{suffix}", rng.integers(0, 255, (64, 64), dtype=np.uint8))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=f"t{suffix}: image data could not be decoded"):
        read_image(path)


def test_text_named_jpg(tmp_path: Path) -> None:
    path = tmp_path / "scan.jpg"
    path.write_text("this is not an image\n")
    with pytest.raises(DataError, match="scan.jpg: not a PNG or JPEG image.*text content"):
        read_image(path)


def test_unsupported_suffix(tmp_path: Path) -> None:
    path = tmp_path / "scan.bmp"
    Image.new("L", (2, 2)).save(path)
    assert not is_supported(path)
    with pytest.raises(DataError, match="unsupported file"):
        read_image(path)


def test_supported_suffixes() -> None:
    assert SUPPORTED_SUFFIXES == {
        ".dcm",
        ".dicom",
        ".ima",
        ".nii",
        ".nii.gz",
        ".png",
        ".jpg",
        ".jpeg",
    }
    assert is_supported("a.JPEG")
