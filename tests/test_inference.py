"""Predictor and stone candidate tests on a tiny random-init checkpoint and real CT."""

from __future__ import annotations

import numpy as np
import pytest
from api_support import make_checkpoint

from nephrolith.client.candidates import CandidateSettings, find_candidates
from nephrolith.client.inference import Predictor, heat_to_image_grid
from nephrolith.common import dip
from nephrolith.common.config import PreprocessConfig
from nephrolith.common.errors import ModelError
from nephrolith.common.image import CTImage
from nephrolith.common.io import read_image


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"), threshold=0.5)


@pytest.fixture(scope="module")
def predictor(checkpoint):
    return Predictor.from_checkpoint(checkpoint, batch_size=4)


# --- stone candidates, expected values computed by hand ---------------------------------


def test_candidates_volume_blob_hand_computed():
    hu = np.full((6, 20, 20), 40.0)
    hu[1:4, 5:8, 10:12] = 800.0  # 3 slices x 3 rows x 2 cols = 18 voxels
    hu[2, 6, 10] = 1200.0
    heat = np.zeros_like(hu)
    heat[:, 2:12, 6:16] = 0.9

    found = find_candidates(heat, CandidateSettings(), hu=hu, spacing_mm=(2.0, 0.5, 0.5))

    assert len(found) == 1
    stone = found[0]
    assert stone.kind == "hu"
    assert stone.voxels == 18
    assert stone.slice == 2
    assert stone.slice_range == (1, 3)
    assert stone.row == pytest.approx(6.0)
    assert stone.col == pytest.approx(10.5)
    assert stone.bbox == (5, 10, 7, 11)
    # Extents: 3 slices x 2 mm = 6 mm, 3 rows x 0.5 = 1.5 mm, 2 cols x 0.5 = 1 mm.
    assert stone.size_mm == pytest.approx(6.0)
    assert stone.volume_mm3 == pytest.approx(18 * 2.0 * 0.5 * 0.5)
    assert stone.peak_hu == pytest.approx(1200.0)
    assert stone.mean_hu == pytest.approx((17 * 800.0 + 1200.0) / 18)
    assert stone.heat == pytest.approx(0.9, abs=1e-3)


def test_candidates_skip_cold_and_large_dense_regions():
    hu = np.full((4, 100, 100), 40.0)
    hu[1:3, 10:13, 10:13] = 600.0  # small stone inside the heat
    hu[0:4, 40:100, 40:100] = 700.0  # 60 x 60 px = 60 mm at 1 mm: bone-sized, dropped
    hu[1, 5:7, 90:92] = 900.0  # dense but outside the high-heat region
    heat = np.zeros_like(hu)
    heat[:, 0:90, 0:89] = 0.8

    found = find_candidates(heat, CandidateSettings(max_stone_mm=30.0), hu=hu, spacing_mm=(1, 1, 1))

    assert [c.bbox for c in found] == [(10, 10, 12, 12)]


def test_candidates_below_hu_threshold_ignored():
    hu = np.full((30, 30), 40.0)
    hu[10:12, 10:12] = 250.0
    heat = np.ones_like(hu)

    assert (
        find_candidates(heat, CandidateSettings(stone_hu_min=300.0), hu=hu, spacing_mm=(1, 1)) == []
    )
    found = find_candidates(heat, CandidateSettings(stone_hu_min=200.0), hu=hu, spacing_mm=(1, 1))
    assert len(found) == 1
    assert found[0].size_mm == pytest.approx(2.0)
    assert found[0].volume_mm3 is None  # no slice thickness for a single slice


def test_candidates_heatmap_regions_for_display_images():
    heat = np.zeros((50, 60))
    heat[5:10, 5:15] = 0.7
    heat[30:40, 40:50] = 1.0

    found = find_candidates(heat, CandidateSettings(heat_threshold=0.5), hu=None, spacing_mm=None)

    assert [c.kind for c in found] == ["heatmap", "heatmap"]
    assert found[0].bbox == (30, 40, 39, 49)  # hottest first
    assert found[0].voxels == 100
    assert found[1].voxels == 50
    assert found[0].size_mm is None
    assert found[0].peak_hu is None


def test_candidates_capped_at_max_candidates():
    heat = np.zeros((40, 40))
    for i in range(8):
        heat[i * 5, 0] = 0.6 + i * 0.01

    found = find_candidates(heat, CandidateSettings(max_candidates=3))

    assert len(found) == 3
    assert found[0].heat == pytest.approx(0.67)


