"""Seeded synthetic CT hospitals: axial kidney-level DICOM series with known stones, offline."""

from __future__ import annotations

import csv
import logging
import zlib
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from nephrolith.common.synth_anatomy import Phantom, SliceGrid, sample_anatomy
from nephrolith.common.synth_stones import Stone, add_stones, sample_stones, stone_visible

logger = logging.getLogger(__name__)

# Stored pixel = HU - RESCALE_INTERCEPT, as most CT scanners write it (RescaleSlope 1).
RESCALE_INTERCEPT = -1024.0

# Field of view (mm) covered by the default pixel spacing: a 512-px clinical slice at
# 0.7 mm, so a 256-px synthetic slice has 1.4 mm pixels (the clinical slice binned 2 x 2).
DEFAULT_FOV_MM = 360.0

STONES_PER_PATIENT_P = (0.6, 0.3, 0.1)  # probabilities of 1, 2 and 3 stones

MANIFEST_COLUMNS = ("path", "label", "patient_id", "split", "site")
STONES_COLUMNS = ("path", "patient_id", "stone_id", "row", "col", "diameter_mm", "hu")


@dataclass(frozen=True)
class SiteProfile:
    """Acquisition settings of one synthetic hospital.

    Attributes:
        site_id: name used in PatientID and the manifest's site column, e.g. "SITE-A".
        noise_hu: standard deviation of the added image noise in HU.
        blur_sigma_px: Gaussian sigma of the scanner's in-plane point spread function, in pixels.
        pixel_spacing_mm: pixel side; None means DEFAULT_FOV_MM / image_size.
        slice_thickness_mm: slice thickness, also the distance between slice centres.
        stone_prevalence: fraction of patients with stones.
    """

    site_id: str
    noise_hu: float = 15.0
    blur_sigma_px: float = 0.5
    pixel_spacing_mm: float | None = None
    slice_thickness_mm: float = 3.0
    stone_prevalence: float = 0.5


# Three hospitals that differ in noise, sharpness, spacing, slice thickness and prevalence.
# Standard abdominal reconstruction kernels resolve roughly 1 mm (an estimate), so the PSF
# sigma stays below one 1.3..1.6 mm pixel.
DEFAULT_SITES = (
    SiteProfile(
        "SITE-A",
        noise_hu=12.0,
        blur_sigma_px=0.4,
        pixel_spacing_mm=1.3,
        slice_thickness_mm=3.0,
        stone_prevalence=0.5,
    ),
    SiteProfile(
        "SITE-B",
        noise_hu=22.0,
        blur_sigma_px=0.6,
        pixel_spacing_mm=1.45,
        slice_thickness_mm=2.5,
        stone_prevalence=0.35,
    ),
    SiteProfile(
        "SITE-C",
        noise_hu=16.0,
        blur_sigma_px=0.8,
        pixel_spacing_mm=1.6,
        slice_thickness_mm=5.0,
        stone_prevalence=0.6,
    ),
)


def _seed_sequence(seed: int, *parts: str | int) -> np.random.SeedSequence:
    # crc32 instead of hash(): Python salts str hashes per process, which would break reruns.
    words = [seed] + [zlib.crc32(str(part).encode("utf-8")) for part in parts]
    return np.random.SeedSequence(words)


def slice_positions(n_slices: int, thickness_mm: float, offset_mm: float) -> list[float]:
    """Return contiguous slice centres in mm, inferior to superior, centred near z = offset_mm."""
    first = offset_mm - (n_slices - 1) * thickness_mm / 2.0
    return [first + index * thickness_mm for index in range(n_slices)]


