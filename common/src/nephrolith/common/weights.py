"""Trainable-weight exchange (lists of arrays) and checkpoints (weights file + JSON metadata)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import tf_keras as keras

from nephrolith.common import __version__
from nephrolith.common.config import ModelConfig, from_dict, to_dict
from nephrolith.common.errors import ConfigError, ModelError
from nephrolith.common.model import CONFIG_ATTRIBUTE, build_model, model_config_of

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "model.weights.h5"
METADATA_FILE = "metadata.json"


def get_trainable(model: keras.Model) -> list[np.ndarray]:
    """Return copies of the model's trainable weights, in model.trainable_weights order.

    This list is what a site sends to the server each round; frozen backbone layers
    are left out.
    """
    return [np.array(variable.numpy(), copy=True) for variable in model.trainable_weights]


def set_trainable(model: keras.Model, arrays: list[np.ndarray]) -> None:
    """Assign arrays to the model's trainable weights, in model.trainable_weights order.

    Every array is checked before any weight changes, so a rejected update leaves
    the model untouched.

    Args:
        model: the model to update.
        arrays: one floating-point array per trainable weight, same shapes.

    Raises:
        ModelError: on a wrong count, shape, non-float dtype or non-finite values; the
            message names the index and weight.
    """
    variables = model.trainable_weights
    if len(arrays) != len(variables):
        raise ModelError(
            f"set_trainable: expected {len(variables)} arrays (one per trainable weight of "
            f"{model.name}), got {len(arrays)}; both sides must build the model from the same "
            "ModelConfig"
        )

    checked = []
    for index, (variable, array) in enumerate(zip(variables, arrays, strict=True)):
        array = np.asarray(array)
        where = f"set_trainable: array {index} ({variable.name})"
        if tuple(array.shape) != tuple(variable.shape):
            raise ModelError(
                f"{where}: expected shape {tuple(variable.shape)}, got {tuple(array.shape)}"
            )
        if not np.issubdtype(array.dtype, np.floating):
            raise ModelError(f"{where}: expected a floating-point array, got dtype {array.dtype}")
        if not np.all(np.isfinite(array)):
            bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
            raise ModelError(f"{where}: {bad} NaN or infinite values; the update is rejected")
        checked.append(array.astype(variable.dtype.as_numpy_dtype, copy=False))

    for variable, array in zip(variables, checked, strict=True):
        variable.assign(array)


def save_checkpoint(directory: Path, model: keras.Model, metadata: dict[str, Any]) -> Path:
    """Write model.weights.h5 (all weights) and metadata.json into a folder.

    Both files are first written to temporary names and then renamed, the metadata
    last. metadata.json records the SHA-256 of the weights file, so load_checkpoint
    detects weights left by an interrupted overwrite or copied from another checkpoint.
    The metadata gets "model" (from the model when missing), "nephrolith_version",
    "created" (UTC ISO 8601, when missing) and "weights_sha256". Other keys the
    project uses: "preprocess", "class_names", "threshold", "provenance".

    Args:
        directory: checkpoint folder; created when missing, existing files are replaced.
        model: a model built by build_model.
        metadata: JSON-serialisable dict.

    Returns:
        The folder.

    Raises:
        ModelError: when metadata is not JSON-serialisable or carries no model config.
    """
    directory = Path(directory)
    meta = dict(metadata)
    if "model" not in meta:
        meta["model"] = to_dict(model_config_of(model))
    meta.setdefault("nephrolith_version", __version__)
    meta.setdefault("created", datetime.now(UTC).isoformat(timespec="seconds"))
    try:
        json.dumps(meta, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ModelError(f"save_checkpoint: metadata is not JSON-serialisable ({err})") from err
    directory.mkdir(parents=True, exist_ok=True)

    # tf_keras picks the weights format from the name: ".weights.h5" is the Keras v3
    # format (matched by layer structure), a plain ".h5" the legacy one. The temporary
    # file keeps the suffix so saving and loading use the same format.
    handle, tmp_weights = tempfile.mkstemp(prefix=".tmp-", suffix=".weights.h5", dir=directory)
    os.close(handle)
    try:
        model.save_weights(tmp_weights)
        meta["weights_sha256"] = _sha256(Path(tmp_weights))
        text = json.dumps(meta, indent=2, sort_keys=True, allow_nan=False)
        os.replace(tmp_weights, directory / WEIGHTS_FILE)
    finally:
        if os.path.exists(tmp_weights):
            os.remove(tmp_weights)

    _write_text_atomic(directory / METADATA_FILE, text + "\n")
    logger.info("checkpoint saved to %s (%d weight tensors)", directory.name, len(model.weights))
    return directory


def load_checkpoint(directory: Path) -> tuple[keras.Model, dict[str, Any]]:
    """Rebuild a model from a checkpoint folder and load its weights.

    The model is rebuilt from metadata["model"] with backbone_weights "none": the
    checkpoint contains every weight, so loading never downloads ImageNet weights or needs
    the original weights file. The freeze fraction in force when the checkpoint was
    written is kept. A "hub" checkpoint still needs its SavedModel folder (hub_handle),
    because the backbone graph comes from there.

    Returns:
        (model, metadata) with metadata exactly as stored.

    Raises:
        ModelError: when files are missing or corrupt, or the weights do not fit the
            architecture in the metadata.
    """
    directory = Path(directory)
    metadata = _read_metadata(directory / METADATA_FILE)
    weights_path = directory / WEIGHTS_FILE
    if not weights_path.is_file():
        raise ModelError(f"{weights_path}: weights file not found; the checkpoint is incomplete")
    expected_hash = metadata.get("weights_sha256")
    if expected_hash and _sha256(weights_path) != expected_hash:
        raise ModelError(
            f"{weights_path}: SHA-256 differs from metadata.json; the file is corrupt or "
            "belongs to another checkpoint"
        )

    cfg = _rebuild_config(metadata, directory / METADATA_FILE)
    model = build_model(cfg)
    try:
        model.load_weights(str(weights_path))
    except (ValueError, OSError, KeyError) as err:
        raise ModelError(
            f"{weights_path}: weights do not fit the architecture in {METADATA_FILE} or the "
            f"file is unreadable ({err})"
        ) from err
    # Keep the configuration as trained, not the rebuild variant, for later checkpoints.
    setattr(model, CONFIG_ATTRIBUTE, json.dumps(metadata["model"]))
    logger.info("checkpoint loaded from %s", directory.name)
    return model, metadata


def _rebuild_config(metadata: dict[str, Any], where: Path) -> ModelConfig:
    """Return the ModelConfig to rebuild with: stored config, no weights source."""
    if not isinstance(metadata.get("model"), dict):
        raise ModelError(f"{where}: key 'model' with the ModelConfig is missing")
    try:
        cfg = from_dict(ModelConfig, metadata["model"], where=f"{where}: model")
    except ConfigError as err:
        raise ModelError(str(err)) from err
    if cfg.backbone_source == "hub" and "://" not in (cfg.hub_handle or ""):
        if not Path(cfg.hub_handle or "").expanduser().is_dir():
            raise ModelError(
                f"{where}: hub backbone folder {cfg.hub_handle} not found; the checkpoint "
                "needs the SavedModel it was trained with at that path"
            )
    return replace(cfg, backbone_weights="none", freeze_fraction=cfg.effective_freeze_fraction)


def _read_metadata(path: Path) -> dict[str, Any]:
    try:
        metadata = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise ModelError(f"{path}: metadata file not found; not a checkpoint folder") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelError(f"{path}: invalid JSON ({err}); the checkpoint is corrupt") from err
    if not isinstance(metadata, dict):
        raise ModelError(f"{path}: expected a JSON object, got {type(metadata).__name__}")
    return metadata


def _write_text_atomic(path: Path, text: str) -> None:
    handle, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=path.suffix, dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


__all__ = [
    "METADATA_FILE",
    "WEIGHTS_FILE",
    "get_trainable",
    "load_checkpoint",
    "save_checkpoint",
    "set_trainable",
]
