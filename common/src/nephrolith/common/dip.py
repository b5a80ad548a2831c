"""CT slice processing: windowing, denoising, CLAHE, sharpening, resizing and augmentation."""

from __future__ import annotations

import logging

import cv2
import numpy as np

from nephrolith.common.config import PreprocessConfig
from nephrolith.common.errors import DataError
from nephrolith.common.image import CTImage

logger = logging.getLogger(__name__)

# Search and patch sizes of OpenCV's non-local means, in pixels (OpenCV's recommended 7 and 21).
NLM_TEMPLATE_WINDOW = 7
NLM_SEARCH_WINDOW = 21

# Bilateral filter neighbourhood diameter and spatial sigma, in pixels.
BILATERAL_DIAMETER = 5
BILATERAL_SIGMA_SPACE = 3.0

_display_input_logged = False


def window(pixels_hu: np.ndarray, hu_min: float, hu_max: float) -> np.ndarray:
    """Map HU linearly to grey levels: hu_min -> 0, hu_max -> 255, clipped outside.

    Args:
        pixels_hu: array of Hounsfield units, any shape.
        hu_min: lower window bound (window_center - window_width / 2).
        hu_max: upper window bound (window_center + window_width / 2).

    Returns:
        float32 array of the same shape with values in 0..255.

    Raises:
        ValueError: when hu_max is not greater than hu_min.
    """
    if not hu_max > hu_min:
        raise ValueError(f"window: expected hu_max > hu_min, got hu_min={hu_min}, hu_max={hu_max}")
    scaled = (np.asarray(pixels_hu, dtype=np.float32) - np.float32(hu_min)) * np.float32(
        255.0 / (hu_max - hu_min)
    )
    return np.clip(scaled, 0.0, 255.0).astype(np.float32, copy=False)


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def denoise(image: np.ndarray, method: str, strength: float) -> np.ndarray:
    """Reduce noise in a grey image while keeping edges.

    Non-local means (Buades, Coll and Morel, as OpenCV documents it) runs through
    cv2.fastNlMeansDenoising on the image rounded to uint8, with filter strength h = strength.
    The bilateral filter runs through cv2.bilateralFilter on float32 with
    sigmaColor = 10 * strength grey levels.

    Args:
        image: (H, W) grey levels in 0..255.
        method: "none", "nlm" or "bilateral".
        strength: filter strength, > 0.

    Returns:
        float32 (H, W) in 0..255.

    Raises:
        ValueError: on an unknown method or a strength <= 0.
    """
    image = np.asarray(image, dtype=np.float32)
    if method == "none":
        return image.copy()
    if strength <= 0:
        raise ValueError(f"denoise: expected strength > 0, got {strength}")
    if method == "nlm":
        filtered = cv2.fastNlMeansDenoising(
            _to_uint8(image), None, float(strength), NLM_TEMPLATE_WINDOW, NLM_SEARCH_WINDOW
        )
        return filtered.astype(np.float32)
    if method == "bilateral":
        filtered = cv2.bilateralFilter(
            image, BILATERAL_DIAMETER, float(strength) * 10.0, BILATERAL_SIGMA_SPACE
        )
        return np.clip(filtered, 0.0, 255.0).astype(np.float32)
    raise ValueError(f"denoise: expected method 'none', 'nlm' or 'bilateral', got {method!r}")


def clahe(image: np.ndarray, clip_limit: float, tile_grid: int) -> np.ndarray:
    """Apply contrast-limited adaptive histogram equalisation (CLAHE) with cv2.createCLAHE.

    Args:
        image: (H, W) grey levels in 0..255; rounded to uint8 for cv2.createCLAHE.
        clip_limit: OpenCV clip limit (contrast amplification cap per tile).
        tile_grid: tiles per side.

    Returns:
        float32 (H, W) in 0..255.
    """
    if clip_limit <= 0 or tile_grid < 1:
        raise ValueError(
            f"clahe: expected clip_limit > 0 and tile_grid >= 1, got {clip_limit} and {tile_grid}"
        )
    equaliser = cv2.createCLAHE(clipLimit=float(clip_limit), tileGridSize=(tile_grid, tile_grid))
    return equaliser.apply(_to_uint8(image)).astype(np.float32)


def unsharp_mask(
    image: np.ndarray, amount: float, sigma_px: float, sigma_y_px: float | None = None
) -> np.ndarray:
    """Sharpen as image + amount * (image - GaussianBlur(image)), clipped to 0..255.

    Args:
        image: (H, W) grey levels in 0..255.
        amount: gain of the high-pass part; 0 returns an unchanged copy.
        sigma_px: Gaussian sigma along columns, in pixels.
        sigma_y_px: Gaussian sigma along rows; defaults to sigma_px.

    Returns:
        float32 (H, W) in 0..255.
    """
    image = np.asarray(image, dtype=np.float32)
    if amount < 0 or sigma_px <= 0:
        raise ValueError(
            f"unsharp_mask: expected amount >= 0 and sigma > 0, got {amount} and {sigma_px}"
        )
    if amount == 0:
        return image.copy()
    sigma_y = sigma_px if sigma_y_px is None else sigma_y_px
    blurred = cv2.GaussianBlur(
        image, (0, 0), sigmaX=float(sigma_px), sigmaY=float(sigma_y), borderType=cv2.BORDER_REFLECT
    )
    sharpened = image + np.float32(amount) * (image - blurred)
    return np.clip(sharpened, 0.0, 255.0).astype(np.float32)


