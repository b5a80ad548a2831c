"""Backbone sources: depthwise patch, freezing, keras weights files, offline ImageNet, hub."""

from __future__ import annotations

import socket
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

from nephrolith.common import backbones
from nephrolith.common.config import ModelConfig
from nephrolith.common.errors import ModelError
from nephrolith.common.model import build_model, count_params, tiny_model_config

DEPTHS = (1, 1, 2, 1)
DIMS = (16, 32, 64, 128)
SIZE = 64


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(0).uniform(0, 255, (2, SIZE, SIZE, 3)).astype(np.float32)


def _grouped_convs(model: keras.Model) -> list[str]:
    return [
        layer.name
        for layer in model.layers
        if type(layer) is keras.layers.Conv2D and layer.groups > 1
    ]


def _depthwise_convs(model: keras.Model) -> list[str]:
    return [layer.name for layer in model.layers if isinstance(layer, keras.layers.DepthwiseConv2D)]


def test_depthwise_patch_matches_grouped(images):
    grouped = backbones.build_compact_convnext(DEPTHS, DIMS, (SIZE, SIZE, 3), grouped=True)
    # Random layer-scale values, so the residual branches contribute to the output.
    for layer in grouped.layers:
        if isinstance(layer, backbones.LayerScale):
            layer.set_weights([np.random.default_rng(1).normal(size=layer.gamma.shape)])

    patched = backbones.to_depthwise(grouped, name="backbone")

    assert len(_grouped_convs(grouped)) == sum(DEPTHS)
    assert _grouped_convs(patched) == []
    assert _depthwise_convs(patched) == _grouped_convs(grouped)
    assert [layer.name for layer in patched.layers] == [layer.name for layer in grouped.layers]
    assert patched.count_params() == grouped.count_params()
    assert patched.name == "backbone"
    diff = np.abs(grouped(images).numpy() - patched(images).numpy()).max()
    assert diff < 1e-4


def test_patched_weight_names_unique():
    patched = backbones.build_backbone(tiny_model_config(SIZE))
    names = [weight.name for weight in patched.weights]
    assert len(names) == len(set(names))
    assert all(name.startswith("compact_convnext_") for name in names)


def test_freeze_first_fraction_from_input():
    cfg = replace(tiny_model_config(SIZE), freeze_fraction=0.5)

    backbone = backbones.build_backbone(cfg)

    n_layers = len(backbone.layers)
    n_frozen = int(0.5 * n_layers)
    assert [layer.trainable for layer in backbone.layers] == (
        [False] * n_frozen + [True] * (n_layers - n_frozen)
    )
    expected_trainable = sum(layer.count_params() for layer in backbone.layers[n_frozen:])
    trainable = sum(int(np.prod(w.shape)) for w in backbone.trainable_weights)
    assert trainable == expected_trainable
    assert backbone.layers[0].name == "compact_convnext_input"


def test_freeze_fraction_edges():
    frozen_all = backbones.build_backbone(replace(tiny_model_config(SIZE), freeze_fraction=1.0))
    frozen_none = backbones.build_backbone(tiny_model_config(SIZE))

    assert frozen_all.trainable_weights == []
    # The input normalisation uses constants, not variables, so every weight trains.
    assert len(frozen_none.trainable_weights) == len(frozen_none.weights)


def test_keras_tiny_from_local_weights_file(tmp_path, images):
    source = keras.applications.ConvNeXtTiny(
        include_top=False, weights=None, input_shape=(SIZE, SIZE, 3)
    )
    weights_file = tmp_path / "convnext_tiny_notop.h5"
    source.save_weights(str(weights_file))
    cfg = ModelConfig(backbone_source="keras", backbone_weights=str(weights_file), input_size=SIZE)

    backbone = backbones.build_backbone(cfg)

    assert backbone.count_params() == 27_820_128
    assert len(backbone.layers) == 151
    assert backbone.output_shape == (None, 2, 2, 768)
    assert _grouped_convs(backbone) == []
    assert len(_depthwise_convs(backbone)) == 18
    assert all(layer.name.startswith("convnext_tiny_") for layer in backbone.layers)
    # Pretrained weights: the default freeze fraction is 0.8 (120 of 151 layers).
    assert sum(not layer.trainable for layer in backbone.layers) == 120
    diff = np.abs(source(images[:1]).numpy() - backbone(images[:1]).numpy()).max()
    assert diff < 1e-4


