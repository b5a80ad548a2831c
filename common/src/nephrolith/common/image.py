"""The one image type every reader returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class CTImage:
    """Pixels of one slice or one volume with their physical meaning.

    Attributes:
        pixels: float32 array, `(H, W)` for a slice or `(D, H, W)` for a volume.
            Volumes are ordered from inferior to superior (increasing patient z)
            with rows running anterior to posterior and columns right to left
            of the patient, as a radiologist views an axial slice.
        is_hu: True when `pixels` are Hounsfield units (DICOM, NIfTI). False for
            PNG/JPG exports, whose values are display-windowed grey levels scaled
            to 0..255 whatever their bit depth.
        spacing_mm: pixel spacing in mm, `(row, col)` for a slice or
            `(z, row, col)` for a volume; None when the file carries none.
        source: reader that produced the image: "dicom", "dicom-series",
            "nifti", "png" or "jpeg".
        path: file or folder the image was read from.
        meta: reader-specific facts (for example "skipped" slices of a series,
            "bit_depth", "photometric", "series_uid"). Never patient identifiers.
    """

    pixels: np.ndarray
    is_hu: bool
    spacing_mm: tuple[float, ...] | None
    source: str
    path: str
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def is_volume(self) -> bool:
        """True when `pixels` contains a stack of slices `(D, H, W)`."""
        return self.pixels.ndim == 3

    def slices(self) -> list[np.ndarray]:
        """Return the 2-D slices, one for a single image, D for a volume."""
        if self.is_volume:
            return [self.pixels[i] for i in range(self.pixels.shape[0])]
        return [self.pixels]
