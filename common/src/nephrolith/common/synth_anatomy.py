"""Geometry of the synthetic abdomen at kidney level, rendered in Hounsfield units."""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

# Typical unenhanced tissue values in HU at 120 kVp (approximate): air -1000 by definition of
# the HU scale, fat about -100, muscle about 50, cortical bone 700..1000, cancellous 200..300.
AIR_HU = -1000.0
FAT_HU = -100.0
MUSCLE_HU = 50.0
VISCERA_HU = 35.0
DISC_HU = 90.0

# Lumbar vertebral levels repeat about every 32 mm with discs about 9 mm thick (approximate).
VERTEBRA_PITCH_MM = 32.0
DISC_THICKNESS_MM = 9.0

# Correlation length (mm) of the tissue texture along z and its in-plane smoothing (mm).
TEXTURE_Z_MM = 12.0
TEXTURE_XY_MM = 6.0

# z semi-axis of structures that run through the whole series (vessels, spine, ribs).
LONG_MM = 1000.0


@dataclass(frozen=True)
class SliceGrid:
    """Pixel grid of one axial slice: rows run anterior to posterior, columns patient right to left.

    Attributes:
        rows: pixel rows (H).
        cols: pixel columns (W).
        spacing_mm: pixel side in mm.
    """

    rows: int
    cols: int
    spacing_mm: float

    def coordinates(self) -> tuple[np.ndarray, np.ndarray]:
        """Return (x_mm, y_mm) of every pixel centre, (H, W) each, with (0, 0) at the centre."""
        x = (np.arange(self.cols, dtype=np.float32) - (self.cols - 1) / 2.0) * self.spacing_mm
        y = (np.arange(self.rows, dtype=np.float32) - (self.rows - 1) / 2.0) * self.spacing_mm
        return np.meshgrid(x, y)

    def to_pixel(self, x_mm: float, y_mm: float) -> tuple[float, float]:
        """Return (row, col) of a point given in mm."""
        return (
            y_mm / self.spacing_mm + (self.rows - 1) / 2.0,
            x_mm / self.spacing_mm + (self.cols - 1) / 2.0,
        )


@dataclass(frozen=True)
class Ellipsoid:
    """Ellipsoid with axes along z and an in-plane rotation, all lengths in mm.

    Attributes:
        x: centre, patient right (-) to left (+).
        y: centre, anterior (-) to posterior (+).
        z: centre, inferior (-) to superior (+).
        rx: in-plane semi-axis along the rotated x direction.
        ry: in-plane semi-axis along the rotated y direction.
        rz: semi-axis along z.
        angle_deg: rotation of the rx axis from +x towards +y.
    """

    x: float
    y: float
    z: float
    rx: float
    ry: float
    rz: float
    angle_deg: float = 0.0

    def section(self, z_mm: float) -> tuple[float, float] | None:
        """Return the in-plane semi-axes at z_mm, or None when the plane misses the ellipsoid."""
        dz = (z_mm - self.z) / self.rz
        if abs(dz) >= 1.0:
            return None
        factor = math.sqrt(1.0 - dz * dz)
        return self.rx * factor, self.ry * factor

    def mask(self, x_mm: np.ndarray, y_mm: np.ndarray, z_mm: float) -> np.ndarray:
        """Return the boolean (H, W) cross-section at z_mm on the meshgrid x_mm, y_mm."""
        mask = np.zeros(x_mm.shape, dtype=bool)
        axes = self.section(z_mm)
        if axes is None:
            return mask
        theta = math.radians(self.angle_deg)
        cos, sin = math.cos(theta), math.sin(theta)

        # Evaluate only inside the bounding box of the rotated ellipse.
        half_x = math.hypot(axes[0] * cos, axes[1] * sin)
        half_y = math.hypot(axes[0] * sin, axes[1] * cos)
        c0, c1 = np.searchsorted(x_mm[0], [self.x - half_x, self.x + half_x])
        r0, r1 = np.searchsorted(y_mm[:, 0], [self.y - half_y, self.y + half_y])
        if c0 >= c1 or r0 >= r1:
            return mask
        dx = x_mm[r0:r1, c0:c1] - self.x
        dy = y_mm[r0:r1, c0:c1] - self.y
        u = dx * cos + dy * sin
        v = dy * cos - dx * sin
        mask[r0:r1, c0:c1] = (u / axes[0]) ** 2 + (v / axes[1]) ** 2 <= 1.0
        return mask

    def shrunk(self, margin_mm: float) -> Ellipsoid:
        """Return the ellipsoid with both in-plane semi-axes reduced by margin_mm."""
        return Ellipsoid(
            self.x,
            self.y,
            self.z,
            self.rx - margin_mm,
            self.ry - margin_mm,
            self.rz,
            self.angle_deg,
        )