def test_keras_weights_path_errors(tmp_path):
    missing = tmp_path / "absent.h5"
    with pytest.raises(ModelError, match="absent.h5"):
        backbones.build_backbone(
            ModelConfig(backbone_source="keras", backbone_weights=str(missing), input_size=SIZE)
        )

    not_h5 = tmp_path / "weights.bin"
    not_h5.write_bytes(b"\0" * 16)
    with pytest.raises(ModelError, match="not an HDF5 weights file"):
        backbones.build_backbone(
            ModelConfig(backbone_source="keras", backbone_weights=str(not_h5), input_size=SIZE)
        )

    # Weights of another architecture (the compact ConvNeXt) in an .h5 file.
    other = tmp_path / "compact.h5"
    backbones.build_compact_convnext(DEPTHS, DIMS, (SIZE, SIZE, 3)).save_weights(str(other))
    with pytest.raises(ModelError, match="does not hold ConvNeXt-Tiny weights"):
        backbones.build_backbone(
            ModelConfig(backbone_source="keras", backbone_weights=str(other), input_size=SIZE)
        )


def _closed_local_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_imagenet_download_failure_is_model_error(tmp_path, monkeypatch):
    # The download goes to a closed port on this machine, and HOME points at an empty
    # folder so no cached copy of the weights is found.
    from tf_keras.src.applications import convnext

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(
        convnext, "BASE_WEIGHTS_PATH", f"http://127.0.0.1:{_closed_local_port()}/convnext/"
    )
    cfg = ModelConfig(backbone_source="keras", backbone_weights="imagenet", input_size=SIZE)

    started = time.monotonic()
    with pytest.raises(ModelError) as info:
        backbones.build_backbone(cfg)

    assert time.monotonic() - started < 30
    message = str(info.value)
    assert "convnext_tiny_notop.h5" in message
    assert "model.backbone_weights" in message


def _save_compact_savedmodel(folder: Path, freeze_fraction: float) -> keras.Model:
    backbone = backbones.build_backbone(
        replace(tiny_model_config(SIZE), freeze_fraction=freeze_fraction),
        input_shape=(None, None, 3),
    )
    backbone.save(str(folder), save_format="tf", include_optimizer=False)
    return backbone


@pytest.fixture(scope="module")
def saved_compact(tmp_path_factory) -> tuple[Path, keras.Model]:
    """A compact backbone with the first half of its layers frozen, saved as a SavedModel."""
    folder = tmp_path_factory.mktemp("hub") / "sm"
    return folder, _save_compact_savedmodel(folder, freeze_fraction=0.5)


def test_hub_savedmodel_matches_keras(saved_compact, images):
    folder, source = saved_compact

    layer = backbones.build_hub_backbone(str(folder), freeze_fraction=0.5)

    assert layer.name == "backbone"
    diff = np.abs(source(images).numpy() - layer(images).numpy()).max()
    assert diff < 1e-5
    # The freeze baked in before saving decides which variables train.
    assert sorted(w.name for w in layer.trainable_weights) == sorted(
        w.name for w in source.trainable_weights
    )
    assert len(layer.non_trainable_weights) == len(source.non_trainable_weights)


def test_hub_frozen_as_whole(saved_compact):
    folder, _ = saved_compact

    layer = backbones.build_hub_backbone(str(folder), freeze_fraction=1.0)

    assert layer.trainable_weights == []
    assert len(layer.non_trainable_weights) > 0


def test_hub_missing_folder(tmp_path):
    with pytest.raises(ModelError, match="not a SavedModel folder"):
        backbones.build_hub_backbone(str(tmp_path / "nothing"), freeze_fraction=0.0)


def test_export_hub_backbone_trains_baked_variables(tmp_path, images):
    export_cfg = replace(tiny_model_config(SIZE), freeze_fraction=0.5)
    folder = backbones.export_hub_backbone(export_cfg, tmp_path / "exported")
    reference = backbones.build_backbone(export_cfg)
    cfg = replace(tiny_model_config(SIZE), backbone_source="hub", hub_handle=str(folder))

    model = build_model(cfg)

    counts = count_params(model)
    expected = sum(int(np.prod(w.shape)) for w in reference.trainable_weights)
    assert counts["backbone_trainable"] == expected
    assert counts["backbone"] == reference.count_params()

    # One optimizer step changes the baked trainable variables and nothing frozen.
    backbone = model.get_layer("backbone")
    before = {w.name: w.numpy().copy() for w in backbone.weights}
    trainable_names = {w.name for w in backbone.trainable_weights}
    optimizer = keras.optimizers.AdamW(learning_rate=1e-2)
    with tf.GradientTape() as tape:
        logits = model(images, training=True)
        loss = tf.reduce_mean(
            keras.losses.sparse_categorical_crossentropy([0, 1], logits, from_logits=True)
        )
    grads = tape.gradient(loss, model.trainable_weights)
    optimizer.apply_gradients(zip(grads, model.trainable_weights, strict=True))

    for weight in backbone.weights:
        changed = not np.array_equal(before[weight.name], weight.numpy())
        assert changed == (weight.name in trainable_names), weight.name


def test_export_hub_rejects_non_empty_folder(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(ModelError, match="not empty"):
        backbones.export_hub_backbone(tiny_model_config(SIZE), tmp_path / "out")
