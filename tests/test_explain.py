"""Grad-CAM maps and colour overlays."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

from nephrolith.common import explain
from nephrolith.common.errors import ModelError
from nephrolith.common.model import build_model, tiny_model_config

SIZE = 64


@pytest.fixture(scope="module")
def model() -> keras.Model:
    return build_model(tiny_model_config(SIZE))


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(0).uniform(0, 255, (3, SIZE, SIZE, 3)).astype(np.float32)


def test_grad_cam_shapes_and_range(model, images):
    probs, heatmaps = explain.grad_cam(model, images)

    assert probs.shape == (3,)
    assert heatmaps.shape == (3, SIZE, SIZE)
    assert heatmaps.dtype == np.float32
    assert heatmaps.min() >= 0.0
    assert heatmaps.max() <= 1.0
    for heat in heatmaps:
        assert heat.max() == pytest.approx(1.0) or heat.max() == 0.0


def test_grad_cam_probs_match_softmax(model, images):
    probs, _ = explain.grad_cam(model, images)

    expected = tf.nn.softmax(model(images, training=False), axis=-1).numpy()[:, 1]
    np.testing.assert_allclose(probs, expected, atol=1e-6)


def test_grad_cam_other_class(model, images):
    probs_stone, _ = explain.grad_cam(model, images, class_index=1)
    probs_none, _ = explain.grad_cam(model, images, class_index=0)

    np.testing.assert_allclose(probs_stone + probs_none, 1.0, atol=1e-6)


def test_grad_cam_rejects_wrong_shape(model):
    with pytest.raises(ModelError, match="expected images"):
        explain.grad_cam(model, np.zeros((2, 32, 32, 3), np.float32))
    with pytest.raises(ModelError, match="class_index"):
        explain.grad_cam(model, np.zeros((1, SIZE, SIZE, 3), np.float32), class_index=2)


def _blob_batch(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Noise images; label 1 images carry a bright disk centred in a random quadrant."""
    x = rng.normal(60, 10, (n, SIZE, SIZE)).astype(np.float32)
    labels = rng.integers(0, 2, n)
    masks = np.zeros((n, SIZE, SIZE), bool)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    for i in np.flatnonzero(labels):
        cy, cx = rng.choice([16, 48], 2)
        masks[i] = (yy - cy) ** 2 + (xx - cx) ** 2 <= 36
        x[i][masks[i]] = 250.0
    x = np.clip(x, 0, 255)
    return np.repeat(x[..., None], 3, axis=-1), labels, masks


@pytest.mark.slow
def test_grad_cam_highlights_trained_blob():
    rng = np.random.default_rng(0)
    keras.utils.set_random_seed(0)
    model = build_model(tiny_model_config(SIZE))
    optimizer = keras.optimizers.Adam(learning_rate=1e-3)

    @tf.function
    def step(x, labels):
        with tf.GradientTape() as tape:
            logits = model(x, training=True)
            loss = tf.reduce_mean(
                keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
            )
        grads = tape.gradient(loss, model.trainable_weights)
        optimizer.apply_gradients(zip(grads, model.trainable_weights, strict=True))
        return loss

    for _ in range(40):
        x, labels, _ = _blob_batch(rng, 16)
        step(x, labels)

    x, labels, masks = _blob_batch(np.random.default_rng(1), 24)
    probs, heatmaps = explain.grad_cam(model, x)

    positive = labels == 1
    assert probs[positive].mean() > 0.8
    assert probs[~positive].mean() < 0.2
    with_blob = masks.any(axis=(1, 2))
    inside = np.array([heat[mask].mean() for heat, mask in zip(heatmaps, masks, strict=True)])
    outside = np.array([heat[~mask].mean() for heat, mask in zip(heatmaps, masks, strict=True)])
    assert np.mean(inside[with_blob] > outside[with_blob]) >= 0.9


def test_overlay_colours_by_hand():
    gray = np.full((4, 4), 100, np.uint8)
    heat = np.zeros((4, 4), np.float32)
    heat[0, 0] = 1.0

    rgb = explain.overlay(gray, heat, alpha=0.4)

    assert rgb.shape == (4, 4, 3)
    assert rgb.dtype == np.uint8
    # JET maps 0 to dark blue (0, 0, 128) and 1 to dark red (128, 0, 0) in RGB:
    # 0.6 * 100 + 0.4 * 128 = 111.2 and 0.6 * 100 = 60.
    assert tuple(rgb[3, 3]) == (60, 60, 111)
    assert tuple(rgb[0, 0]) == (111, 60, 60)


def test_overlay_resizes_heatmap():
    gray = np.zeros((8, 6), np.uint8)

    rgb = explain.overlay(gray, np.ones((2, 2), np.float32), alpha=1.0)

    assert rgb.shape == (8, 6, 3)
    assert tuple(rgb[4, 3]) == (128, 0, 0)


def test_overlay_rejects_bad_input():
    with pytest.raises(ModelError, match="uint8"):
        explain.overlay(np.zeros((4, 4), np.float32), np.zeros((4, 4)))
    with pytest.raises(ModelError, match="2-D heatmap"):
        explain.overlay(np.zeros((4, 4), np.uint8), np.zeros((4, 4, 1)))
    with pytest.raises(ModelError, match="alpha"):
        explain.overlay(np.zeros((4, 4), np.uint8), np.zeros((4, 4)), alpha=1.5)