@dataclass(frozen=True)
class Organ:
    """One structure of the phantom, painted over those before it.

    Attributes:
        name: anatomical name. "cavity" also gets fat patches, "vertebra" becomes disc at disc
            levels.
        shape: its volume.
        hu: mean attenuation.
        texture_hu: amplitude of the patient's smooth texture field added inside.
        in_cavity: clip to the abdominal cavity.
    """

    name: str
    shape: Ellipsoid
    hu: float
    texture_hu: float = 0.0
    in_cavity: bool = False


@dataclass(frozen=True)
class Kidney:
    """A kidney and its renal sinus (fat and collecting system around the hilum)."""

    side: str
    body: Ellipsoid
    sinus: Ellipsoid


@dataclass(frozen=True)
class Anatomy:
    """A sampled patient: organs in painting order, kidneys, body outline and disc phase."""

    organs: tuple[Organ, ...]
    kidneys: tuple[Kidney, Kidney]
    body: Ellipsoid
    cavity: Ellipsoid
    disc_phase_mm: float
    texture_seed: int


def _kidney(rng: np.random.Generator, side: str, spine_y: float) -> Kidney:
    sign = 1.0 if side == "left" else -1.0
    tilt = rng.uniform(25.0, 40.0)

    # The long axis of the axial section points posterolaterally, so the hilum faces anteromedially.
    angle = tilt if side == "left" else 180.0 - tilt
    rx, ry = rng.uniform(24.0, 29.0), rng.uniform(16.0, 20.0)
    z = rng.uniform(0.0, 12.0) if side == "left" else rng.uniform(-12.0, 0.0)
    body = Ellipsoid(
        sign * rng.uniform(60.0, 72.0),
        spine_y + rng.uniform(0.0, 12.0),
        z,
        rx,
        ry,
        rng.uniform(50.0, 60.0),
        angle,
    )
    theta = math.radians(angle)
    shift = 0.3 * rx
    sinus = Ellipsoid(
        body.x - shift * math.cos(theta),
        body.y - shift * math.sin(theta),
        z,
        0.45 * rx,
        0.5 * ry,
        0.45 * body.rz,
        angle,
    )
    return Kidney(side, body, sinus)


def _spine(rng: np.random.Generator, spine_y: float) -> list[Organ]:
    radius = rng.uniform(16.0, 20.0)
    organs = []
    for sign in (-1.0, 1.0):
        organs.append(
            Organ(
                "paraspinal",
                Ellipsoid(sign * 28.0, spine_y + 45.0, 0.0, 20.0, 16.0, LONG_MM),
                MUSCLE_HU,
                4.0,
            )
        )
        organs.append(
            Organ(
                "psoas",
                Ellipsoid(sign * (radius + 14.0), spine_y + 2.0, 0.0, 13.0, 11.0, LONG_MM),
                45.0,
                4.0,
            )
        )
    organs += [
        Organ("lamina", Ellipsoid(0.0, spine_y + radius + 12.0, 0.0, 15.0, 11.0, LONG_MM), 600.0),
        Organ(
            "spinal_canal", Ellipsoid(0.0, spine_y + radius + 10.0, 0.0, 8.0, 7.0, LONG_MM), 10.0
        ),
        Organ(
            "spinous_process",
            Ellipsoid(0.0, spine_y + radius + 30.0, 0.0, 4.0, 10.0, LONG_MM),
            650.0,
        ),
        Organ(
            "vertebra",
            Ellipsoid(0.0, spine_y, 0.0, radius, radius * 0.9, LONG_MM),
            rng.uniform(700.0, 1000.0),
        ),
        Organ(
            "vertebra",
            Ellipsoid(0.0, spine_y, 0.0, radius - 2.0, radius * 0.9 - 2.0, LONG_MM),
            rng.uniform(200.0, 300.0),
            15.0,
        ),
    ]
    return organs