def render_slice(
    phantom: Phantom,
    stones: list[Stone],
    z_mm: float,
    profile: SiteProfile,
    rng: np.random.Generator,
) -> np.ndarray:
    """Return one acquired slice in HU: anatomy, stones, scanner blur and correlated noise.

    Args:
        phantom: the patient's phantom on the site's grid.
        stones: the patient's stones (may be empty).
        z_mm: slice centre.
        profile: the site's noise, blur and thickness.
        rng: source of the noise.

    Returns:
        float32 (H, W) HU.
    """
    hu = phantom.render(z_mm)
    hu = add_stones(hu, phantom.grid, stones, z_mm, profile.slice_thickness_mm)
    if profile.blur_sigma_px > 0:
        hu = cv2.GaussianBlur(hu, (0, 0), profile.blur_sigma_px, borderType=cv2.BORDER_REPLICATE)

    # CT noise is spatially correlated by the reconstruction kernel: smooth white noise a
    # little, then rescale it to the site's standard deviation.
    white = rng.standard_normal(hu.shape).astype(np.float32)
    noise = cv2.GaussianBlur(white, (0, 0), 0.5)
    noise *= np.float32(profile.noise_hu / max(float(noise.std()), 1e-6))
    return hu + noise


@dataclass(frozen=True)
class _SeriesInfo:
    site_id: str
    patient_id: str
    seed: int
    grid: SliceGrid
    thickness_mm: float
    n_slices: int


def _uid(info: _SeriesInfo, kind: str, index: int = 0) -> str:
    entropy = f"nephrolith-synth|{info.seed}|{info.site_id}|{info.patient_id}|{kind}|{index}"
    return generate_uid(entropy_srcs=[entropy])


def _ct_dataset(hu: np.ndarray, info: _SeriesInfo, z_mm: float, instance: int) -> Dataset:
    """Build a CT Image Storage dataset for one slice, int16 with RescaleIntercept -1024.

    Instance 1 is the most superior slice, as in a cranio-caudal scan. Dates and UIDs derive
    from fixed strings and the seed, so the same seed writes the same bytes.
    """
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = _uid(info, "sop", instance)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = _uid(info, "study")
    ds.SeriesInstanceUID = _uid(info, "series")
    ds.FrameOfReferenceUID = _uid(info, "frame")
    ds.Modality = "CT"
    ds.PatientID = info.patient_id
    ds.PatientName = f"Synthetic^{info.patient_id}"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20240101"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.Manufacturer = "nephrolith synthetic phantom"
    ds.InstitutionName = info.site_id
    ds.SeriesDescription = "synthetic non-contrast abdomen"
    ds.BodyPartExamined = "ABDOMEN"
    ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
    ds.KVP = 120
    ds.SeriesNumber = 1
    ds.InstanceNumber = instance

    # Geometry: LPS patient coordinates, rows along +y (posterior), columns along +x (left).
    half_w = (info.grid.cols - 1) / 2.0 * info.grid.spacing_mm
    half_h = (info.grid.rows - 1) / 2.0 * info.grid.spacing_mm
    ds.ImagePositionPatient = [round(-half_w, 4), round(-half_h, 4), round(z_mm, 4)]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [info.grid.spacing_mm, info.grid.spacing_mm]
    ds.SliceThickness = info.thickness_mm
    ds.SpacingBetweenSlices = info.thickness_mm
    ds.SliceLocation = round(z_mm, 4)

    # Pixels: stored = HU - intercept, signed 16-bit so noise below -1024 HU survives.
    stored = np.clip(np.rint(hu - RESCALE_INTERCEPT), -32768, 32767).astype(np.int16)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = RESCALE_INTERCEPT
    ds.RescaleSlope = 1
    ds.RescaleType = "HU"
    ds.WindowCenter = 40
    ds.WindowWidth = 400
    ds.PixelData = stored.tobytes()
    return ds


def _stone_counts(n_patients: int, prevalence: float, rng: np.random.Generator) -> list[int]:
    # A fixed share of stone patients (at least one of each kind when n >= 2) keeps every
    # site usable for training and for AUC, which a coin flip per patient would not.
    n_stone = round(prevalence * n_patients)
    if n_patients >= 2:
        n_stone = min(max(n_stone, 1), n_patients - 1)
    has_stone = np.zeros(n_patients, dtype=bool)
    has_stone[rng.permutation(n_patients)[:n_stone]] = True
    return [int(rng.choice([1, 2, 3], p=STONES_PER_PATIENT_P)) if s else 0 for s in has_stone]


