"""Stone candidates: connected regions of a Grad-CAM heatmap and of stone-dense voxels under it.

Two kinds of candidate exist:

- "hu": for Hounsfield-unit input, connected components (26-connected in a
  volume, 8-connected in a slice) of voxels at or above `stone_hu_min` that lie
  inside the high-heat region. They carry a size in mm when the spacing is known.
- "heatmap": for display images (PNG/JPG, no HU), connected regions of the
  high-heat area itself. They mark where the model looked, not a measured stone.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CandidateSettings:
    """How candidates are found.

    Attributes:
        stone_hu_min: lowest HU counted as stone. Uric-acid stones start at about
            200-300 HU and calcium stones are far denser, so 300 HU keeps contrast-free
            soft tissue (below 100 HU) out.
        heat_threshold: lowest normalised heat (0..1) of the high-heat region.
        max_stone_mm: components whose largest extent exceeds this many mm are
            dropped; this removes vertebrae and ribs, which are dense but large.
        max_candidates: maximum number of candidates returned, strongest heat first.
    """

    stone_hu_min: float = 300.0
    heat_threshold: float = 0.5
    max_stone_mm: float = 30.0
    max_candidates: int = 10


@dataclass(frozen=True)
class Candidate:
    """One stone candidate; positions are 0-based pixel indices of the uploaded image.

    Attributes:
        kind: "hu" (dense voxels inside the high-heat region) or "heatmap".
        slice: slice index in the volume's order, None for a single slice.
        row: row of the centroid.
        col: column of the centroid.
        bbox: (row_min, col_min, row_max, col_max), inclusive.
        slice_range: (first, last) slice, None for a single slice.
        voxels: pixels or voxels in the component.
        size_mm: largest extent along rows, columns and slices in mm; None without spacing.
        volume_mm3: voxels times the voxel volume; None without a full 3-D spacing.
        peak_hu: highest HU in the component, None for display images.
        mean_hu: mean HU of the component, None for display images.
        heat: highest normalised heat (0..1) inside the component.
    """

    kind: str
    slice: int | None
    row: float
    col: float
    bbox: tuple[int, int, int, int]
    slice_range: tuple[int, int] | None
    voxels: int
    size_mm: float | None
    volume_mm3: float | None
    peak_hu: float | None
    mean_hu: float | None
    heat: float

    def to_json(self) -> dict:
        """Return the candidate as JSON-ready values rounded to 0.01."""
        out = asdict(self)
        for key in ("row", "col", "size_mm", "volume_mm3", "peak_hu", "mean_hu", "heat"):
            if out[key] is not None:
                out[key] = round(float(out[key]), 2)
        out["bbox"] = list(self.bbox)
        out["slice_range"] = list(self.slice_range) if self.slice_range else None
        return out


def _extent_mm(box: tuple[slice, ...], spacing_mm: tuple[float, ...] | None) -> float | None:
    if spacing_mm is None:
        return None
    return max((s.stop - s.start) * float(step) for s, step in zip(box, spacing_mm, strict=True))


def _component(
    label_id: int,
    box: tuple[slice, ...],
    labels: np.ndarray,
    hu: np.ndarray | None,
    heat: np.ndarray,
    spacing_mm: tuple[float, ...] | None,
    kind: str,
) -> Candidate:
    # Work inside the bounding box only: labelled volumes can be large.
    mask = labels[box] == label_id
    coords = np.argwhere(mask).astype(np.float64).mean(axis=0)
    offsets = np.array([s.start for s in box], dtype=np.float64)
    centre = coords + offsets
    voxels = int(mask.sum())
    heat_values = heat[box][mask]
    hu_values = hu[box][mask] if hu is not None else None
    is_volume = labels.ndim == 3
    row_box, col_box = box[-2], box[-1]
    volume_mm3 = None
    if spacing_mm is not None and is_volume:
        volume_mm3 = voxels * float(np.prod(spacing_mm))
    return Candidate(
        kind=kind,
        slice=int(round(centre[0])) if is_volume else None,
        row=float(centre[-2]),
        col=float(centre[-1]),
        bbox=(row_box.start, col_box.start, row_box.stop - 1, col_box.stop - 1),
        slice_range=(box[0].start, box[0].stop - 1) if is_volume else None,
        voxels=voxels,
        size_mm=_extent_mm(box, spacing_mm),
        volume_mm3=volume_mm3,
        peak_hu=float(hu_values.max()) if hu_values is not None else None,
        mean_hu=float(hu_values.mean()) if hu_values is not None else None,
        heat=float(heat_values.max()),
    )


def find_candidates(
    heat: np.ndarray,
    settings: CandidateSettings,
    hu: np.ndarray | None = None,
    spacing_mm: tuple[float, ...] | None = None,
) -> list[Candidate]:
    """Find stone candidates in one slice (H, W) or one volume (D, H, W).

    Args:
        heat: normalised heat 0..1 on the image's own pixel grid, same shape as `hu`.
            Slices that must not yield candidates hold 0.
        settings: thresholds and limits.
        hu: pixels in HU, or None for display images (heatmap regions are returned then).
        spacing_mm: (row, col) or (z, row, col) in mm, or None when unknown.

    Returns:
        Candidates sorted by heat, strongest first, at most `settings.max_candidates`.

    Raises:
        ValueError: when `hu` and `heat` differ in shape or spacing has the wrong length.
    """
    if hu is not None and hu.shape != heat.shape:
        raise ValueError(f"hu shape {hu.shape} differs from heat shape {heat.shape}")
    if spacing_mm is not None and len(spacing_mm) != heat.ndim:
        raise ValueError(f"spacing_mm {spacing_mm} does not match {heat.ndim}-D pixels")

    # Connectivity: all neighbours touching by a face, edge or corner.
    hot = heat >= settings.heat_threshold
    # NOTE: any small dense structure under the heat passes, including vascular
    # calcifications, contrast-filled vessels and bone fragments; a reader must confirm.
    if hu is not None:
        mask, kind = hot & (hu >= settings.stone_hu_min), "hu"
    else:
        mask, kind = hot, "heatmap"
    structure = np.ones((3,) * heat.ndim, dtype=bool)
    labels, count = ndimage.label(mask, structure=structure)

    found = []
    for label_id, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        candidate = _component(label_id, box, labels, hu, heat, spacing_mm, kind)
        if (
            kind == "hu"
            and candidate.size_mm is not None
            and candidate.size_mm > settings.max_stone_mm
        ):
            continue
        found.append(candidate)
    found.sort(key=lambda c: (-c.heat, -c.voxels))
    if len(found) > settings.max_candidates:
        logger.debug(
            "%d candidates found, keeping the %d hottest", len(found), settings.max_candidates
        )
    return found[: settings.max_candidates]
