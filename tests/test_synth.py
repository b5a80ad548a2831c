"""Tests of the synthetic CT hospitals: DICOM content, stones, labels, reproducibility, sites."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.pixels import apply_rescale

from nephrolith.common import synth
from nephrolith.common.synth_anatomy import Phantom, SliceGrid, sample_anatomy
from nephrolith.common.synth_stones import (
    Stone,
    add_stones,
    sample_stones,
    stone_fill,
    stone_visible,
)

SMALL = {"n_patients": 4, "slices_per_patient": 5, "image_size": 96}


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def read_hu(path: Path) -> np.ndarray:
    """Read a slice with pydicom and convert it to HU as stored * slope + intercept."""
    ds = pydicom.dcmread(path)
    return ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small site with every patient holding stones, so labels and stones.csv are rich."""
    out = tmp_path_factory.mktemp("site")
    return synth.generate_site(
        out,
        "SITE-T",
        n_patients=5,
        slices_per_patient=(6, 9),
        seed=3,
        image_size=256,
        noise_hu=10.0,
        blur_sigma=0.4,
        slice_thickness_mm=3.0,
        stone_prevalence=0.8,
    )


# --- partial volume and labelling rules, by hand ------------------------------------------


def test_stone_fill_hand_values() -> None:
    stone = Stone(0.0, 0.0, 10.0, diameter_mm=10.0, hu=1000.0, side="left")
    radial = np.array([0.0, 3.0, 4.0, 6.0])

    # Slice at z = 14, T = 3: slab 12.5..15.5. At rho = 0 the stone spans 5..15, overlap 2.5.
    # At rho = 3 it spans 6..14 (overlap 1.5), at rho = 4 it spans 7..13 (overlap 0.5).
    fill = stone_fill(stone, radial, 14.0, 3.0)

    np.testing.assert_allclose(fill, [2.5 / 3.0, 1.5 / 3.0, 0.5 / 3.0, 0.0], atol=1e-9)


def test_stone_visible_large_stone_span() -> None:
    stone = Stone(0.0, 0.0, 0.0, diameter_mm=10.0, hu=800.0, side="right")

    assert stone_visible(stone, 4.9, 3.0)
    assert not stone_visible(stone, 5.1, 3.0)


def test_stone_visible_small_stone_thick_slice() -> None:
    stone = Stone(0.0, 0.0, 0.0, diameter_mm=2.0, hu=800.0, side="right")

    # T = 5: needs >= 1 mm of the 2 mm stone in the slab 'offset +- 2.5'.
    assert stone_visible(stone, 0.0, 5.0)
    assert stone_visible(stone, 2.0, 5.0)  # overlap -0.5..1 = 1.5 mm
    assert not stone_visible(stone, 3.2, 5.0)  # overlap 0.7..1 = 0.3 mm


def test_sampled_stones_each_labelled_somewhere() -> None:
    for seed in range(40):
        rng = np.random.default_rng(seed)
        anatomy = sample_anatomy(rng)
        thickness = float(rng.choice([1.0, 2.5, 3.0, 5.0]))
        z_positions = synth.slice_positions(int(rng.integers(3, 14)), thickness, 0.0)

        stones = sample_stones(anatomy, rng, z_positions, thickness, 3)

        for stone in stones:
            assert any(stone_visible(stone, z, thickness) for z in z_positions), (seed, stone)
            kidney = anatomy.kidneys[0 if stone.side == "right" else 1].body
            assert kidney.mask(np.array([[stone.x]]), np.array([[stone.y]]), stone.z)[0, 0]


def test_add_stones_keeps_pixels_far_away() -> None:
    grid = SliceGrid(32, 32, 1.0)
    flat = np.full((32, 32), 30.0, dtype=np.float32)
    stone = Stone(0.5, 0.5, 0.0, diameter_mm=6.0, hu=1030.0, side="left")

    out = add_stones(flat, grid, [stone], 0.0, 2.0)

    # Pixel (16, 16) has its centre 0.5 mm from the stone centre: fully inside, 1030 HU.
    assert out[16, 16] == pytest.approx(1030.0, abs=1e-3)
    assert out[0, 0] == 30.0
    assert np.all(out <= 1030.0 + 1e-3)


# --- rendered stones ----------------------------------------------------------------------