def _write_patient(
    out_dir: Path,
    info: _SeriesInfo,
    profile: SiteProfile,
    n_stones: int,
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    rng = np.random.default_rng(_seed_sequence(info.seed, info.site_id, info.patient_id))
    anatomy = sample_anatomy(rng)
    z_positions = slice_positions(info.n_slices, info.thickness_mm, rng.uniform(-4.0, 4.0))
    stones = sample_stones(anatomy, rng, z_positions, info.thickness_mm, n_stones)
    phantom = Phantom(anatomy, info.grid)
    series_dir = out_dir / info.patient_id
    series_dir.mkdir(parents=True, exist_ok=True)

    manifest_rows, stone_rows = [], []
    for index, z_mm in enumerate(z_positions):
        instance = info.n_slices - index
        rel_path = f"{info.patient_id}/slice_{instance:03d}.dcm"
        hu = render_slice(phantom, stones, z_mm, profile, rng)
        _ct_dataset(hu, info, z_mm, instance).save_as(out_dir / rel_path, enforce_file_format=True)

        visible = [
            (k, s) for k, s in enumerate(stones) if stone_visible(s, z_mm, info.thickness_mm)
        ]
        manifest_rows.append(
            {
                "path": rel_path,
                "label": "stone" if visible else "no_stone",
                "patient_id": info.patient_id,
                "split": "",
                "site": info.site_id,
            }
        )
        for number, stone in visible:
            row, col = info.grid.to_pixel(stone.x, stone.y)
            stone_rows.append(
                {
                    "path": rel_path,
                    "patient_id": info.patient_id,
                    "stone_id": f"{info.patient_id}-S{number + 1}",
                    "row": f"{row:.2f}",
                    "col": f"{col:.2f}",
                    "diameter_mm": f"{stone.diameter_mm:.2f}",
                    "hu": f"{stone.hu:.1f}",
                }
            )
    return manifest_rows, stone_rows


def _write_csv(path: Path, columns: tuple[str, ...], rows: list[dict[str, str]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def generate_site(
    out_dir: Path | str,
    site_id: str,
    n_patients: int,
    slices_per_patient: int | tuple[int, int] = (8, 12),
    seed: int = 0,
    image_size: int = 256,
    noise_hu: float = 15.0,
    blur_sigma: float = 0.5,
    pixel_spacing_mm: float | None = None,
    slice_thickness_mm: float = 3.0,
    stone_prevalence: float = 0.5,
) -> Path:
    """Write one synthetic hospital: a DICOM series per patient, manifest.csv and stones.csv.

    Files: out_dir/<site_id>-P###/slice_###.dcm (one CT slice each, numbered by
    InstanceNumber), out_dir/manifest.csv with path,label,patient_id,split,site (split left
    empty, path relative to out_dir, label "stone" when stone_visible holds for any stone) and
    out_dir/stones.csv with one row per labelled slice and stone (row and col are the stone
    centre in pixels). The same arguments write the same files.

    Args:
        out_dir: folder to create or fill.
        site_id: hospital name, e.g. "SITE-A"; PatientIDs read "<site_id>-P003".
        n_patients: patients (series) to write, >= 1.
        slices_per_patient: slices per series, or an inclusive (min, max) range to draw from.
        seed: master seed.
        image_size: rows and columns of each slice.
        noise_hu: noise standard deviation in HU.
        blur_sigma: in-plane point spread function sigma in pixels.
        pixel_spacing_mm: pixel side; None means DEFAULT_FOV_MM / image_size.
        slice_thickness_mm: slice thickness and slice distance.
        stone_prevalence: fraction of patients with 1 to 3 stones.

    Returns:
        out_dir as a Path.

    Raises:
        ValueError: on out-of-range arguments.
    """
    low, high = (
        (slices_per_patient,) * 2 if isinstance(slices_per_patient, int) else slices_per_patient
    )
    if n_patients < 1 or low < 1 or high < low or not 32 <= image_size <= 1024:
        raise ValueError(
            f"generate_site: expected n_patients >= 1, 1 <= slices min <= max and image_size "
            f"32..1024, got {n_patients}, {slices_per_patient} and {image_size}"
        )
    if not 0.0 <= stone_prevalence <= 1.0 or noise_hu < 0 or slice_thickness_mm <= 0:
        raise ValueError(
            f"generate_site: expected stone_prevalence 0..1, noise_hu >= 0 and thickness > 0, got "
            f"{stone_prevalence}, {noise_hu} and {slice_thickness_mm}"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    spacing = pixel_spacing_mm if pixel_spacing_mm is not None else DEFAULT_FOV_MM / image_size

    # DICOM decimal strings (DS) hold at most 16 characters, so round before writing.
    spacing = round(spacing, 6)
    slice_thickness_mm = round(slice_thickness_mm, 6)
    profile = SiteProfile(
        site_id, noise_hu, blur_sigma, spacing, slice_thickness_mm, stone_prevalence
    )
    grid = SliceGrid(image_size, image_size, spacing)
    rng = np.random.default_rng(_seed_sequence(seed, site_id, "site"))
    stone_counts = _stone_counts(n_patients, stone_prevalence, rng)

    manifest_rows, stone_rows = [], []
    for number, n_stones in enumerate(stone_counts, start=1):
        info = _SeriesInfo(
            site_id,
            f"{site_id}-P{number:03d}",
            seed,
            grid,
            slice_thickness_mm,
            int(rng.integers(low, high + 1)),
        )
        patient_manifest, patient_stones = _write_patient(out_dir, info, profile, n_stones)
        manifest_rows += patient_manifest
        stone_rows += patient_stones

    _write_csv(out_dir / "manifest.csv", MANIFEST_COLUMNS, manifest_rows)
    _write_csv(out_dir / "stones.csv", STONES_COLUMNS, stone_rows)
    n_positive = sum(row["label"] == "stone" for row in manifest_rows)
    logger.info(
        "synthetic site %s: %d patients, %d slices (%d stone), %d stones",
        site_id,
        n_patients,
        len(manifest_rows),
        n_positive,
        sum(stone_counts),
    )
    return out_dir


def generate_federation(
    out_dir: Path | str,
    n_sites: int = 3,
    patients_per_site: int = 12,
    seed: int = 0,
    slices_per_patient: int | tuple[int, int] = (8, 12),
    image_size: int = 256,
) -> list[Path]:
    """Write n_sites heterogeneous synthetic hospitals into out_dir/<site_id>.

    The first three sites use DEFAULT_SITES; further sites draw noise, blur, spacing,
    thickness and prevalence from the seed.

    Returns:
        the site folders, in site order.
    """
    if n_sites < 1:
        raise ValueError(f"generate_federation: expected n_sites >= 1, got {n_sites}")
    rng = np.random.default_rng(_seed_sequence(seed, "federation"))
    profiles = list(DEFAULT_SITES[:n_sites])
    for index in range(len(profiles), n_sites):
        profiles.append(
            SiteProfile(
                f"SITE-{index + 1:02d}",
                noise_hu=float(rng.uniform(10.0, 25.0)),
                blur_sigma_px=float(rng.uniform(0.3, 0.9)),
                pixel_spacing_mm=float(rng.uniform(1.3, 1.7)),
                slice_thickness_mm=float(rng.choice([2.5, 3.0, 5.0])),
                stone_prevalence=float(rng.uniform(0.3, 0.6)),
            )
        )
    # Profiles are written for 256-px slices. Other sizes keep the field of view and the PSF in mm.
    scale = 256.0 / image_size
    folders = []
    for profile in profiles:
        folders.append(
            generate_site(
                Path(out_dir) / profile.site_id,
                profile.site_id,
                patients_per_site,
                slices_per_patient,
                seed,
                image_size,
                profile.noise_hu,
                profile.blur_sigma_px / scale,
                (profile.pixel_spacing_mm or DEFAULT_FOV_MM / 256.0) * scale,
                profile.slice_thickness_mm,
                profile.stone_prevalence,
            )
        )
    return folders


__all__ = [
    "DEFAULT_SITES",
    "SiteProfile",
    "generate_federation",
    "generate_site",
    "render_slice",
    "slice_positions",
]
