"""Inference API through the Flask test client: every endpoint and every error class."""

from __future__ import annotations

import base64
import gzip
import io
import logging
import struct
import tempfile
import zipfile
import zlib
from pathlib import Path

import cv2
import nibabel as nib
import numpy as np
import pytest
from api_support import (
    PATIENT_ID,
    PATIENT_NAME,
    file_field,
    make_checkpoint,
    phantom_slice,
    write_dicom,
)

from nephrolith.client.api import ApiConfig, create_app
from nephrolith.client.inference import Predictor

STONE_JPG = ("images", "Stone", "Stone- (1).jpg")
NORMAL_JPG = ("images", "Normal", "Normal- (1).jpg")


@pytest.fixture(scope="module")
def predictor(tmp_path_factory):
    return Predictor.from_checkpoint(
        make_checkpoint(tmp_path_factory.mktemp("ckpt"), threshold=0.5)
    )


@pytest.fixture(scope="module")
def client(predictor):
    return create_app(predictor, ApiConfig()).test_client()


@pytest.fixture(scope="module")
def stone_client(predictor):
    """App with threshold 0: every upload is called "stone", so candidates are searched."""
    always = Predictor(predictor.model, {**predictor.metadata, "threshold": 0.0})
    return create_app(always, ApiConfig()).test_client()


@pytest.fixture(scope="module")
def dicom_bytes(tmp_path_factory):
    path = write_dicom(tmp_path_factory.mktemp("dcm") / "slice.dcm", phantom_slice())
    return path.read_bytes()


def post(client, url, content, filename="upload.bin"):
    return client.post(url, data=file_field(content, filename), content_type="multipart/form-data")


def zip_bytes(members: dict[str, bytes], symlinks: tuple[str, ...] = ()) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, content in members.items():
            archive.writestr(name, content)
        for name in symlinks:
            info = zipfile.ZipInfo(name)
            info.external_attr = 0o120777 << 16
            archive.writestr(info, "/etc/passwd")
    return buffer.getvalue()


def decode_png(encoded: str) -> np.ndarray:
    raw = np.frombuffer(base64.b64decode(encoded), dtype=np.uint8)
    return cv2.imdecode(raw, cv2.IMREAD_UNCHANGED)


def assert_error(response, status, *fragments):
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.is_json
    message = response.json["error"]
    for fragment in fragments:
        assert fragment in message
    # Server-side temporary paths never reach the client.
    assert "nephrolith-upload-" not in message
    return message


# --- healthy endpoints -------------------------------------------------------------------


def test_healthz(client, predictor):
    response = client.get("/healthz")

    assert response.status_code == 200
    assert response.json["status"] == "ok"
    assert response.json["model_id"] == predictor.model_id


def test_model_info(client, predictor):
    info = client.get("/v1/model").json

    assert info["model_id"] == predictor.model_id
    assert info["class_names"] == ["no_stone", "stone"]
    assert info["threshold"] == 0.5
    assert info["preprocess"]["image_size"] == 64
    assert info["architecture"]["backbone_source"] == "compact"
    assert info["provenance"] == {"trained_on": "nothing (random init, test checkpoint)"}
    assert info["study_aggregation"] == "max"


def test_predict_real_jpeg_with_heatmap(client, predictor, islam_subset):
    from nephrolith.common import dip
    from nephrolith.common.io import read_image
    from nephrolith.common.training import predict_probs

    path = islam_subset.joinpath(*STONE_JPG)
    expected = predict_probs(
        predictor.model, dip.preprocess_image(read_image(path), predictor.preprocess)
    )[0]

    response = post(client, "/v1/predict?heatmap=1", path.read_bytes(), "Stone- (1).jpg")

    assert response.status_code == 200, response.json
    body = response.json
    assert body["probability"] == pytest.approx(float(expected), abs=1e-5)
    assert body["label"] == ("stone" if expected >= 0.5 else "no_stone")
    assert body["threshold"] == 0.5
    assert body["model_id"] == predictor.model_id
    assert body["input"] == {
        "kind": "jpeg",
        "is_hu": False,
        "shape": [256, 256],
        "spacing_mm": None,
    }
    assert decode_png(body["heatmap_png"]).shape == (256, 256, 3)
    assert response.headers["X-Request-ID"] == body["request_id"]


def test_predict_without_heatmap_flag(client, islam_subset):
    body = post(client, "/v1/predict", islam_subset.joinpath(*NORMAL_JPG).read_bytes()).json

    assert "heatmap_png" not in body
    assert 0.0 <= body["probability"] <= 1.0


