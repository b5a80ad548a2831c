"""Kidney stones of the synthetic CT: placement, partial-volume rendering and slice labels."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from nephrolith.common.synth_anatomy import Anatomy, SliceGrid

# Stone size and attenuation ranges drawn for every stone.
STONE_DIAMETER_MM = (2.0, 10.0)
STONE_HU = (300.0, 1600.0)


@dataclass(frozen=True)
class Stone:
    """A spherical calculus.

    Attributes:
        x: centre in mm (axes as in synth_anatomy.Ellipsoid).
        y: centre in mm.
        z: centre in mm.
        diameter_mm: sphere diameter.
        hu: attenuation of the stone material, drawn from STONE_HU (roughly uric acid at
            the low end, calcium stones at the high end).
        side: "right" or "left" kidney.
    """

    x: float
    y: float
    z: float
    diameter_mm: float
    hu: float
    side: str


def sample_stones(
    anatomy: Anatomy,
    rng: np.random.Generator,
    z_positions: list[float],
    thickness_mm: float,
    count: int,
) -> list[Stone]:
    """Place stones in the renal sinus of either kidney, inside the series' z range.

    Each stone centre lies in the slab of an inner slice (not the first or last), so the
    stone_visible rule labels at least one slice of the series "stone".

    NOTE: series of one or two slices have no inner slice. A stone smaller than the slice
    thickness near their outer edge can then miss every "stone" label.
    """
    stones = []
    inner = range(1, len(z_positions) - 1) if len(z_positions) >= 3 else range(len(z_positions))
    for _ in range(count):
        kidney = anatomy.kidneys[int(rng.integers(0, 2))]
        sinus = kidney.sinus
        eligible = [i for i in inner if abs(z_positions[i] - sinus.z) < 0.7 * sinus.rz]
        if not eligible:
            eligible = [min(inner, key=lambda i: abs(z_positions[i] - sinus.z))]
        index = eligible[int(rng.integers(0, len(eligible)))]
        z = z_positions[index] + rng.uniform(-0.499, 0.499) * thickness_mm

        # Uniform point in the inner 70 % of the sinus cross-section at that z.
        axes = sinus.section(z) or kidney.body.section(z) or (1.0, 1.0)
        radius, phi = 0.7 * math.sqrt(rng.random()), rng.uniform(0.0, 2.0 * math.pi)
        u, v = radius * axes[0] * math.cos(phi), radius * axes[1] * math.sin(phi)
        theta = math.radians(sinus.angle_deg)
        x = sinus.x + u * math.cos(theta) - v * math.sin(theta)
        y = sinus.y + u * math.sin(theta) + v * math.cos(theta)
        stones.append(
            Stone(
                x,
                y,
                z,
                float(rng.uniform(*STONE_DIAMETER_MM)),
                float(rng.uniform(*STONE_HU)),
                kidney.side,
            )
        )
    return stones


def stone_fill(stone: Stone, radial_mm: np.ndarray, z_mm: float, thickness_mm: float) -> np.ndarray:
    """Return the fraction of each pixel's slab that the stone fills (z partial volume).

    A sphere of radius R at in-plane distance rho spans z in [z_s - h, z_s + h] with
    h = sqrt(R^2 - rho^2). The slice integrates the slab [z - T/2, z + T/2], so a pixel's
    value mixes stone and background in the ratio overlap / T.

    Args:
        stone: the stone.
        radial_mm: in-plane distance of each sample from the stone centre.
        z_mm: slice centre.
        thickness_mm: slice thickness T.

    Returns:
        fill fractions in 0..1, shaped like radial_mm.
    """
    radius = stone.diameter_mm / 2.0
    half_chord = np.sqrt(np.clip(radius**2 - radial_mm**2, 0.0, None))
    low = np.maximum(stone.z - half_chord, z_mm - thickness_mm / 2.0)
    high = np.minimum(stone.z + half_chord, z_mm + thickness_mm / 2.0)
    return np.clip(high - low, 0.0, None) / thickness_mm


def stone_visible(stone: Stone, z_mm: float, thickness_mm: float) -> bool:
    """Tell whether a slice shows the stone well enough to be labelled "stone".

    The slab must contain at least half of min(diameter, T) of the stone's z extent. For a
    stone at least as thick as the slice this is true exactly when the slice centre lies inside
    the stone's z span. With contiguous slices, a stone centred in the slab of a slice that
    has both neighbours meets the rule on at least one slice.
    """
    radius = stone.diameter_mm / 2.0
    overlap = min(stone.z + radius, z_mm + thickness_mm / 2.0) - max(
        stone.z - radius, z_mm - thickness_mm / 2.0
    )
    return overlap >= 0.5 * min(stone.diameter_mm, thickness_mm)


def add_stones(
    hu: np.ndarray,
    grid: SliceGrid,
    stones: list[Stone],
    z_mm: float,
    thickness_mm: float,
    supersample: int = 3,
) -> np.ndarray:
    """Mix stones into a slice with in-plane (supersampled) and z partial volume.

    Args:
        hu: (H, W) HU slice; a modified copy is returned.
        grid: the slice grid.
        stones: stones of this patient.
        z_mm: slice centre.
        thickness_mm: slice thickness.
        supersample: samples per pixel side for the in-plane pixel area.

    Returns:
        float32 (H, W) HU.
    """
    out = hu.copy()
    offsets = (np.arange(supersample) + 0.5) / supersample - 0.5
    for stone in stones:
        row, col = grid.to_pixel(stone.x, stone.y)
        reach = int(math.ceil(stone.diameter_mm / 2.0 / grid.spacing_mm)) + 1
        r0, r1 = max(0, int(row) - reach), min(grid.rows, int(row) + reach + 2)
        c0, c1 = max(0, int(col) - reach), min(grid.cols, int(col) + reach + 2)
        rows = np.arange(r0, r1)[:, None, None, None] + offsets[None, None, :, None]
        cols = np.arange(c0, c1)[None, :, None, None] + offsets[None, None, None, :]
        radial = np.hypot(rows - row, cols - col) * grid.spacing_mm
        fill = stone_fill(stone, radial, z_mm, thickness_mm).mean(axis=(2, 3)).astype(np.float32)
        patch = out[r0:r1, c0:c1]
        out[r0:r1, c0:c1] = patch * (1.0 - fill) + np.float32(stone.hu) * fill
    return out
