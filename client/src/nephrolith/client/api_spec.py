"""OpenAPI 3 description of the inference API, served at GET /openapi.json."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from nephrolith.common import __version__

if TYPE_CHECKING:
    from nephrolith.client.api import ApiConfig


def _error_response(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


def _upload_body(description: str) -> dict[str, Any]:
    return {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {"type": "string", "format": "binary", "description": description}
                    },
                },
                "encoding": {"file": {"contentType": "application/octet-stream"}},
            }
        },
    }


_UPLOAD_ERRORS = {
    "400": _error_response("Missing 'file' field, empty file or invalid query parameter."),
    "413": _error_response("The request body exceeds the configured upload limit."),
    "415": _error_response("Unsupported file type or request content type."),
    "422": _error_response(
        "Corrupt or undecodable file, decompression or zip bomb, non-CT DICOM, 4-D volume, "
        "zip member leaving its folder, or a study over the slice limit."
    ),
    "500": _error_response(
        "Internal error; the server log contains the traceback under the request id."
    ),
}

_NUMBER_LIST = {"type": "array", "items": {"type": "number"}}


def _schemas() -> dict[str, Any]:
    nullable_number = {"type": "number", "nullable": True}
    return {
        "Error": {
            "type": "object",
            "required": ["error"],
            "properties": {
                "error": {"type": "string", "description": "What failed and what to do."},
                "request_id": {"type": "string", "nullable": True},
            },
        },
        "Input": {
            "type": "object",
            "required": ["kind", "is_hu", "shape"],
            "properties": {
                "kind": {
                    "type": "string",
                    "enum": ["png", "jpeg", "dicom", "zip", "nifti", "nifti-gz"],
                },
                "is_hu": {
                    "type": "boolean",
                    "description": "True for DICOM and NIfTI (Hounsfield units).",
                },
                "shape": {
                    "type": "array",
                    "items": {"type": "integer"},
                    "description": "(H, W) for a slice, (D, H, W) for a volume.",
                },
                "spacing_mm": {
                    **_NUMBER_LIST,
                    "nullable": True,
                    "description": "(row, col) or (z, row, col) in mm.",
                },
            },
        },
        "Candidate": {
            "type": "object",
            "description": "A stone candidate; positions are 0-based pixel indices of the upload.",
            "required": ["kind", "row", "col", "bbox", "voxels", "heat"],
            "properties": {
                "kind": {
                    "type": "string",
                    "enum": ["hu", "heatmap"],
                    "description": "'hu': dense voxels inside the high-heat region; "
                    "'heatmap': a high-heat region of a display image.",
                },
                "slice": {"type": "integer", "nullable": True},
                "row": {"type": "number"},
                "col": {"type": "number"},
                "bbox": {
                    "type": "array",
                    "items": {"type": "integer"},
                    "minItems": 4,
                    "maxItems": 4,
                    "description": "row_min, col_min, row_max, col_max (inclusive).",
                },
                "slice_range": {"type": "array", "items": {"type": "integer"}, "nullable": True},
                "voxels": {"type": "integer"},
                "size_mm": {**nullable_number, "description": "Largest extent in mm."},
                "volume_mm3": nullable_number,
                "peak_hu": nullable_number,
                "mean_hu": nullable_number,
                "heat": {"type": "number"},
            },
        },
        "SlicePrediction": {
            "type": "object",
            "required": ["request_id", "model_id", "label", "probability", "threshold", "input"],
            "properties": {
                "request_id": {"type": "string"},
                "model_id": {"type": "string"},
                "label": {"type": "string", "description": "Class name at the threshold."},
                "probability": {"type": "number", "minimum": 0, "maximum": 1},
                "threshold": {"type": "number"},
                "class_names": {"type": "array", "items": {"type": "string"}},
                "input": {"$ref": "#/components/schemas/Input"},
                "candidates": {
                    "type": "array",
                    "items": {"$ref": "#/components/schemas/Candidate"},
                },
                "heatmap_png": {
                    "type": "string",
                    "format": "byte",
                    "description": "Base64 PNG: Grad-CAM over the slice (heatmap=1 only).",
                },
            },
        },
        "StudyPrediction": {
            "type": "object",
            "required": ["request_id", "model_id", "verdict", "score", "threshold", "slice_scores"],
            "properties": {
                "request_id": {"type": "string"},
                "model_id": {"type": "string"},
                "verdict": {"type": "string"},
                "score": {
                    "type": "number",
                    "minimum": 0,
                    "maximum": 1,
                    "description": "Highest slice score (aggregation 'max').",
                },
                "threshold": {"type": "number"},
                "aggregation": {"type": "string", "enum": ["max"]},
                "class_names": {"type": "array", "items": {"type": "string"}},
                "input": {"$ref": "#/components/schemas/Input"},
                "skipped_files": {
                    "type": "integer",
                    "description": "Files of a zipped series the reader skipped.",
                },
                "slice_scores": _NUMBER_LIST,
                "top_slices": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["slice", "score", "heatmap_png"],
                        "properties": {
                            "slice": {"type": "integer"},
                            "score": {"type": "number"},
                            "heatmap_png": {"type": "string", "format": "byte"},
                        },
                    },
                },
                "candidates": {
                    "type": "array",
                    "items": {"$ref": "#/components/schemas/Candidate"},
                },
            },
        },
    }


def _paths(config: ApiConfig) -> dict[str, Any]:
    json_ok = {"description": "OK", "content": {"application/json": {"schema": {"type": "object"}}}}
    return {
        "/healthz": {
            "get": {
                "summary": "Liveness and the loaded model id",
                "operationId": "healthz",
                "responses": {"200": json_ok},
            }
        },
        "/v1/model": {
            "get": {
                "summary": "Model id, architecture, classes, threshold, preprocessing, "
                "training provenance",
                "operationId": "model_info",
                "responses": {"200": json_ok},
            }
        },
        "/v1/predict": {
            "post": {
                "summary": "Score one slice (PNG, JPEG or DICOM)",
                "operationId": "predict_slice",
                "parameters": [
                    {
                        "name": "heatmap",
                        "in": "query",
                        "required": False,
                        "description": "1 adds a base64 PNG of the Grad-CAM heatmap over the slice",
                        "schema": {"type": "string", "enum": ["0", "1"], "default": "0"},
                    }
                ],
                "requestBody": _upload_body("One slice: PNG, JPEG or DICOM Part 10."),
                "responses": {
                    "200": {
                        "description": "Prediction",
                        "content": {
                            "application/json": {
                                "schema": {"$ref": "#/components/schemas/SlicePrediction"}
                            }
                        },
                    },
                    **_UPLOAD_ERRORS,
                },
            }
        },
        "/v1/studies": {
            "post": {
                "summary": "Score a study: a zipped DICOM series or a NIfTI volume",
                "description": (
                    "Every slice is scored; the study score is the highest slice score. "
                    f"Limits: {config.max_slices} slices, {config.max_zip_members} zip members, "
                    f"{config.max_study_mb} MiB uncompressed."
                ),
                "operationId": "predict_study",
                "parameters": [
                    {
                        "name": "top_k",
                        "in": "query",
                        "required": False,
                        "description": "Number of highest-scoring slices returned with heatmaps.",
                        "schema": {
                            "type": "integer",
                            "minimum": 0,
                            "maximum": config.max_top_k,
                            "default": config.top_k,
                        },
                    }
                ],
                "requestBody": _upload_body(
                    "A .zip of one DICOM series, or a .nii/.nii.gz volume."
                ),
                "responses": {
                    "200": {
                        "description": "Study prediction",
                        "content": {
                            "application/json": {
                                "schema": {"$ref": "#/components/schemas/StudyPrediction"}
                            }
                        },
                    },
                    **_UPLOAD_ERRORS,
                },
            }
        },
        "/openapi.json": {
            "get": {
                "summary": "This document",
                "operationId": "openapi",
                "responses": {"200": json_ok},
            }
        },
        "/": {
            "get": {
                "summary": "Web page for people",
                "operationId": "index",
                "responses": {
                    "200": {
                        "description": "HTML page",
                        "content": {"text/html": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
    }


def openapi_document(config: ApiConfig) -> dict[str, Any]:
    """Return the OpenAPI 3.0 document of every endpoint, with the configured limits."""
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "nephrolith inference API",
            "version": __version__,
            "description": (
                "Kidney-stone detection on CT at the hospital. Not a medical device. "
                f'Uploads up to {config.max_upload_mb} MiB. Errors are JSON {{"error": ...}}.'
            ),
        },
        "paths": _paths(config),
        "components": {"schemas": _schemas()},
    }