def test_predict_png_slice(client, islam_subset):
    grey = cv2.imread(str(islam_subset.joinpath(*NORMAL_JPG)), cv2.IMREAD_GRAYSCALE)
    ok, png = cv2.imencode(".png", grey)
    assert ok

    body = post(client, "/v1/predict", png.tobytes()).json

    assert body["input"]["kind"] == "png"
    assert body["input"]["shape"] == [256, 256]


def test_predict_dicom_slice_with_candidates(stone_client, dicom_bytes):
    response = post(stone_client, "/v1/predict?heatmap=1", dicom_bytes)

    assert response.status_code == 200, response.json
    body = response.json
    assert body["label"] == "stone"
    assert body["input"]["is_hu"] is True
    assert body["input"]["spacing_mm"] == [0.7, 0.7]
    assert decode_png(body["heatmap_png"]).shape == (96, 96, 3)
    for candidate in body["candidates"]:
        assert candidate["kind"] == "hu"
        assert candidate["peak_hu"] >= 300.0
        rows = candidate["bbox"][2] - candidate["bbox"][0] + 1
        cols = candidate["bbox"][3] - candidate["bbox"][1] + 1
        assert candidate["size_mm"] == pytest.approx(max(rows, cols) * 0.7, abs=0.01)


def test_study_nifti(client, volume_samples):
    response = post(
        client, "/v1/studies?top_k=2", (volume_samples / "example_ct_sm.nii.gz").read_bytes()
    )

    assert response.status_code == 200, response.json
    body = response.json
    assert body["input"]["kind"] == "nifti-gz"
    assert body["input"]["shape"][0] == 30
    assert body["input"]["spacing_mm"] == [3.0, 3.0, 3.0]
    assert len(body["slice_scores"]) == 30
    assert body["score"] == pytest.approx(max(body["slice_scores"]))
    assert body["verdict"] == ("stone" if body["score"] >= 0.5 else "no_stone")
    assert body["aggregation"] == "max"
    top = body["top_slices"]
    assert len(top) == 2
    assert top[0]["score"] == pytest.approx(body["score"])
    assert top[0]["score"] >= top[1]["score"]
    assert decode_png(top[0]["heatmap_png"]).shape == tuple(body["input"]["shape"][1:]) + (3,)


def test_study_raw_nifti(client, tmp_path):
    volume = np.full((32, 24, 5), 40, dtype=np.int16)
    volume[10:12, 10:12, 2] = 900
    path = tmp_path / "small.nii"
    nib.save(nib.Nifti1Image(volume, np.diag([0.8, 0.8, 2.5, 1.0])), path)

    body = post(client, "/v1/studies", path.read_bytes()).json

    assert body["input"]["kind"] == "nifti"
    assert len(body["slice_scores"]) == 5
    assert body["input"]["spacing_mm"][0] == pytest.approx(2.5)


def test_study_zipped_real_dicom_series(stone_client, volume_samples):
    series = volume_samples / "example_ct_dicom"
    members = {f"series/{p.name}": p.read_bytes() for p in sorted(series.iterdir())}
    members["series/README.txt"] = b"not a DICOM file"

    response = post(stone_client, "/v1/studies?top_k=3", zip_bytes(members), "Doe_John.zip")

    assert response.status_code == 200, response.json
    body = response.json
    assert body["input"]["kind"] == "zip"
    assert body["input"]["shape"] == [20, 512, 512]
    assert body["input"]["spacing_mm"][0] == pytest.approx(2.0, abs=1e-3)
    assert body["input"]["spacing_mm"][1] == pytest.approx(0.977, abs=1e-3)
    assert body["skipped_files"] == 1
    assert len(body["slice_scores"]) == 20
    assert body["verdict"] == "stone"
    assert [t["slice"] for t in body["top_slices"]] == sorted(
        range(20), key=lambda i: -body["slice_scores"][i]
    )[:3]
    for candidate in body["candidates"]:
        assert 0 <= candidate["slice"] < 20
        assert candidate["size_mm"] <= 30.0


def test_study_single_dicom_file(client, dicom_bytes):
    body = post(client, "/v1/studies", dicom_bytes).json

    assert len(body["slice_scores"]) == 1


# --- 400 ---------------------------------------------------------------------------------