def _ribs(body: Ellipsoid, depth_mm: float) -> list[Organ]:
    organs = []
    for angle in (35.0, 60.0):
        for sign in (-1.0, 1.0):
            theta = math.radians(angle)
            x = sign * (body.rx - depth_mm) * math.cos(theta)
            y = body.y + (body.ry - depth_mm) * math.sin(theta)
            organs.append(Organ("rib", Ellipsoid(x, y, 0.0, 6.0, 4.0, LONG_MM), 650.0))
            organs.append(Organ("rib", Ellipsoid(x, y, 0.0, 3.5, 2.0, LONG_MM), 250.0))
    return organs


def sample_anatomy(rng: np.random.Generator) -> Anatomy:
    """Draw one patient's abdomen at kidney level, z = 0 near the renal hila.

    Args:
        rng: source of every random choice.

    Returns:
        the patient's anatomy.
    """
    body = Ellipsoid(
        0.0,
        rng.uniform(-5.0, 5.0),
        0.0,
        rng.uniform(135.0, 170.0),
        rng.uniform(100.0, 125.0),
        LONG_MM,
    )
    fat_mm, wall_mm = rng.uniform(8.0, 30.0), rng.uniform(8.0, 12.0)
    cavity = body.shrunk(fat_mm + wall_mm)
    spine_y = body.y + body.ry - fat_mm - 70.0

    # Body wall, then cavity contents, then retroperitoneum and spine painted over them.
    organs = [
        Organ("subcutaneous_fat", body, FAT_HU, 6.0),
        Organ("abdominal_wall", body.shrunk(fat_mm), MUSCLE_HU, 4.0),
        Organ("cavity", cavity, VISCERA_HU, 12.0),
    ]
    for _ in range(rng.integers(0, 5)):
        gas = Ellipsoid(
            rng.uniform(-60.0, 60.0),
            rng.uniform(cavity.y - 0.7 * cavity.ry, spine_y - 35.0),
            rng.uniform(-25.0, 25.0),
            rng.uniform(6.0, 18.0),
            rng.uniform(6.0, 18.0),
            rng.uniform(8.0, 20.0),
        )
        organs.append(Organ("bowel_gas", gas, -950.0, 0.0, True))
    organs.append(
        Organ(
            "liver",
            Ellipsoid(
                rng.uniform(-85.0, -65.0),
                rng.uniform(-30.0, -10.0),
                rng.uniform(50.0, 70.0),
                rng.uniform(55.0, 70.0),
                rng.uniform(55.0, 70.0),
                rng.uniform(80.0, 95.0),
            ),
            rng.uniform(55.0, 65.0),
            5.0,
            True,
        )
    )
    organs.append(
        Organ(
            "spleen",
            Ellipsoid(
                rng.uniform(70.0, 85.0),
                spine_y + rng.uniform(0, 15),
                rng.uniform(40.0, 60.0),
                25.0,
                40.0,
                rng.uniform(50.0, 60.0),
                -40.0,
            ),
            48.0,
            4.0,
            True,
        )
    )

    kidneys = (_kidney(rng, "right", spine_y), _kidney(rng, "left", spine_y))
    for kidney in kidneys:
        fat = Ellipsoid(
            kidney.body.x,
            kidney.body.y,
            kidney.body.z,
            kidney.body.rx + 9.0,
            kidney.body.ry + 9.0,
            kidney.body.rz + 12.0,
            kidney.body.angle_deg,
        )
        organs.append(Organ("perirenal_fat", fat, -95.0, 6.0))
    for kidney in kidneys:
        organs.append(Organ("kidney", kidney.body, rng.uniform(28.0, 38.0), 4.0))
        organs.append(Organ("renal_sinus", kidney.sinus, -20.0, 10.0))

    aorta_x = rng.uniform(8.0, 18.0)
    organs.append(
        Organ("aorta", Ellipsoid(aorta_x, spine_y - 30.0, 0.0, 11.0, 11.0, LONG_MM), 40.0)
    )
    organs.append(
        Organ(
            "ivc",
            Ellipsoid(rng.uniform(-28.0, -20.0), spine_y - 27.0, 0.0, 12.0, 8.0, LONG_MM),
            38.0,
        )
    )

    # A calcified aortic plaque in some patients: a bright spot that is not a kidney stone.
    if rng.random() < 0.3:
        phi = rng.uniform(0.0, 2.0 * math.pi)
        plaque = Ellipsoid(
            aorta_x + 10.0 * math.cos(phi),
            spine_y - 30.0 + 10.0 * math.sin(phi),
            rng.uniform(-20.0, 20.0),
            2.0,
            1.5,
            rng.uniform(5.0, 15.0),
        )
        organs.append(Organ("aortic_plaque", plaque, rng.uniform(300.0, 700.0)))

    organs += _spine(rng, spine_y)
    organs += _ribs(body, fat_mm + wall_mm / 2.0)
    return Anatomy(
        tuple(organs),
        kidneys,
        body,
        cavity,
        rng.uniform(0.0, VERTEBRA_PITCH_MM),
        int(rng.integers(0, 2**31)),
    )


