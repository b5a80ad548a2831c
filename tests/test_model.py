"""Classifier graph: shapes, gradients, freezing under an optimizer step, parameter counts."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

from nephrolith.common.config import ModelConfig
from nephrolith.common.model import (
    PositionalEmbedding,
    build_model,
    count_params,
    model_config_of,
    tiny_model_config,
)

SIZE = 64


@pytest.fixture(scope="module")
def cfg() -> ModelConfig:
    return replace(tiny_model_config(SIZE), freeze_fraction=0.5)


@pytest.fixture(scope="module")
def model(cfg) -> keras.Model:
    return build_model(cfg)


@pytest.fixture(scope="module")
def batch() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (3, SIZE, SIZE, 3)).astype(np.float32)
    return x, np.array([0, 1, 1])


def _loss(model: keras.Model, x: np.ndarray, labels: np.ndarray) -> tf.Tensor:
    logits = model(x, training=True)
    return tf.reduce_mean(
        keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
    )


def test_output_shape_and_finite(model, batch):
    logits = model(batch[0], training=False).numpy()

    assert logits.shape == (3, 2)
    assert np.all(np.isfinite(logits))


def test_layer_names(model):
    names = [layer.name for layer in model.layers]

    assert "backbone" in names
    assert "backbone_features" in names
    assert "logits" in names
    assert any(name.startswith("encoder_0_") for name in names)
    assert model.get_layer("encoder_0_attention").get_config()["num_heads"] == 8


def test_every_trainable_weight_gets_gradient(model, batch):
    with tf.GradientTape() as tape:
        loss = _loss(model, *batch)
    grads = tape.gradient(loss, model.trainable_weights)

    for weight, grad in zip(model.trainable_weights, grads, strict=True):
        assert grad is not None, weight.name
        assert np.all(np.isfinite(grad.numpy())), weight.name
        # The key bias adds the same value to every key of a query, which softmax
        # cancels, so its gradient is zero up to rounding.
        if "key/bias" not in weight.name:
            assert np.any(grad.numpy() != 0), weight.name


def test_optimizer_step_respects_freeze(cfg, batch):
    model = build_model(cfg)
    before = [w.numpy().copy() for w in model.weights]
    trainable_ids = {id(w) for w in model.trainable_weights}
    optimizer = keras.optimizers.AdamW(learning_rate=1e-2, weight_decay=0.05)

    with tf.GradientTape() as tape:
        loss = _loss(model, *batch)
    grads = tape.gradient(loss, model.trainable_weights)
    optimizer.apply_gradients(zip(grads, model.trainable_weights, strict=True))

    assert 0 < len(model.trainable_weights) < len(model.weights)
    for weight, old in zip(model.weights, before, strict=True):
        changed = not np.array_equal(old, weight.numpy())
        if id(weight) not in trainable_ids:
            assert not changed, f"frozen {weight.name} changed"
        elif "key/bias" not in weight.name:
            assert changed, f"trainable {weight.name} did not change"


def test_backbone_frozen_from_input_side(model):
    backbone = model.get_layer("backbone")
    flags = [layer.trainable for layer in backbone.layers]
    n_frozen = int(0.5 * len(flags))

    assert flags[:n_frozen] == [False] * n_frozen
    assert flags[n_frozen:] == [True] * (len(flags) - n_frozen)


def test_count_params_by_hand(model):
    embed, mlp, tokens, channels = 64, 128, 4, 128
    projection = channels * embed + embed
    position = tokens * embed
    attention = 4 * (embed * embed + embed)
    feed_forward = (embed * mlp + mlp) + (mlp * embed + embed)
    norms = 3 * 2 * embed
    logits = embed * 2 + 2
    expected_head = projection + position + attention + feed_forward + norms + logits

    counts = count_params(model)

    assert counts["head"] == expected_head
    assert counts["total"] == counts["backbone"] + expected_head
    assert counts["trainable"] == counts["backbone_trainable"] + expected_head
    assert 0 < counts["backbone_trainable"] < counts["backbone"]


def test_keras_backbone_skips_projection():
    cfg = ModelConfig(
        backbone_source="keras", backbone_weights="none", input_size=SIZE, num_layers=1
    )

    model = build_model(cfg)

    names = [layer.name for layer in model.layers]
    assert "token_projection" not in names
    assert model.get_layer("encoder_0_attention").get_config()["key_dim"] == 96
    counts = count_params(model)
    assert counts["backbone"] == 27_820_128
    # Random initialisation: nothing is frozen by default.
    assert counts["backbone_trainable"] == counts["backbone"]
    logits = model(np.zeros((1, SIZE, SIZE, 3), np.float32)).numpy()
    assert logits.shape == (1, 2)
    assert np.all(np.isfinite(logits))


def test_model_carries_config(model, cfg):
    assert model_config_of(model) == cfg


def test_saved_model_file_reloads(model, batch, tmp_path):
    path = tmp_path / "classifier.keras"

    model.save(str(path))
    reloaded = keras.models.load_model(str(path))

    np.testing.assert_array_equal(model(batch[0]).numpy(), reloaded(batch[0]).numpy())


def test_positional_embedding_config_round_trip():
    layer = PositionalEmbedding(initializer_stddev=0.5, name="pos")

    clone = keras.layers.deserialize(keras.layers.serialize(layer))

    assert isinstance(clone, PositionalEmbedding)
    assert clone.initializer_stddev == 0.5
    assert clone.name == "pos"