def test_missing_file_field(client):
    response = client.post(
        "/v1/predict",
        data={"image": (io.BytesIO(b"x"), "a.png")},
        content_type="multipart/form-data",
    )
    assert_error(response, 400, "'file'")


def test_empty_file(client):
    assert_error(post(client, "/v1/predict", b""), 400, "empty")


@pytest.mark.parametrize("query", ["heatmap=maybe", "heatmap=2"])
def test_invalid_heatmap_flag(client, query, islam_subset):
    content = islam_subset.joinpath(*NORMAL_JPG).read_bytes()
    assert_error(post(client, f"/v1/predict?{query}", content), 400, "heatmap")


@pytest.mark.parametrize("value", ["-1", "11", "two", "1.5"])
def test_invalid_top_k(client, value, volume_samples):
    content = (volume_samples / "example_ct_sm.nii.gz").read_bytes()
    assert_error(post(client, f"/v1/studies?top_k={value}", content), 400, "top_k")


# --- 413 ---------------------------------------------------------------------------------


def test_upload_over_limit(predictor):
    small = create_app(predictor, ApiConfig(max_upload_mb=1)).test_client()

    response = post(small, "/v1/predict", b"\x89PNG\r\n\x1a\n" + bytes(3 * 2**20))

    assert_error(response, 413, "1 MiB", "NEPHROLITH_MAX_UPLOAD_MB")


# --- 415 ---------------------------------------------------------------------------------


def test_unknown_type(client):
    assert_error(post(client, "/v1/predict", b"hello, this is text"), 415, "unsupported file type")


def test_not_multipart(client):
    response = client.post("/v1/predict", json={"file": "abc"})
    assert_error(response, 415, "multipart/form-data")


def test_volume_sent_to_predict(client, volume_samples):
    content = (volume_samples / "example_ct_sm.nii.gz").read_bytes()
    assert_error(post(client, "/v1/predict", content), 415, "/v1/studies")


def test_zip_sent_to_predict(client):
    assert_error(post(client, "/v1/predict", zip_bytes({"a.dcm": b"x"})), 415, "/v1/studies")


def test_slice_image_sent_to_studies(client, islam_subset):
    content = islam_subset.joinpath(*NORMAL_JPG).read_bytes()
    assert_error(post(client, "/v1/studies", content), 415, "/v1/predict")


# --- 422 ---------------------------------------------------------------------------------


def test_truncated_jpeg(client, islam_subset):
    content = islam_subset.joinpath(*NORMAL_JPG).read_bytes()[:2000]
    assert_error(post(client, "/v1/predict", content), 422)


def test_corrupt_dicom(client):
    content = bytes(128) + b"DICM" + b"\x02\x00\x10\x00UI" + b"\xff" * 64
    assert_error(post(client, "/v1/predict", content), 422)


@pytest.mark.parametrize(("modality", "fragment"), [("MR", "MR"), ("OT", "CT")])
def test_non_ct_dicom(client, tmp_path, modality, fragment):
    path = write_dicom(tmp_path / "x.dcm", phantom_slice(32), modality=modality)
    assert_error(post(client, "/v1/predict", path.read_bytes()), 422, fragment)


def test_png_decompression_bomb(client):
    # A PNG header claiming 20000 x 20000 grey pixels over a few bytes of data.
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0)
    png = (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(bytes(20001)))
    )
    png += chunk(b"IEND", b"")

    message = assert_error(post(client, "/v1/predict", png), 422)
    assert "bomb" in message or "exceeds" in message


def test_dicom_header_bomb(client, tmp_path):
    import pydicom

    path = write_dicom(tmp_path / "big.dcm", phantom_slice(32))
    ds = pydicom.dcmread(path)
    ds.Rows, ds.Columns = 60000, 60000
    ds.save_as(path, enforce_file_format=True)

    assert_error(post(client, "/v1/predict", path.read_bytes()), 422, "limit")


def test_nifti_gzip_bomb(predictor, volume_samples):
    small = create_app(predictor, ApiConfig(max_study_mb=1)).test_client()
    # example_ct.nii.gz is 2.2 MB compressed and about 5.5 MB decompressed.
    content = (volume_samples / "example_ct.nii.gz").read_bytes()

    assert_error(post(small, "/v1/studies", content), 422, "decompression bomb")


def test_corrupt_nifti_gz(client, volume_samples):
    content = (volume_samples / "example_ct_sm.nii.gz").read_bytes()[:5000]
    assert_error(post(client, "/v1/studies", content), 422)