class Phantom:
    """Renderer of one patient's noise-free HU slices on a fixed grid."""

    def __init__(self, anatomy: Anatomy, grid: SliceGrid) -> None:
        self.anatomy = anatomy
        self.grid = grid
        self.x_mm, self.y_mm = grid.coordinates()
        rng = np.random.default_rng(anatomy.texture_seed)
        sigma_px = TEXTURE_XY_MM / grid.spacing_mm
        self._fields = [self._smooth_field(rng, sigma_px) for _ in range(4)]

    def _smooth_field(self, rng: np.random.Generator, sigma_px: float) -> np.ndarray:
        white = rng.standard_normal((self.grid.rows, self.grid.cols)).astype(np.float32)
        field = cv2.GaussianBlur(white, (0, 0), sigma_px)
        return field / max(float(field.std()), 1e-6)

    def texture(self, z_mm: float, pair: int) -> np.ndarray:
        """Return a unit-variance texture that changes smoothly with z (rotating two fields)."""
        phase = z_mm / TEXTURE_Z_MM
        first, second = self._fields[2 * pair], self._fields[2 * pair + 1]
        return math.cos(phase) * first + math.sin(phase) * second

    def render(self, z_mm: float) -> np.ndarray:
        """Return the (H, W) float32 HU slice at z_mm, without stones, blur or noise."""
        hu = np.full((self.grid.rows, self.grid.cols), AIR_HU, dtype=np.float32)
        texture = self.texture(z_mm, 0)
        cavity = self.anatomy.cavity.mask(self.x_mm, self.y_mm, z_mm)
        in_disc = (z_mm - self.anatomy.disc_phase_mm) % VERTEBRA_PITCH_MM < DISC_THICKNESS_MM

        for organ in self.anatomy.organs:
            mask = organ.shape.mask(self.x_mm, self.y_mm, z_mm)
            if organ.in_cavity:
                mask &= cavity
            if not mask.any():
                continue
            value = DISC_HU if organ.name == "vertebra" and in_disc else organ.hu
            hu[mask] = value + organ.texture_hu * texture[mask]

            # Mesenteric fat between bowel loops: a second field picks the fatty patches.
            if organ.name == "cavity":
                fatty = mask & (self.texture(z_mm, 1) > 0.7)
                hu[fatty] = FAT_HU + 10.0 + 6.0 * texture[fatty]
        return hu
