"""Tests of the DIP pipeline: windowing, filters, resizing, preprocessing and augmentation."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from nephrolith.common import dip
from nephrolith.common.config import PreprocessConfig
from nephrolith.common.errors import DataError
from nephrolith.common.image import CTImage

# A config that leaves grey levels unchanged, so single steps can be checked by hand.
PLAIN = PreprocessConfig(clahe=False, unsharp_amount=0.0, denoise="none", image_size=64)


def noisy_step(seed: int = 0, sigma: float = 10.0) -> tuple[np.ndarray, np.ndarray]:
    """Return a 64 x 64 step edge (60 left, 180 right) with and without Gaussian noise."""
    clean = np.full((64, 64), 60.0, dtype=np.float32)
    clean[:, 32:] = 180.0
    noise = np.random.default_rng(seed).normal(0.0, sigma, clean.shape).astype(np.float32)
    return np.clip(clean + noise, 0, 255), clean


def edge_jump(image: np.ndarray) -> float:
    """Return the mean grey-level rise from column 29 to column 34 (across the step)."""
    return float(image[:, 34].mean() - image[:, 29].mean())


# --- window -------------------------------------------------------------------------------


def test_window_soft_tissue_hand_values() -> None:
    hu = np.array([-1000.0, -160.0, 40.0, 140.0, 240.0, 3000.0])

    out = dip.window(hu, -160.0, 240.0)

    # (hu + 160) / 400 * 255, clipped: 40 HU -> 127.5, 140 HU -> 191.25.
    np.testing.assert_allclose(out, [0.0, 0.0, 127.5, 191.25, 255.0, 255.0], atol=1e-4)
    assert out.dtype == np.float32


def test_window_bounds_from_config_presets() -> None:
    assert PreprocessConfig().hu_bounds == (-160.0, 240.0)
    assert PreprocessConfig(window="stone").hu_bounds == (-400.0, 1200.0)

    out = dip.window(np.array([400.0]), *PreprocessConfig(window="stone").hu_bounds)

    assert out[0] == pytest.approx(127.5)


def test_window_rejects_empty_range() -> None:
    with pytest.raises(ValueError, match="hu_max > hu_min"):
        dip.window(np.zeros(3), 100.0, 100.0)


# --- denoise ------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "strength"), [("nlm", 12.0), ("bilateral", 3.0)])
def test_denoise_lowers_noise_keeps_edge(method: str, strength: float) -> None:
    noisy, clean = noisy_step()
    flat = (slice(8, 56), slice(4, 24))

    out = dip.denoise(noisy, method, strength)

    assert out.dtype == np.float32
    assert out.shape == noisy.shape
    assert out[flat].std() < 0.5 * noisy[flat].std()
    assert edge_jump(out) > 0.9 * edge_jump(clean)


def test_denoise_none_is_identity() -> None:
    noisy, _ = noisy_step()

    np.testing.assert_array_equal(dip.denoise(noisy, "none", 5.0), noisy)


def test_denoise_rejects_unknown_method() -> None:
    with pytest.raises(ValueError, match="median"):
        dip.denoise(np.zeros((8, 8)), "median", 5.0)


# --- CLAHE --------------------------------------------------------------------------------


def test_clahe_raises_local_contrast() -> None:
    # Smooth texture with a grey-level spread (std) of only 10 around 110.
    field = np.random.default_rng(0).normal(0.0, 1.0, (128, 128)).astype(np.float32)
    field = cv2.GaussianBlur(field, (0, 0), 3.0)
    image = 110.0 + 10.0 * field / field.std()

    out = dip.clahe(image, clip_limit=2.0, tile_grid=4)

    tile = (slice(32, 64), slice(32, 64))
    assert out[tile].std() > 1.5 * image[tile].std()
    assert out.min() >= 0.0
    assert out.max() <= 255.0


# --- unsharp mask -------------------------------------------------------------------------


def test_unsharp_steepens_edge() -> None:
    _, clean = noisy_step()
    soft = cv2.GaussianBlur(clean, (0, 0), 2.0)

    out = dip.unsharp_mask(soft, amount=1.0, sigma_px=2.0)

    # A step of height h blurred with sigma s has peak slope h / (s * sqrt(2 pi)). Blurring it
    # again gives sigma s * sqrt(2), so 2 * soft - blur(soft) is (2 - 1 / sqrt(2)) times steeper.
    ratio = np.abs(np.diff(out, axis=1)).max() / np.abs(np.diff(soft, axis=1)).max()
    assert ratio == pytest.approx(2.0 - 1.0 / np.sqrt(2.0), rel=0.03)
    assert out.min() >= 0.0
    assert out.max() <= 255.0


def test_unsharp_amount_zero_is_identity() -> None:
    noisy, _ = noisy_step()

    np.testing.assert_array_equal(dip.unsharp_mask(noisy, amount=0.0, sigma_px=1.0), noisy)


def test_unsharp_clips_overshoot() -> None:
    image = np.zeros((32, 32), dtype=np.float32)
    image[:, 16:] = 255.0

    out = dip.unsharp_mask(image, amount=2.0, sigma_px=1.5)

    assert out.min() == 0.0
    assert out.max() == 255.0


# --- resize / pad -------------------------------------------------------------------------


def test_resize_pads_wide_image_centred() -> None:
    image = np.full((100, 200), 200.0, dtype=np.float32)

    out = dip.resize_square(image, 64, keep_aspect=True)

    # 200 -> 64 means 100 -> 32 rows of content, 16 padded rows above and 16 below.
    assert out.shape == (64, 64)
    assert np.all(out[:16] == 0.0)
    assert np.all(out[48:] == 0.0)
    np.testing.assert_allclose(out[16:48], 200.0)


def test_resize_pads_tall_image_centred() -> None:
    image = np.full((90, 30), 50.0, dtype=np.float32)

    out = dip.resize_square(image, 30, keep_aspect=True)

    assert np.all(out[:, :10] == 0.0)
    assert np.all(out[:, 20:] == 0.0)
    np.testing.assert_allclose(out[:, 10:20], 50.0)


def test_resize_stretch_fills_square() -> None:
    image = np.full((100, 200), 200.0, dtype=np.float32)

    out = dip.resize_square(image, 64, keep_aspect=False)

    np.testing.assert_allclose(out, 200.0)


def test_resize_shrink_uses_area_interpolation() -> None:
    # 1-pixel stripes alias under linear sampling but average out under INTER_AREA.
    stripes = np.tile((np.arange(60) % 2 * 255).astype(np.float32), (60, 1))

    out = dip.resize_square(stripes, 24)

    reference = cv2.resize(stripes, (24, 24), interpolation=cv2.INTER_AREA)
    np.testing.assert_array_equal(out, reference)
    assert out.std() < 30.0


def test_resize_enlarge_uses_linear_interpolation() -> None:
    image = np.array([[0.0, 255.0], [0.0, 255.0]], dtype=np.float32)

    out = dip.resize_square(image, 4)

    np.testing.assert_allclose(out[0], [0.0, 63.75, 191.25, 255.0])


# --- preprocess ---------------------------------------------------------------------------


def synthetic_hu_slice(seed: int = 0) -> np.ndarray:
    """Return a 96 x 128 HU slice: air, a soft-tissue disc and a bright 'stone'."""
    rows, cols = np.indices((96, 128))
    hu = np.full((96, 128), -1000.0, dtype=np.float32)
    hu[(rows - 48) ** 2 + (cols - 64) ** 2 < 40**2] = 40.0
    hu[(rows - 50) ** 2 + (cols - 70) ** 2 < 4**2] = 900.0
    return hu + np.random.default_rng(seed).normal(0, 15, hu.shape).astype(np.float32)


def test_preprocess_slice_shape_range_channels() -> None:
    cfg = PreprocessConfig(image_size=64, denoise="bilateral")

    out = dip.preprocess_slice(synthetic_hu_slice(), True, cfg)

    assert out.shape == (64, 64, 3)
    assert out.dtype == np.float32
    assert out.min() >= 0.0
    assert out.max() <= 255.0
    np.testing.assert_array_equal(out[..., 0], out[..., 1])
    np.testing.assert_array_equal(out[..., 0], out[..., 2])


def test_preprocess_slice_deterministic() -> None:
    cfg = PreprocessConfig(image_size=64, denoise="nlm")
    hu = synthetic_hu_slice()

    np.random.seed(1)
    first = dip.preprocess_slice(hu, True, cfg)
    np.random.seed(2)
    second = dip.preprocess_slice(hu.copy(), True, cfg)

    np.testing.assert_array_equal(first, second)


def test_preprocess_slice_windows_hu_only() -> None:
    flat_hu = np.full((64, 64), 40.0, dtype=np.float32)
    grey = np.full((64, 64), 40.0, dtype=np.float32)

    from_hu = dip.preprocess_slice(flat_hu, True, PLAIN)
    from_display = dip.preprocess_slice(grey, False, PLAIN)

    # 40 HU is the soft-tissue window centre -> 127.5; a display grey level 40 stays 40.
    np.testing.assert_allclose(from_hu, 127.5)
    np.testing.assert_allclose(from_display, 40.0)


def test_preprocess_slice_uses_explicit_window() -> None:
    cfg = PreprocessConfig(
        window_center=0.0, window_width=2000.0, clahe=False, unsharp_amount=0.0, image_size=16
    )

    out = dip.preprocess_slice(np.full((16, 16), 500.0), True, cfg)

    # -1000..1000 HU window: 500 HU -> 1500 / 2000 * 255.
    np.testing.assert_allclose(out, 191.25)


def test_preprocess_slice_rejects_volume_and_nan() -> None:
    with pytest.raises(DataError, match="2-D"):
        dip.preprocess_slice(np.zeros((2, 8, 8)), True, PLAIN)
    bad = np.zeros((8, 8))
    bad[2, 3] = np.nan
    with pytest.raises(DataError, match="1 pixels"):
        dip.preprocess_slice(bad, True, PLAIN)


def test_preprocess_image_volume_keeps_order() -> None:
    volume = np.stack([np.full((32, 32), hu, dtype=np.float32) for hu in (-160.0, 40.0, 240.0)])
    ct = CTImage(volume, True, (3.0, 0.8, 0.8), "nifti", "volume.nii")

    out = dip.preprocess_image(ct, PLAIN)

    assert out.shape == (3, 64, 64, 3)
    np.testing.assert_allclose(out[:, 32, 32, 0], [0.0, 127.5, 255.0])


def test_preprocess_real_jpg(islam_subset) -> None:
    path = islam_subset / "images" / "Stone" / "Stone- (1).jpg"
    grey = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    assert grey is not None, f"cv2 could not read {path}"
    cfg = PreprocessConfig(image_size=224, denoise="nlm")

    out = dip.preprocess_slice(grey.astype(np.float32), False, cfg)

    assert out.shape == (224, 224, 3)
    assert out.min() >= 0.0
    assert out.max() <= 255.0
    assert out.std() > 20.0


# --- augmentation -------------------------------------------------------------------------


def augment_input() -> np.ndarray:
    hu = synthetic_hu_slice()
    one = dip.preprocess_slice(hu, True, PreprocessConfig(image_size=64))
    return np.stack([one, one[::-1], one[:, ::-1]])


def test_augment_same_seed_reproducible() -> None:
    x = augment_input()

    first = dip.augment_batch(x, np.random.default_rng(7))
    second = dip.augment_batch(x, np.random.default_rng(7))

    np.testing.assert_array_equal(first, second)


def test_augment_different_seeds_differ() -> None:
    x = augment_input()

    first = dip.augment_batch(x, np.random.default_rng(7))
    second = dip.augment_batch(x, np.random.default_rng(8))

    assert np.abs(first - second).mean() > 1.0


def test_augment_keeps_shape_dtype_range() -> None:
    x = augment_input()

    out = dip.augment_batch(x, np.random.default_rng(0))

    assert out.shape == x.shape
    assert out.dtype == x.dtype
    assert out.min() >= 0.0
    assert out.max() <= 255.0
    assert not np.array_equal(out, x)
    np.testing.assert_array_equal(out[..., 0], out[..., 2])


def test_augment_flip_only_mirrors() -> None:
    x = augment_input()
    no_jitter = {
        "max_rotation_deg": 0.0,
        "scale_range": (1.0, 1.0),
        "max_shift_fraction": 0.0,
        "max_brightness": 0.0,
        "contrast_range": (1.0, 1.0),
        "max_noise_std": 0.0,
    }

    out = dip.augment_batch(np.repeat(x[:1], 16, axis=0), np.random.default_rng(3), **no_jitter)

    mirrored = [np.allclose(o, x[0][:, ::-1], atol=1e-3) for o in out]
    unchanged = [np.allclose(o, x[0], atol=1e-3) for o in out]
    assert all(m or u for m, u in zip(mirrored, unchanged, strict=True))
    assert 0 < sum(mirrored) < 16


def test_augment_rejects_integer_batch() -> None:
    with pytest.raises(ValueError, match="float batch"):
        dip.augment_batch(np.zeros((1, 8, 8, 3), dtype=np.uint8), np.random.default_rng(0))