def resize_square(
    image: np.ndarray, size: int, keep_aspect: bool = True, pad_value: float = 0.0
) -> np.ndarray:
    """Resize a grey image to (size, size).

    With keep_aspect the longer side becomes `size` and the shorter side is centred between
    bands of pad_value (0 is air in a soft-tissue window and black in an export). Shrinking uses
    INTER_AREA, which averages and so avoids aliasing; enlarging uses INTER_LINEAR.

    Args:
        image: (H, W) array.
        size: output side in pixels.
        keep_aspect: pad (True) or stretch (False).
        pad_value: grey level of the padding.

    Returns:
        float32 (size, size).
    """
    image = np.asarray(image, dtype=np.float32)
    height, width = image.shape
    if keep_aspect:
        scale = size / max(height, width)
        new_h = max(1, min(size, round(height * scale)))
        new_w = max(1, min(size, round(width * scale)))
    else:
        new_h = new_w = size
    shrinking = new_h < height or new_w < width
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    if (new_h, new_w) == (height, width):
        resized = image.copy()
    else:
        resized = cv2.resize(image, (new_w, new_h), interpolation=interpolation)
    if (new_h, new_w) == (size, size):
        return resized.astype(np.float32, copy=False)

    canvas = np.full((size, size), pad_value, dtype=np.float32)
    top = (size - new_h) // 2
    left = (size - new_w) // 2
    canvas[top : top + new_h, left : left + new_w] = resized
    return canvas


def _check_slice(pixels2d: np.ndarray) -> np.ndarray:
    pixels = np.asarray(pixels2d)
    if pixels.ndim != 2 or min(pixels.shape) < 2:
        raise DataError(
            f"preprocess_slice: expected a 2-D slice (H, W) with H, W >= 2, got shape "
            f"{pixels.shape}; pass volumes through preprocess_image"
        )
    bad = int(np.count_nonzero(~np.isfinite(pixels)))
    if bad:
        raise DataError(
            f"preprocess_slice: {bad} pixels are NaN or infinite; the reader must return finite "
            "values, so check the source file"
        )
    return pixels.astype(np.float32, copy=False)


def preprocess_slice(pixels2d: np.ndarray, is_hu: bool, cfg: PreprocessConfig) -> np.ndarray:
    """Turn one slice into a model input: window, denoise, CLAHE, unsharp mask, resize to a square.

    HU slices are windowed with cfg.hu_bounds. Display images (PNG/JPG exports, is_hu False)
    were already windowed by the exporting software, so their 0..255 grey levels skip
    windowing and are only clipped to 0..255. The function uses no randomness, so training,
    evaluation and inference get the same input for the same slice.

    Args:
        pixels2d: (H, W) HU, or grey levels 0..255 for display images.
        is_hu: True when pixels2d is in Hounsfield units.
        cfg: preprocessing settings.

    Returns:
        float32 (S, S, 3), S = cfg.image_size, three equal channels in 0..255.

    Raises:
        DataError: when the slice is not 2-D or contains non-finite values.
    """
    global _display_input_logged
    pixels = _check_slice(pixels2d)

    # Window: HU -> 0..255. Exports are already display-windowed grey levels.
    if is_hu:
        hu_min, hu_max = cfg.hu_bounds
        image = window(pixels, hu_min, hu_max)
    else:
        if not _display_input_logged:
            logger.debug("display image (not HU): windowing skipped, grey levels used as they are")
            _display_input_logged = True
        image = np.clip(pixels, 0.0, 255.0)

    image = denoise(image, cfg.denoise, cfg.denoise_strength)
    if cfg.clahe:
        image = clahe(image, cfg.clahe_clip_limit, cfg.clahe_tile_grid)

    # The unsharp sigma is given in output pixels, so convert it to input pixels per axis.
    if cfg.unsharp_amount > 0:
        height, width = image.shape
        size = cfg.image_size
        if cfg.keep_aspect:
            sigma_x = sigma_y = cfg.unsharp_sigma_px * max(height, width) / size
        else:
            sigma_x = cfg.unsharp_sigma_px * width / size
            sigma_y = cfg.unsharp_sigma_px * height / size
        image = unsharp_mask(image, cfg.unsharp_amount, sigma_x, sigma_y)

    image = resize_square(image, cfg.image_size, keep_aspect=cfg.keep_aspect, pad_value=0.0)
    return np.repeat(image[:, :, np.newaxis], 3, axis=2)


