"""PNG and JPEG exports of CT slices to grey levels 0..255 (display values, not HU)."""

from __future__ import annotations

import logging
import struct
import warnings
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from nephrolith.common.constants import MAX_PIXELS_PER_SLICE
from nephrolith.common.errors import DataError
from nephrolith.common.image import CTImage
from nephrolith.common.io._files import check_file, describe_content

logger = logging.getLogger(__name__)

# A colour pixel is one whose channels differ by more than this many grey levels. JPEG chroma
# subsampling leaves differences of a few levels in grey images, coloured annotations many more.
COLOUR_CHANNEL_DIFFERENCE = 24
# Share of colour pixels above which an RGB export is reported as a colour image.
COLOUR_PIXEL_FRACTION = 0.005

_SOURCE_BY_FORMAT = {"PNG": "png", "JPEG": "jpeg", "MPO": "jpeg"}
_DECODE_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    struct.error,
    Image.DecompressionBombError,
)


def _open(path: Path) -> Image.Image:
    """Open the image lazily and check its format and size before any pixel is decoded."""
    check_file(path, "a PNG or JPEG image")
    try:
        # Pillow warns between its own limit and twice that, and our lower limit is checked below.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
    except UnidentifiedImageError as err:
        raise DataError(
            f"{path}: not a PNG or JPEG image ({describe_content(path)}); expected a PNG or JPEG "
            "export of a CT slice. Check the file, or give DICOM and NIfTI files their usual "
            "extension."
        ) from err
    except _DECODE_ERRORS as err:
        raise DataError(
            f"{path}: image header could not be read ({type(err).__name__}: {err}); "
            "the file is corrupt: export it again."
        ) from err
    if image.format not in _SOURCE_BY_FORMAT:
        image.close()
        raise DataError(f"{path}: {image.format} image; expected PNG or JPEG. Convert it to PNG.")
    width, height = image.size
    if width * height > MAX_PIXELS_PER_SLICE:
        image.close()
        raise DataError(
            f"{path}: image of {width} x {height} pixels exceeds the limit of "
            f"{MAX_PIXELS_PER_SLICE} pixels; rejected before decoding as a possible "
            "decompression bomb."
        )
    return image


def _to_grey(image: Image.Image, path: Path) -> tuple[np.ndarray, int, dict[str, float]]:
    """Return grey levels 0..255 as float32 (H, W), the bit depth and colour facts."""
    facts: dict[str, float] = {}
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit PNG: 65535 / 257 = 255, so full scale maps to full scale.
        values = np.asarray(image, dtype=np.float64)
        if values.min() < 0 or values.max() > 65535:
            raise DataError(
                f"{path}: 32-bit pixel values outside 0..65535; expected an 8- or "
                "16-bit greyscale export."
            )
        return (values / 257.0).astype(np.float32), 16, facts
    if mode == "1":
        return np.asarray(image.convert("L"), dtype=np.float32), 1, facts
    if mode == "L":
        return np.asarray(image, dtype=np.float32), 8, facts
    if mode in ("LA", "La"):
        _check_alpha(np.asarray(image.getchannel("A")), path, facts)
        return np.asarray(image.getchannel("L"), dtype=np.float32), 8, facts
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif mode not in ("RGB", "RGBA"):
        image = image.convert("RGB")
    if image.mode == "RGBA":
        _check_alpha(np.asarray(image.getchannel("A")), path, facts)
        image = image.convert("RGB")

    rgb = np.asarray(image, dtype=np.int16)
    spread = rgb.max(axis=2) - rgb.min(axis=2)
    facts["colour_fraction"] = float(np.mean(spread > COLOUR_CHANNEL_DIFFERENCE))
    if facts["colour_fraction"] > COLOUR_PIXEL_FRACTION:
        logger.warning(
            "%s: %.1f %% of pixels are coloured; probably a screen capture with annotations, "
            "which the model was not trained on",
            path.name,
            100 * facts["colour_fraction"],
        )
        # ITU-R BT.601 luma, the weights Pillow's convert("L") uses.
        grey = rgb @ np.array([0.299, 0.587, 0.114])
    else:
        grey = rgb.mean(axis=2)
    return grey.astype(np.float32), 8, facts


def _check_alpha(alpha: np.ndarray, path: Path, facts: dict[str, float]) -> None:
    """Record the transparent share and warn when the dropped alpha channel hid pixels."""
    facts["transparent_fraction"] = float(np.mean(alpha < 255))
    if facts["transparent_fraction"] > 0:
        logger.warning(
            "%s: %.1f %% of pixels are (partly) transparent; the alpha channel is ignored",
            path.name,
            100 * facts["transparent_fraction"],
        )


def read_export(path: str | Path) -> CTImage:
    """Read a PNG or JPEG slice as display grey levels, float32 (H, W) in 0..255.

    EXIF orientation is applied (ImageOps.exif_transpose). 16-bit images are divided by 257.
    Colour images become grey: the channel mean when the channels agree, else BT.601 luma with
    a warning. Alpha channels are dropped. The values are display-windowed grey levels, not
    HU, so is_hu is False and spacing_mm is None.

    Returns:
        CTImage with source "png" or "jpeg" and meta "bit_depth", "mode" (Pillow mode of the
        file), "exif_orientation" (1 when upright), and "colour_fraction" for colour files.

    Raises:
        DataError: missing, empty, truncated, corrupt, non-image or oversized file.
    """
    path = Path(path)
    image = _open(path)
    try:
        with image:
            source = _SOURCE_BY_FORMAT[image.format]
            mode = image.mode
            exif_orientation = int(image.getexif().get(ExifTags.Base.Orientation, 1) or 1)
            transposed = ImageOps.exif_transpose(image)
            grey, bit_depth, facts = _to_grey(transposed, path)
    except _DECODE_ERRORS as err:
        raise DataError(
            f"{path}: image data could not be decoded ({type(err).__name__}: {err}); the file is "
            "probably truncated or corrupt. Export or copy it again."
        ) from err
    meta = {"bit_depth": bit_depth, "mode": mode, "exif_orientation": exif_orientation, **facts}
    return CTImage(
        pixels=np.ascontiguousarray(grey),
        is_hu=False,
        spacing_mm=None,
        source=source,
        path=str(path),
        meta=meta,
    )
