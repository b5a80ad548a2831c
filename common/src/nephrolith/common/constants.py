"""Constants shared by the client and the server: classes, HU windows, record keys."""

from __future__ import annotations

from enum import StrEnum

# The detector's task is binary. Index 1 is the positive class everywhere.
CLASS_NAMES: tuple[str, str] = ("no_stone", "stone")
POSITIVE_LABEL = "stone"

# Source labels that map to "no_stone". The Islam et al. 2022 kidney CT data uses
# normal/cyst/tumor next to stone; any other label is rejected so a typo never
# silently becomes a negative.
NEGATIVE_LABELS: frozenset[str] = frozenset(
    {"no_stone", "normal", "cyst", "tumor", "tumour", "negative", "0"}
)
POSITIVE_LABELS: frozenset[str] = frozenset({"stone", "positive", "1"})


class WindowPreset(StrEnum):
    """Named CT display windows; values are looked up in WINDOW_PRESETS."""

    SOFT_TISSUE = "soft_tissue"
    BONE = "bone"
    STONE = "stone"


# (window_center, window_width) in HU, as DICOM WindowCenter/WindowWidth define them.
# Soft tissue W400/L40 and bone W1800/L400 are the usual abdominal CT presets.
# The stone window (W1600/L400, -400..1200 HU) keeps fat, kidney parenchyma and
# calculi from 300 HU upward apart instead of saturating every stone to white.
WINDOW_PRESETS: dict[WindowPreset, tuple[float, float]] = {
    WindowPreset.SOFT_TISSUE: (40.0, 400.0),
    WindowPreset.BONE: (400.0, 1800.0),
    WindowPreset.STONE: (400.0, 1600.0),
}

# File name suffixes the readers accept (lower case).
DICOM_SUFFIXES: frozenset[str] = frozenset({".dcm", ".dicom", ".ima", ""})
NIFTI_SUFFIXES: tuple[str, ...] = (".nii", ".nii.gz")
EXPORT_SUFFIXES: frozenset[str] = frozenset({".png", ".jpg", ".jpeg"})

# Largest image a reader decodes, in pixels per slice. Larger files are rejected
# as possible decompression bombs before their pixels are decoded.
MAX_PIXELS_PER_SLICE = 8192 * 8192
# Largest volume a reader assembles, in voxels (1024**3 voxels are 4 GiB as float32). A thin-slice
# abdominal CT of 1,000 slices of 512 x 512 has about a quarter of this.
MAX_VOXELS_PER_VOLUME = 1024**3

# Keys of records exchanged with Flower (kebab-case, as Flower's own keys).
NUM_EXAMPLES_KEY = "num-examples"
PROXIMAL_MU_KEY = "proximal-mu"