def test_candidates_shape_mismatch_raises():
    with pytest.raises(ValueError, match="differs from heat shape"):
        find_candidates(np.zeros((4, 4)), CandidateSettings(), hu=np.zeros((4, 5)))


# --- heatmap geometry: the inverse of dip.resize_square ---------------------------------


@pytest.mark.parametrize(
    ("height", "width", "keep_aspect"), [(40, 80, True), (90, 30, True), (40, 80, False)]
)
def test_heat_geometry_inverts_resize_square(height, width, keep_aspect):
    rows, cols = np.mgrid[0:height, 0:width]
    heat = np.exp(
        -(
            ((rows - 0.3 * height) / (0.2 * height)) ** 2
            + ((cols - 0.6 * width) / (0.2 * width)) ** 2
        )
    )
    cfg = PreprocessConfig(image_size=64, keep_aspect=keep_aspect)

    square = dip.resize_square(heat, 64, keep_aspect=keep_aspect)
    back = heat_to_image_grid(square, height, width, cfg)

    assert back.shape == (height, width)
    assert np.abs(back - heat).max() < 0.1
    assert np.unravel_index(back.argmax(), back.shape) == pytest.approx(
        np.unravel_index(heat.argmax(), heat.shape), abs=2
    )


# --- Predictor against the reference forward pass ---------------------------------------


def test_predict_slice_matches_reference_forward(predictor, islam_subset):
    from nephrolith.common.training import predict_probs

    ct = read_image(islam_subset / "images" / "Stone" / "Stone- (1).jpg")
    expected = predict_probs(predictor.model, dip.preprocess_image(ct, predictor.preprocess))[0]

    result = predictor.predict_slice(ct)

    assert result.probability == pytest.approx(float(expected), abs=1e-5)
    assert result.label == ("stone" if expected >= 0.5 else "no_stone")
    assert result.heatmap.shape == ct.pixels.shape
    assert result.display.dtype == np.uint8
    assert result.display.shape == ct.pixels.shape


def test_predict_study_scores_and_max_rule(predictor, volume_samples):
    from nephrolith.common.training import predict_probs

    ct = read_image(volume_samples / "example_ct_sm.nii.gz")
    expected = predict_probs(predictor.model, dip.preprocess_image(ct, predictor.preprocess))

    result = predictor.predict_study(ct, top_k=4)

    np.testing.assert_allclose(result.slice_scores, expected, atol=1e-5)
    assert result.score == pytest.approx(float(expected.max()), abs=1e-5)
    assert result.verdict == ("stone" if result.score >= predictor.threshold else "no_stone")
    assert result.top_slices == [
        int(i) for i in np.argsort(-result.slice_scores, kind="stable")[:4]
    ]
    assert set(result.heatmaps) == set(result.top_slices)
    assert result.heatmaps[result.top_slices[0]].shape == ct.pixels.shape[1:]


def test_predict_study_candidates_only_from_positive_slices(checkpoint, volume_samples):
    from nephrolith.common import weights

    model, metadata = weights.load_checkpoint(checkpoint)
    ct = read_image(volume_samples / "example_ct_sm.nii.gz")

    never = Predictor(model, {**metadata, "threshold": 1.0}).predict_study(ct)
    always = Predictor(model, {**metadata, "threshold": 0.0}).predict_study(ct)

    assert never.verdict == "no_stone"
    assert never.candidates == []
    assert always.verdict == "stone"
    for candidate in always.candidates:
        assert candidate.kind == "hu"
        assert candidate.peak_hu >= 300.0
        assert candidate.size_mm <= 30.0


def test_predict_slice_rejects_volume(predictor):
    volume = CTImage(np.zeros((2, 8, 8), np.float32), True, (1.0, 1.0, 1.0), "nifti", "x")
    with pytest.raises(ValueError, match="expected a 2-D slice"):
        predictor.predict_slice(volume)


def test_predictor_rejects_size_mismatch(predictor):
    metadata = {
        **predictor.metadata,
        "preprocess": {**predictor.metadata["preprocess"], "image_size": 96},
    }
    with pytest.raises(ModelError, match="image_size 96"):
        Predictor(predictor.model, metadata)


def test_predictor_rejects_bad_threshold(predictor):
    with pytest.raises(ModelError, match="threshold"):
        Predictor(predictor.model, {**predictor.metadata, "threshold": 1.5})


def test_model_id_tracks_metadata(predictor):
    other = Predictor(predictor.model, {**predictor.metadata, "threshold": 0.3})

    assert predictor.model_id.startswith("sha256:")
    assert other.model_id != predictor.model_id
    assert Predictor(predictor.model, dict(predictor.metadata)).model_id == predictor.model_id