def kidney_stone_slice(diameter_mm: float, hu: float, noise_hu: float, seed: int = 0):
    """Render one slice through a stone at the centre of the left renal sinus."""
    anatomy = sample_anatomy(np.random.default_rng(seed))
    grid = SliceGrid(256, 256, 1.4)
    sinus = anatomy.kidneys[1].sinus
    stone = Stone(sinus.x, sinus.y, sinus.z, diameter_mm, hu, "left")
    profile = synth.SiteProfile(
        "SITE-T", noise_hu=noise_hu, blur_sigma_px=0.8, pixel_spacing_mm=1.4, slice_thickness_mm=3.0
    )
    phantom = Phantom(anatomy, grid)
    slice_hu = synth.render_slice(phantom, [stone], sinus.z, profile, np.random.default_rng(1))
    row, col = grid.to_pixel(stone.x, stone.y)
    return slice_hu, round(row), round(col)


@pytest.mark.parametrize("hu", [300.0, 1000.0, 1600.0])
def test_large_stone_centre_keeps_hu(hu: float) -> None:
    slice_hu, row, col = kidney_stone_slice(10.0, hu, noise_hu=15.0)

    # A 10 mm stone fills the 3 mm slab within 4.7 mm of its axis, and a 0.8-px blur of a
    # 3.6-px radius disc leaves its centre unchanged. Only noise remains: the 3 x 3 mean has
    # an std well under 15 HU even with correlated noise.
    centre = slice_hu[row - 1 : row + 2, col - 1 : col + 2].mean()
    assert abs(centre - hu) < 3 * 15.0


def test_small_stone_partial_volume_lowers_peak() -> None:
    slice_hu, row, col = kidney_stone_slice(2.0, 1200.0, noise_hu=0.0)
    background, _, _ = kidney_stone_slice(2.0, -20.0, noise_hu=0.0)

    # A 2 mm sphere fills at most 2/3 of a 3 mm slab and less than a 1.4 mm pixel after blur.
    peak = slice_hu[row - 2 : row + 3, col - 2 : col + 3].max()
    assert peak < background[row, col] + (2.0 / 3.0) * (1200.0 - background[row, col])
    assert peak > background[row, col] + 100.0


def test_anatomy_tissue_values() -> None:
    anatomy = sample_anatomy(np.random.default_rng(5))
    grid = SliceGrid(256, 256, 1.4)
    hu = Phantom(anatomy, grid).render(0.0)
    kidney = anatomy.kidneys[0].body
    kidney_row, kidney_col = grid.to_pixel(
        kidney.x + 0.8 * kidney.rx * math.cos(math.radians(kidney.angle_deg)),
        kidney.y + 0.8 * kidney.rx * math.sin(math.radians(kidney.angle_deg)),
    )
    fat_row, fat_col = grid.to_pixel(0.0, anatomy.body.y - anatomy.body.ry + 3.0)

    assert hu[0, 0] == -1000.0
    assert -130.0 < hu[round(fat_row), round(fat_col)] < -70.0
    assert 15.0 < hu[round(kidney_row), round(kidney_col)] < 50.0
    assert hu.max() > 700.0  # cortical bone of the spine or ribs


# --- written files ------------------------------------------------------------------------


def test_dicom_reads_back_as_hu(site: Path) -> None:
    manifest = read_csv(site / "manifest.csv")
    path = site / manifest[0]["path"]
    ds = pydicom.dcmread(path)

    assert ds.Modality == "CT"
    assert float(ds.RescaleIntercept) == -1024.0
    assert float(ds.RescaleSlope) == 1.0
    assert ds.pixel_array.dtype == np.int16
    np.testing.assert_array_equal(apply_rescale(ds.pixel_array, ds), ds.pixel_array - 1024.0)
    air = read_hu(path)[:20, :20]
    assert abs(air.mean() - (-1000.0)) < 5.0
    assert ds.PatientID == manifest[0]["patient_id"]
    assert ds.PatientID.startswith("SITE-T-P")
    assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    assert float(ds.PixelSpacing[0]) == pytest.approx(360.0 / 256)


def test_series_geometry_and_uids(site: Path) -> None:
    manifest = read_csv(site / "manifest.csv")
    patient = manifest[0]["patient_id"]
    datasets = [
        pydicom.dcmread(site / row["path"]) for row in manifest if row["patient_id"] == patient
    ]
    datasets.sort(key=lambda ds: int(ds.InstanceNumber))
    z = [float(ds.ImagePositionPatient[2]) for ds in datasets]

    # Instance 1 is the most superior slice, and slices are contiguous.
    np.testing.assert_allclose(np.diff(z), -3.0, atol=1e-3)
    assert len({ds.SeriesInstanceUID for ds in datasets}) == 1
    assert len({ds.SOPInstanceUID for ds in datasets}) == len(datasets)
    assert all(float(ds.SliceThickness) == 3.0 for ds in datasets)