def preprocess_image(ct: CTImage, cfg: PreprocessConfig) -> np.ndarray:
    """Preprocess every slice of a CT image.

    Args:
        ct: a slice (H, W) or a volume (D, H, W).
        cfg: preprocessing settings.

    Returns:
        float32 (N, S, S, 3): N = 1 for a slice, D for a volume, in the volume's slice order.
    """
    slices = [preprocess_slice(pixels, ct.is_hu, cfg) for pixels in ct.slices()]
    if not slices:
        raise DataError(f"{ct.path}: the image contains no slices (pixels shape {ct.pixels.shape})")
    return np.stack(slices).astype(np.float32, copy=False)


def augment_batch(
    x: np.ndarray,
    rng: np.random.Generator,
    max_rotation_deg: float = 10.0,
    scale_range: tuple[float, float] = (0.9, 1.1),
    max_shift_fraction: float = 0.06,
    max_brightness: float = 0.1,
    contrast_range: tuple[float, float] = (0.9, 1.1),
    max_noise_std: float = 5.0,
) -> np.ndarray:
    """Return a randomly transformed copy of a training batch; labels stay valid.

    Each image gets a left-right flip with probability 0.5, which keeps the label because
    kidneys are bilateral. Then one cv2.warpAffine rotates, scales and shifts it about the
    centre, filling the borders with air (0). Last come a contrast change about the image mean,
    a brightness offset and Gaussian noise. All parameters are drawn from rng in a fixed order,
    so the same rng state gives the same output.

    Args:
        x: (N, H, W, C) grey levels in 0..255, float.
        rng: source of all random draws.
        max_rotation_deg: rotation drawn from +-max_rotation_deg degrees.
        scale_range: isotropic zoom factor range.
        max_shift_fraction: shift drawn from +-fraction of the image side, per axis.
        max_brightness: offset drawn from +-max_brightness * 255 grey levels.
        contrast_range: factor range applied about the image mean.
        max_noise_std: noise sigma drawn from 0..max_noise_std grey levels.

    Returns:
        array of x's shape and dtype, values in 0..255.

    Raises:
        ValueError: when x is not a 4-D float batch.
    """
    x = np.asarray(x)
    if x.ndim != 4 or not np.issubdtype(x.dtype, np.floating):
        raise ValueError(
            f"augment_batch: expected a float batch (N, H, W, C), got dtype {x.dtype} "
            f"shape {x.shape}"
        )
    out = np.empty_like(x)
    for index in range(x.shape[0]):
        out[index] = _augment_one(
            x[index].astype(np.float32),
            rng,
            max_rotation_deg,
            scale_range,
            max_shift_fraction,
            max_brightness,
            contrast_range,
            max_noise_std,
        )
    return out


def _augment_one(
    image: np.ndarray,
    rng: np.random.Generator,
    max_rotation_deg: float,
    scale_range: tuple[float, float],
    max_shift_fraction: float,
    max_brightness: float,
    contrast_range: tuple[float, float],
    max_noise_std: float,
) -> np.ndarray:
    height, width, _ = image.shape

    # Draw every parameter first, so the rng sequence does not depend on the pixels.
    flip = rng.random() < 0.5
    angle = rng.uniform(-max_rotation_deg, max_rotation_deg)
    scale = rng.uniform(*scale_range)
    shift_x = rng.uniform(-max_shift_fraction, max_shift_fraction) * width
    shift_y = rng.uniform(-max_shift_fraction, max_shift_fraction) * height
    contrast = rng.uniform(*contrast_range)
    brightness = rng.uniform(-max_brightness, max_brightness) * 255.0
    noise_std = rng.uniform(0.0, max_noise_std)
    noise = rng.standard_normal((height, width, 1)).astype(np.float32) * np.float32(noise_std)

    if flip:
        image = image[:, ::-1, :]

    # Rotate and zoom about the centre, then shift. Border pixels become 0 (air or black).
    matrix = cv2.getRotationMatrix2D(((width - 1) / 2.0, (height - 1) / 2.0), angle, scale)
    matrix[:, 2] += (shift_x, shift_y)
    warped = cv2.warpAffine(
        np.ascontiguousarray(image),
        matrix,
        (width, height),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=(0.0, 0.0, 0.0, 0.0),
    )
    if warped.ndim == 2:
        warped = warped[:, :, np.newaxis]

    mean = np.float32(warped.mean())
    adjusted = (warped - mean) * np.float32(contrast) + mean + np.float32(brightness) + noise
    return np.clip(adjusted, 0.0, 255.0)


__all__ = [
    "augment_batch",
    "clahe",
    "denoise",
    "preprocess_image",
    "preprocess_slice",
    "resize_square",
    "unsharp_mask",
    "window",
]
