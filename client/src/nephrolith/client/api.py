"""Flask inference API at the hospital: slice and study prediction, model info, web page."""

from __future__ import annotations

import base64
import logging
import os
import re
import tempfile
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from flask import Flask, g, jsonify, render_template, request
from werkzeug.exceptions import HTTPException

from nephrolith.client import api_uploads as uploads
from nephrolith.client.api_spec import openapi_document
from nephrolith.client.candidates import CandidateSettings
from nephrolith.client.inference import Predictor
from nephrolith.common import __version__
from nephrolith.common.errors import ConfigError, DataError
from nephrolith.common.image import CTImage

logger = logging.getLogger(__name__)

_MIB = 2**20
# Smallest slice side accepted; CT slices are hundreds of pixels wide, and the
# preprocessing needs at least 2 pixels per side.
MIN_SIDE_PX = 16
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_TRUE = {"1", "true", "yes"}
_FALSE = {"0", "false", "no", ""}
_CSP = (
    "default-src 'self'; img-src 'self' data:; script-src 'self'; style-src 'self'; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
)


@dataclass(frozen=True)
class ApiConfig:
    """Limits and defaults of the inference API; every field can come from NEPHROLITH_<FIELD>.

    Attributes:
        max_upload_mb: largest request body in MiB (Flask MAX_CONTENT_LENGTH); larger gets 413.
            512 MiB fits a zipped 1,000-slice 512 x 512 series.
        max_study_mb: largest uncompressed size of a zipped series or a .nii.gz volume in MiB.
            A 1,000-slice 512 x 512 int16 series is about 500 MiB.
        max_zip_members: most files a zipped series may hold.
        max_slices: most slices a study may hold.
        top_k: slices returned with heatmaps by POST /v1/studies when top_k is not given.
        max_top_k: largest top_k a client may request.
        batch_size: slices per model run.
        stone_hu_min: lowest HU counted as stone when stone candidates are searched.
        heat_threshold: lowest normalised heat (0..1) of the region searched for stones.
        max_stone_mm: dense components longer than this (mm) are not reported as stones.
    """

    max_upload_mb: int = 512
    max_study_mb: int = 1024
    max_zip_members: int = 4000
    max_slices: int = 1000
    top_k: int = 3
    max_top_k: int = 10
    batch_size: int = 8
    stone_hu_min: float = 300.0
    heat_threshold: float = 0.5
    max_stone_mm: float = 30.0

    def __post_init__(self) -> None:
        for name in (
            "max_upload_mb",
            "max_study_mb",
            "max_zip_members",
            "max_slices",
            "batch_size",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"api.{name}: expected >= 1, got {getattr(self, name)}")
        if not 0 <= self.top_k <= self.max_top_k:
            raise ConfigError(
                f"api.top_k: expected 0..max_top_k ({self.max_top_k}), got {self.top_k}"
            )
        if not 0.0 < self.heat_threshold <= 1.0:
            raise ConfigError(f"api.heat_threshold: expected 0 < t <= 1, got {self.heat_threshold}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> ApiConfig:
        """Build the config from NEPHROLITH_<FIELD> variables, then apply explicit overrides.

        Raises:
            ConfigError: when a variable does not parse as the field's type.
        """
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for item in fields(cls):
            key = f"NEPHROLITH_{item.name.upper()}"
            if key not in environ:
                continue
            kind = float if item.type in ("float", float) else int
            try:
                values[item.name] = kind(environ[key])
            except ValueError as err:
                raise ConfigError(
                    f"{key}: expected a {kind.__name__}, got {environ[key]!r}"
                ) from err
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def candidate_settings(self) -> CandidateSettings:
        """Return the stone candidate settings held in this config."""
        return CandidateSettings(
            stone_hu_min=self.stone_hu_min,
            heat_threshold=self.heat_threshold,
            max_stone_mm=self.max_stone_mm,
        )


def _png_base64(display: np.ndarray, heat: np.ndarray) -> str:
    from nephrolith.common import explain

    rgb = explain.overlay(display, heat)
    ok, encoded = cv2.imencode(
        ".png", cv2.cvtColor(np.asarray(rgb, dtype=np.uint8), cv2.COLOR_RGB2BGR)
    )
    if not ok:
        raise RuntimeError("PNG encoding of the heatmap overlay failed")
    return base64.b64encode(encoded.tobytes()).decode("ascii")


def _input_summary(ct: CTImage, kind: str) -> dict[str, Any]:
    return {
        "kind": kind,
        "is_hu": bool(ct.is_hu),
        "shape": list(ct.pixels.shape),
        "spacing_mm": [round(float(s), 4) for s in ct.spacing_mm] if ct.spacing_mm else None,
    }


def _flag(name: str) -> bool:
    value = request.args.get(name, "0").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise uploads.UploadError(400, f"query parameter {name!r}: expected 0 or 1, got {value!r}")


def _top_k(config: ApiConfig) -> int:
    raw = request.args.get("top_k")
    if raw is None:
        return config.top_k
    if not raw.isdigit() or int(raw) > config.max_top_k:
        raise uploads.UploadError(
            400, f"query parameter 'top_k': expected an integer 0..{config.max_top_k}, got {raw!r}"
        )
    return int(raw)


def _upload_file() -> Any:
    if request.mimetype != "multipart/form-data":
        raise uploads.UploadError(
            415,
            f"expected a multipart/form-data request with a 'file' field, got "
            f"{request.mimetype or 'no content type'}; send the file as a form upload",
        )
    storage = request.files.get("file")
    if storage is None:
        raise uploads.UploadError(400, "missing form field 'file'; attach the image as 'file'")
    return storage


def _read(reader: Any, path: Path, folder: Path) -> CTImage:
    """Run a reader and turn its failures into 422 responses without exposing server paths."""
    try:
        return reader(path)
    except (DataError, NotImplementedError) as err:
        message = str(err).replace(str(folder) + os.sep, "").replace(str(folder), "upload")
        raise uploads.UploadError(422, message) from err
    except Exception as err:
        # A reader bug on an odd file is still an undecodable upload for the client; the
        # traceback goes to the log so the reader can be fixed.
        logger.exception("request %s: reader failed on a %s upload", g.request_id, path.suffix)
        raise uploads.UploadError(
            422, "the file could not be decoded; check that it is a valid image and not truncated"
        ) from err


def _check_slice_size(ct: CTImage, kind: str) -> None:
    height, width = ct.pixels.shape[-2:]
    if min(height, width) < MIN_SIDE_PX:
        raise uploads.UploadError(
            422,
            f"the {kind} image is {height} x {width} pixels; expected at least "
            f"{MIN_SIDE_PX} x {MIN_SIDE_PX} pixels per slice",
        )


def _read_slice(path: Path, kind: str, folder: Path) -> CTImage:
    from nephrolith.common.io import read_image

    ct = _read(read_image, path, folder)
    if ct.is_volume and ct.pixels.shape[0] == 1:
        ct = CTImage(
            ct.pixels[0],
            ct.is_hu,
            ct.spacing_mm and tuple(ct.spacing_mm[-2:]),
            ct.source,
            ct.path,
            ct.meta,
        )
    if ct.is_volume:
        raise uploads.UploadError(
            422,
            f"the {kind} file contains {ct.pixels.shape[0]} slices; send volumes to /v1/studies",
        )
    _check_slice_size(ct, kind)
    return ct


def _read_study(path: Path, kind: str, folder: Path, config: ApiConfig) -> CTImage:
    from nephrolith.common.io import read_dicom_series, read_image

    if kind == uploads.KIND_ZIP:
        series = folder / "series"
        series.mkdir()
        limits = uploads.ZipLimits(config.max_zip_members, config.max_study_mb * _MIB)
        uploads.extract_zip(path, series, limits)
        path.unlink()
        ct = _read(read_dicom_series, series, folder)
    elif kind == uploads.KIND_NIFTI_GZ:
        ct = _read(read_image, uploads.gunzip_capped(path, config.max_study_mb * _MIB), folder)
    else:
        ct = _read(read_image, path, folder)
    depth = ct.pixels.shape[0] if ct.is_volume else 1
    if depth > config.max_slices:
        raise uploads.UploadError(
            422,
            f"the study contains {depth} slices, more than the limit of {config.max_slices}; "
            "send a shorter series or raise NEPHROLITH_MAX_SLICES",
        )
    _check_slice_size(ct, kind)
    return ct


def _predict_slice(predictor: Predictor) -> dict[str, Any]:
    want_heatmap = _flag("heatmap")
    storage = _upload_file()
    with tempfile.TemporaryDirectory(prefix="nephrolith-upload-") as tmp:
        folder = Path(tmp)
        path, kind = uploads.save_upload(storage.stream, folder)
        if kind not in uploads.SLICE_KINDS:
            raise uploads.UploadError(
                415,
                f"/v1/predict takes one PNG, JPEG or DICOM slice, got {kind}; "
                "send zipped series and NIfTI volumes to /v1/studies",
            )
        ct = _read_slice(path, kind, folder)
    result = predictor.predict_slice(ct)
    body: dict[str, Any] = {
        "model_id": predictor.model_id,
        "label": result.label,
        "probability": round(result.probability, 6),
        "threshold": predictor.threshold,
        "class_names": list(predictor.class_names),
        "input": _input_summary(ct, kind),
        "candidates": [c.to_json() for c in result.candidates],
    }
    if want_heatmap:
        body["heatmap_png"] = _png_base64(result.display, result.heatmap)
    return body


def _predict_study(predictor: Predictor, config: ApiConfig) -> dict[str, Any]:
    top_k = _top_k(config)
    storage = _upload_file()
    with tempfile.TemporaryDirectory(prefix="nephrolith-upload-") as tmp:
        folder = Path(tmp)
        path, kind = uploads.save_upload(storage.stream, folder)
        if kind not in uploads.STUDY_KINDS | {uploads.KIND_DICOM}:
            raise uploads.UploadError(
                415,
                f"/v1/studies takes a .zip of a DICOM series or a NIfTI volume, got {kind}; "
                "send single PNG/JPEG slices to /v1/predict",
            )
        ct = _read_study(path, kind, folder, config)
    result = predictor.predict_study(ct, top_k=top_k)
    return {
        "model_id": predictor.model_id,
        "verdict": result.verdict,
        "score": round(result.score, 6),
        "threshold": predictor.threshold,
        "aggregation": "max",
        "class_names": list(predictor.class_names),
        "input": _input_summary(ct, kind),
        "skipped_files": len(ct.meta.get("skipped", [])),
        "slice_scores": [round(float(p), 6) for p in result.slice_scores],
        "top_slices": [
            {
                "slice": index,
                "score": round(float(result.slice_scores[index]), 6),
                "heatmap_png": _png_base64(result.displays[index], result.heatmaps[index]),
            }
            for index in result.top_slices
        ],
        "candidates": [c.to_json() for c in result.candidates],
    }


def _error(status: int, message: str) -> Any:
    response = jsonify({"error": message, "request_id": g.get("request_id")})
    response.status_code = status
    return response


def _register_hooks(app: Flask) -> None:
    @app.before_request
    def start_request() -> None:
        incoming = request.headers.get("X-Request-ID", "")
        g.request_id = incoming if _REQUEST_ID.match(incoming) else uuid.uuid4().hex[:16]
        g.started = time.perf_counter()

    @app.after_request
    def finish_request(response: Any) -> Any:
        response.headers["X-Request-ID"] = g.get("request_id", "-")
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["Content-Security-Policy"] = _CSP
        if request.path.startswith("/v1/"):
            response.headers["Cache-Control"] = "no-store"
        # The matched route, never the raw path: a path may carry anything a client typed.
        route = request.url_rule.rule if request.url_rule else "<no route>"
        elapsed_ms = (time.perf_counter() - g.get("started", time.perf_counter())) * 1000
        logger.info(
            "request %s %s %s -> %d in %.1f ms",
            g.get("request_id", "-"),
            request.method,
            route,
            response.status_code,
            elapsed_ms,
        )
        return response


def _register_errors(app: Flask, config: ApiConfig) -> None:
    @app.errorhandler(uploads.UploadError)
    def upload_error(err: uploads.UploadError) -> Any:
        return _error(err.status, err.message)

    @app.errorhandler(DataError)
    def data_error(err: DataError) -> Any:
        # Readers' errors become 422 in _read; this catches data problems found later,
        # for example by the preprocessing.
        logger.warning("request %s: data error after reading: %s", g.get("request_id", "-"), err)
        return _error(422, str(err))

    @app.errorhandler(HTTPException)
    def http_error(err: HTTPException) -> Any:
        if err.code == 413:
            return _error(
                413,
                f"the upload exceeds the limit of {config.max_upload_mb} MiB; send a smaller "
                "file or raise NEPHROLITH_MAX_UPLOAD_MB on the server",
            )
        return _error(err.code or 500, f"{err.name}: {err.description}")

    @app.errorhandler(Exception)
    def unexpected_error(err: Exception) -> Any:
        logger.exception("request %s failed", g.get("request_id", "-"))
        return _error(
            500,
            "internal error while processing the request; the server log has the details "
            f"under request id {g.get('request_id', '-')}",
        )


def _register_routes(app: Flask, predictor: Predictor, config: ApiConfig) -> None:
    @app.get("/")
    def index() -> Any:
        return render_template("index.html", model_id=predictor.model_id)

    @app.get("/healthz")
    def healthz() -> Any:
        return jsonify({"status": "ok", "model_id": predictor.model_id, "version": __version__})

    @app.get("/v1/model")
    def model_info() -> Any:
        return jsonify(predictor.info())

    @app.get("/openapi.json")
    def openapi() -> Any:
        return jsonify(openapi_document(config))

    @app.post("/v1/predict")
    def predict() -> Any:
        return jsonify({"request_id": g.request_id, **_predict_slice(predictor)})

    @app.post("/v1/studies")
    def studies() -> Any:
        return jsonify({"request_id": g.request_id, **_predict_study(predictor, config)})


def create_app(model: Predictor | str | Path, config: ApiConfig | None = None) -> Flask:
    """Build the inference app around one model, loaded once.

    Args:
        model: a loaded Predictor, or a checkpoint folder written by `weights.save_checkpoint`.
        config: limits and defaults; `ApiConfig.from_env()` when None.

    Returns:
        The Flask app; serve it with `nephrolith.client.serve.serve` (waitress).
    """
    config = config or ApiConfig.from_env()
    if isinstance(model, Predictor):
        predictor = model
    else:
        predictor = Predictor.from_checkpoint(
            model, batch_size=config.batch_size, candidates=config.candidate_settings()
        )

    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = config.max_upload_mb * _MIB
    app.config["JSON_SORT_KEYS"] = False
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.extensions["nephrolith"] = {"predictor": predictor, "config": config}

    _register_hooks(app)
    _register_errors(app, config)
    _register_routes(app, predictor, config)
    return app