def test_manifest_columns_and_split_empty(site: Path) -> None:
    with (site / "manifest.csv").open(encoding="utf-8") as handle:
        header = handle.readline().strip()
    rows = read_csv(site / "manifest.csv")

    assert header == "path,label,patient_id,split,site"
    assert {row["label"] for row in rows} == {"stone", "no_stone"}
    assert {row["split"] for row in rows} == {""}
    assert {row["site"] for row in rows} == {"SITE-T"}
    assert all((site / row["path"]).is_file() for row in rows)


def test_labels_match_stones_csv(site: Path) -> None:
    manifest = read_csv(site / "manifest.csv")
    stones = read_csv(site / "stones.csv")
    positive = {row["path"] for row in manifest if row["label"] == "stone"}
    patients_with_stones = {row["patient_id"] for row in stones}

    assert positive == {row["path"] for row in stones}
    # 0.8 of 5 patients -> 4 patients with stones, each shown on at least one slice.
    assert len(patients_with_stones) == 4
    for row in stones:
        assert 2.0 <= float(row["diameter_mm"]) <= 10.0
        assert 300.0 <= float(row["hu"]) <= 1600.0


def test_large_stones_visible_at_recorded_pixel(site: Path) -> None:
    stones = read_csv(site / "stones.csv")
    large = [row for row in stones if float(row["diameter_mm"]) >= 6.0]
    assert large, "seed 3 should give at least one stone of 6 mm or more"

    for row in large:
        hu = read_hu(site / row["path"])
        r, c = round(float(row["row"])), round(float(row["col"]))
        # On a labelled slice the stone fills >= half the slab on its axis. Averaged over the
        # nearest 1.4 mm pixel, that is still >= 0.35 of the stone over a background >= -20 HU.
        assert hu[r - 1 : r + 2, c - 1 : c + 2].max() > 0.3 * float(row["hu"]), row


def test_generate_site_reproducible(tmp_path: Path) -> None:
    first = synth.generate_site(tmp_path / "one", "SITE-R", seed=11, **SMALL)
    second = synth.generate_site(tmp_path / "two", "SITE-R", seed=11, **SMALL)
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())

    assert files == sorted(p.relative_to(second) for p in second.rglob("*") if p.is_file())
    for relative in files:
        assert (first / relative).read_bytes() == (second / relative).read_bytes(), relative


def test_generate_site_seed_changes_pixels(tmp_path: Path) -> None:
    first = synth.generate_site(tmp_path / "one", "SITE-R", seed=11, **SMALL)
    second = synth.generate_site(tmp_path / "two", "SITE-R", seed=12, **SMALL)
    path = read_csv(first / "manifest.csv")[0]["path"]

    assert not np.array_equal(read_hu(first / path), read_hu(second / path))


def test_generate_site_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="n_patients"):
        synth.generate_site(tmp_path, "SITE-X", n_patients=0)
    with pytest.raises(ValueError, match="stone_prevalence"):
        synth.generate_site(tmp_path, "SITE-X", n_patients=2, stone_prevalence=1.5)


def test_federation_sites_differ_in_noise(tmp_path: Path) -> None:
    folders = synth.generate_federation(
        tmp_path, n_sites=3, patients_per_site=2, slices_per_patient=2, image_size=128
    )
    measured = {}
    for folder in folders:
        hu = read_hu(folder / read_csv(folder / "manifest.csv")[0]["path"])
        corners = [hu[:20, :20], hu[:20, -20:], hu[-20:, :20], hu[-20:, -20:]]
        measured[folder.name] = float(np.mean([corner.std() for corner in corners]))

    assert [f.name for f in folders] == ["SITE-A", "SITE-B", "SITE-C"]
    for profile in synth.DEFAULT_SITES:
        assert measured[profile.site_id] == pytest.approx(profile.noise_hu, rel=0.2)
    assert measured["SITE-A"] < measured["SITE-C"] < measured["SITE-B"]


def test_federation_extra_sites_drawn(tmp_path: Path) -> None:
    folders = synth.generate_federation(
        tmp_path, n_sites=4, patients_per_site=1, slices_per_patient=1, image_size=64
    )

    assert folders[3].name == "SITE-04"
    ds = pydicom.dcmread(next(folders[3].rglob("*.dcm")))
    # Drawn spacing 1.3..1.7 mm at 256 px, scaled by 256 / 64 to keep the field of view.
    assert 1.3 * 4 <= float(ds.PixelSpacing[0]) <= 1.7 * 4
