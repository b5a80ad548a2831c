"""Trainable-weight exchange and checkpoint save/load."""

from __future__ import annotations

import json
import socket
from dataclasses import replace

import numpy as np
import pytest
import tf_keras as keras

from nephrolith.common import weights
from nephrolith.common.config import ModelConfig, to_dict
from nephrolith.common.errors import ModelError
from nephrolith.common.model import build_model, count_params, tiny_model_config

SIZE = 64


@pytest.fixture(scope="module")
def cfg() -> ModelConfig:
    return replace(tiny_model_config(SIZE), freeze_fraction=0.5)


@pytest.fixture(scope="module")
def model(cfg) -> keras.Model:
    return build_model(cfg)


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(0).uniform(0, 255, (2, SIZE, SIZE, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, model):
    folder = tmp_path_factory.mktemp("ckpt") / "checkpoint"
    metadata = {
        "class_names": ["no_stone", "stone"],
        "threshold": 0.42,
        "preprocess": {"image_size": SIZE},
        "provenance": {"rounds": 3, "sites": ["site-1", "site-2"]},
    }
    weights.save_checkpoint(folder, model, metadata)
    return folder, metadata


def test_get_set_trainable_round_trip(cfg, model, images):
    other = build_model(cfg)
    arrays = weights.get_trainable(model)

    weights.set_trainable(other, arrays)

    assert len(arrays) == len(model.trainable_weights)
    for mine, theirs in zip(arrays, weights.get_trainable(other), strict=True):
        np.testing.assert_array_equal(mine, theirs)
    # Frozen layers differ (independent random init), so outputs differ until they are copied.
    frozen = [w.numpy() for w in model.non_trainable_weights]
    for variable, value in zip(other.non_trainable_weights, frozen, strict=True):
        variable.assign(value)
    np.testing.assert_allclose(model(images).numpy(), other(images).numpy(), atol=1e-6)


def test_get_trainable_returns_copies(model):
    arrays = weights.get_trainable(model)
    arrays[0][...] = 123.0

    assert not np.any(model.trainable_weights[0].numpy() == 123.0)


def test_set_trainable_rejects_wrong_count(model):
    arrays = weights.get_trainable(model)

    with pytest.raises(ModelError, match=f"expected {len(arrays)} arrays.*got {len(arrays) - 1}"):
        weights.set_trainable(model, arrays[:-1])


def test_set_trainable_rejects_wrong_shape(model):
    arrays = weights.get_trainable(model)
    expected = arrays[3].shape
    arrays[3] = np.zeros((7, 7), np.float32)

    with pytest.raises(ModelError) as info:
        weights.set_trainable(model, arrays)

    message = str(info.value)
    assert "array 3" in message
    assert str(tuple(expected)) in message
    assert "(7, 7)" in message


def test_set_trainable_rejects_nan_without_change(model):
    before = weights.get_trainable(model)
    arrays = [a + 1.0 for a in before]
    arrays[-1][0] = np.nan

    with pytest.raises(ModelError, match=f"array {len(arrays) - 1}.*NaN"):
        weights.set_trainable(model, arrays)

    for old, now in zip(before, weights.get_trainable(model), strict=True):
        np.testing.assert_array_equal(old, now)


def test_set_trainable_rejects_integer_dtype(model):
    arrays = weights.get_trainable(model)
    arrays[0] = np.zeros(arrays[0].shape, np.int32)

    with pytest.raises(ModelError, match="array 0.*floating-point"):
        weights.set_trainable(model, arrays)


def test_set_trainable_accepts_float64(model):
    arrays = [a.astype(np.float64) for a in weights.get_trainable(model)]

    weights.set_trainable(model, arrays)

    assert model.trainable_weights[0].dtype == "float32"


def test_checkpoint_round_trip(checkpoint, model, cfg, images):
    folder, metadata = checkpoint

    loaded, stored = weights.load_checkpoint(folder)

    np.testing.assert_array_equal(model(images).numpy(), loaded(images).numpy())
    for key, value in metadata.items():
        assert stored[key] == value
    assert stored["model"] == to_dict(cfg)
    assert stored["nephrolith_version"]
    assert stored["created"].endswith("+00:00")
    assert len(stored["weights_sha256"]) == 64
    assert count_params(loaded) == count_params(model)
    assert sorted(p.name for p in folder.iterdir()) == ["metadata.json", "model.weights.h5"]


def test_checkpoint_rejects_bad_metadata(tmp_path, model):
    with pytest.raises(ModelError, match="not JSON-serialisable"):
        weights.save_checkpoint(tmp_path / "a", model, {"threshold": float("nan")})
    assert not (tmp_path / "a" / "metadata.json").exists()


def test_load_missing_folder(tmp_path):
    with pytest.raises(ModelError, match="metadata file not found"):
        weights.load_checkpoint(tmp_path / "absent")


def test_load_corrupt_metadata(tmp_path, checkpoint):
    folder = _copy_checkpoint(checkpoint[0], tmp_path)
    (folder / "metadata.json").write_text("{not json", encoding="utf-8")

    with pytest.raises(ModelError, match="invalid JSON"):
        weights.load_checkpoint(folder)


def test_load_missing_weights(tmp_path, checkpoint):
    folder = _copy_checkpoint(checkpoint[0], tmp_path)
    (folder / "model.weights.h5").unlink()

    with pytest.raises(ModelError, match="weights file not found"):
        weights.load_checkpoint(folder)


def test_load_truncated_weights(tmp_path, checkpoint):
    folder = _copy_checkpoint(checkpoint[0], tmp_path)
    data = (folder / "model.weights.h5").read_bytes()
    (folder / "model.weights.h5").write_bytes(data[: len(data) // 2])

    with pytest.raises(ModelError, match="SHA-256"):
        weights.load_checkpoint(folder)


def test_load_truncated_weights_without_hash(tmp_path, checkpoint):
    folder = _copy_checkpoint(checkpoint[0], tmp_path)
    _edit_metadata(folder, lambda meta: meta.pop("weights_sha256"))
    data = (folder / "model.weights.h5").read_bytes()
    (folder / "model.weights.h5").write_bytes(data[: len(data) // 2])

    with pytest.raises(ModelError, match="do not fit the architecture|unreadable"):
        weights.load_checkpoint(folder)


def test_load_mismatched_architecture(tmp_path, checkpoint):
    folder = _copy_checkpoint(checkpoint[0], tmp_path)
    _edit_metadata(folder, lambda meta: meta["model"].update(embed_dim=32, mlp_dim=64))

    with pytest.raises(ModelError, match="do not fit the architecture"):
        weights.load_checkpoint(folder)


def test_load_invalid_model_config(tmp_path, checkpoint):
    folder = _copy_checkpoint(checkpoint[0], tmp_path)
    _edit_metadata(folder, lambda meta: meta["model"].update(depth_of_field=3))

    with pytest.raises(ModelError, match="unknown keys"):
        weights.load_checkpoint(folder)


def test_load_hub_folder_missing(tmp_path, checkpoint):
    folder = _copy_checkpoint(checkpoint[0], tmp_path)
    missing = str(tmp_path / "hub-backbone")
    _edit_metadata(
        folder, lambda meta: meta["model"].update(backbone_source="hub", hub_handle=missing)
    )

    with pytest.raises(ModelError, match="hub backbone folder .* not found"):
        weights.load_checkpoint(folder)


def test_keras_imagenet_checkpoint_loads_offline(tmp_path, monkeypatch, images):
    # Any download attempt would go to a closed local port and fail; HOME has no cache.
    from tf_keras.src.applications import convnext

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(convnext, "BASE_WEIGHTS_PATH", f"http://127.0.0.1:{port}/")
    trained_cfg = ModelConfig(
        backbone_source="keras", backbone_weights="imagenet", input_size=SIZE,
        embed_dim=64, num_heads=8, mlp_dim=128,
    )  # fmt: skip
    # Stand-in for a model trained from ImageNet weights: same graph and 0.8 freeze.
    model = build_model(replace(trained_cfg, backbone_weights="none", freeze_fraction=0.8))
    weights.save_checkpoint(tmp_path / "ckpt", model, {"model": to_dict(trained_cfg)})

    loaded, stored = weights.load_checkpoint(tmp_path / "ckpt")

    assert stored["model"]["backbone_weights"] == "imagenet"
    assert count_params(loaded) == count_params(model)
    np.testing.assert_array_equal(model(images[:1]).numpy(), loaded(images[:1]).numpy())


def _copy_checkpoint(source, tmp_path):
    folder = tmp_path / "copy"
    folder.mkdir()
    for path in source.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    return folder


def _edit_metadata(folder, edit):
    path = folder / "metadata.json"
    meta = json.loads(path.read_text(encoding="utf-8"))
    edit(meta)
    path.write_text(json.dumps(meta), encoding="utf-8")