def test_4d_nifti(client, tmp_path):
    path = tmp_path / "fmri.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 4, 3), np.int16), np.eye(4)), path)
    assert_error(post(client, "/v1/studies", path.read_bytes()), 422)


@pytest.mark.parametrize(
    "name", ["../evil.dcm", "series/../../evil.dcm", "/etc/evil.dcm", "C:/evil.dcm"]
)
def test_zip_slip(client, dicom_bytes, name):
    content = zip_bytes({"series/ok.dcm": dicom_bytes, name: dicom_bytes})
    assert_error(post(client, "/v1/studies", content), 422, "leaves the archive")


def test_zip_symlink(client, dicom_bytes):
    content = zip_bytes({"ok.dcm": dicom_bytes}, symlinks=("link.dcm",))
    assert_error(post(client, "/v1/studies", content), 422, "symbolic link")


def test_zip_bomb_total_size(predictor):
    small = create_app(predictor, ApiConfig(max_study_mb=1)).test_client()
    content = zip_bytes({"a.dcm": bytes(3 * 2**20)})

    assert len(content) < 20_000
    assert_error(post(small, "/v1/studies", content), 422, "zip bomb")


def test_zip_too_many_members(predictor, dicom_bytes):
    small = create_app(predictor, ApiConfig(max_zip_members=5)).test_client()
    content = zip_bytes({f"{i}.dcm": dicom_bytes for i in range(6)})

    assert_error(post(small, "/v1/studies", content), 422, "6 files")


def test_zip_corrupt(client, dicom_bytes):
    content = zip_bytes({"a.dcm": dicom_bytes})
    assert_error(post(client, "/v1/studies", content[: len(content) // 2]), 422)


def test_zip_without_dicom(client):
    assert_error(post(client, "/v1/studies", zip_bytes({"notes.txt": b"hello"})), 422)


def test_study_over_slice_limit(predictor, volume_samples):
    small = create_app(predictor, ApiConfig(max_slices=10)).test_client()
    content = (volume_samples / "example_ct_sm.nii.gz").read_bytes()

    assert_error(post(small, "/v1/studies", content), 422, "30 slices")


# --- 404, 405, 500 -----------------------------------------------------------------------


def test_unknown_route_is_json(client):
    assert_error(client.get("/v2/nothing"), 404)


def test_wrong_method_is_json(client):
    assert_error(client.get("/v1/predict"), 405)


def test_internal_error_hides_details_and_recovers(predictor, islam_subset, monkeypatch, caplog):
    from nephrolith.common import explain

    app = create_app(predictor, ApiConfig())
    test_client = app.test_client()
    original = explain.grad_cam
    calls = {"n": 0}

    def fail_once(model, x):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("secret internal detail")
        return original(model, x)

    monkeypatch.setattr(explain, "grad_cam", fail_once)
    content = islam_subset.joinpath(*NORMAL_JPG).read_bytes()

    with caplog.at_level(logging.INFO):
        failed = post(test_client, "/v1/predict", content)
        recovered = post(test_client, "/v1/predict", content)

    message = assert_error(failed, 500, failed.json["request_id"])
    assert "secret" not in message
    assert "secret internal detail" in caplog.text  # the traceback is in the log
    assert "Traceback" in caplog.text
    assert recovered.status_code == 200


# --- robustness, logging, page, OpenAPI --------------------------------------------------


def test_bad_requests_leave_no_trace(client, islam_subset, volume_samples, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    good = islam_subset.joinpath(*NORMAL_JPG).read_bytes()
    first = post(client, "/v1/predict", good).json["probability"]

    post(client, "/v1/predict", good[:1000])
    post(client, "/v1/studies", zip_bytes({"../x.dcm": b"1"}))
    post(client, "/v1/studies", (volume_samples / "example_ct_sm.nii.gz").read_bytes()[:3000])
    post(client, "/v1/predict", b"garbage")

    assert post(client, "/v1/predict", good).json["probability"] == first
    assert list(tmp_path.iterdir()) == []


def test_logs_request_line_without_identifiers(client, dicom_bytes, caplog):
    filename = f"{PATIENT_NAME.replace('^', '_')}_{PATIENT_ID}.dcm"

    with caplog.at_level(logging.DEBUG):
        response = post(client, "/v1/predict", dicom_bytes, filename)

    request_id = response.json["request_id"]
    lines = [r.getMessage() for r in caplog.records if request_id in r.getMessage()]
    assert len(lines) == 1
    assert "POST /v1/predict -> 200 in" in lines[0]
    assert " ms" in lines[0]
    for secret in ("Johnathan", "Doe", PATIENT_ID, "PID-98765"):
        assert secret not in caplog.text


def test_request_id_header_is_echoed(client):
    response = client.get("/healthz", headers={"X-Request-ID": "abc-123"})
    assert response.headers["X-Request-ID"] == "abc-123"


def test_request_id_header_rejects_unsafe_values(client):
    response = client.get("/healthz", headers={"X-Request-ID": "bad id\twith spaces"})
    assert response.headers["X-Request-ID"] != "bad id\twith spaces"
    assert len(response.headers["X-Request-ID"]) == 16


def test_index_page(client, predictor):
    response = client.get("/")

    assert response.status_code == 200
    html = response.get_data(as_text=True)
    assert 'id="upload-form"' in html
    assert "/static/app.js" in html
    assert predictor.model_id in html
    assert "script-src 'self'" in response.headers["Content-Security-Policy"]
    assert client.get("/static/app.js").status_code == 200
    assert client.get("/static/app.css").status_code == 200


def test_page_needs_no_internet():
    package = Path(__import__("nephrolith.client.api", fromlist=["x"]).__file__).parent
    files = list((package / "static").iterdir()) + list((package / "templates").iterdir())
    assert len(files) >= 3
    for path in files:
        text = path.read_text(encoding="utf-8")
        for url in ("http://", "https://", "//cdn", "fonts.googleapis"):
            remaining = text.replace("http://www.w3.org/2000/svg", "")  # SVG namespace, not a fetch
            assert url not in remaining, f"{path.name} references {url}"


def test_openapi_document(client):
    import schemathesis

    doc = client.get("/openapi.json").json

    assert doc["openapi"].startswith("3.")
    assert set(doc["paths"]) == {
        "/",
        "/healthz",
        "/v1/model",
        "/v1/predict",
        "/v1/studies",
        "/openapi.json",
    }
    for path in ("/v1/predict", "/v1/studies"):
        responses = doc["paths"][path]["post"]["responses"]
        assert {"200", "400", "413", "415", "422", "500"} <= set(responses)
    schema = schemathesis.openapi.from_dict(doc)
    operations = [op.ok() for op in schema.get_all_operations()]
    assert len(operations) == 6


def test_gzip_that_is_not_nifti_is_rejected(client):
    assert_error(post(client, "/v1/studies", gzip.compress(b"just text" * 100)), 415)


@pytest.mark.parametrize("side", [1, 8])
def test_tiny_image_rejected(client, side):
    ok, png = cv2.imencode(".png", np.full((side, side), 128, np.uint8))
    assert ok
    assert_error(post(client, "/v1/predict", png.tobytes()), 422, f"{side} x {side} pixels")


def test_config_from_env():
    from nephrolith.common.errors import ConfigError

    env = {"NEPHROLITH_MAX_UPLOAD_MB": "3", "NEPHROLITH_STONE_HU_MIN": "250.5", "OTHER": "x"}

    config = ApiConfig.from_env(env, max_slices=20)

    assert config.max_upload_mb == 3
    assert config.stone_hu_min == 250.5
    assert config.max_slices == 20
    assert config.top_k == ApiConfig().top_k
    with pytest.raises(ConfigError, match="NEPHROLITH_MAX_SLICES"):
        ApiConfig.from_env({"NEPHROLITH_MAX_SLICES": "many"})
    with pytest.raises(ConfigError, match="max_upload_mb"):
        ApiConfig.from_env({"NEPHROLITH_MAX_UPLOAD_MB": "0"})


def test_concurrent_requests_agree(predictor, islam_subset):
    from concurrent.futures import ThreadPoolExecutor

    app = create_app(predictor, ApiConfig())
    images = [
        islam_subset.joinpath(*STONE_JPG).read_bytes(),
        islam_subset.joinpath(*NORMAL_JPG).read_bytes(),
    ]
    sequential = [
        post(app.test_client(), "/v1/predict", image).json["probability"] for image in images
    ]

    def predict(index):
        return post(app.test_client(), "/v1/predict", images[index % 2]).json["probability"]

    with ThreadPoolExecutor(max_workers=4) as pool:
        parallel = list(pool.map(predict, range(8)))

    assert parallel == [sequential[i % 2] for i in range(8)]
