"""Tests of the local Trainer: schedule, class weights, FedProx term, loss decrease."""

from __future__ import annotations

import math

import numpy as np
import pytest

from nephrolith.common.config import TrainConfig
from nephrolith.common.training import Trainer, class_weights, cosine_lr, softmax


def _linear_model(input_size: int = 8, seed: int = 0):
    import tf_keras as keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((input_size, input_size, 3))
    pooled = keras.layers.GlobalAveragePooling2D()(inputs)
    logits = keras.layers.Dense(2, name="head")(pooled)
    return keras.Model(inputs, logits)


def test_class_weights_inverse_frequency():
    # 6 negatives, 2 positives: N / (classes * count) = 8/12 and 8/4.
    weights = class_weights(np.array([0, 0, 0, 0, 0, 0, 1, 1]))
    np.testing.assert_allclose(weights, [8 / 12, 2.0], rtol=1e-6)


def test_class_weights_missing_class_gets_zero():
    weights = class_weights(np.array([1, 1, 1]))
    np.testing.assert_allclose(weights, [0.0, 1.0])


def test_cosine_schedule_values():
    # Warm-up of 2 steps to peak 1.0, then cosine over the remaining 8 steps.
    assert cosine_lr(0, 10, 1.0, 2) == pytest.approx(0.5)
    assert cosine_lr(1, 10, 1.0, 2) == pytest.approx(1.0)
    assert cosine_lr(2, 10, 1.0, 2) == pytest.approx(1.0)
    assert cosine_lr(6, 10, 1.0, 2) == pytest.approx(0.5)
    assert cosine_lr(10, 10, 1.0, 2) == pytest.approx(0.0, abs=1e-12)


def test_softmax_rows_sum_to_one():
    probs = softmax(np.array([[0.0, 0.0], [1000.0, 0.0], [0.0, math.log(3.0)]]))
    np.testing.assert_allclose(probs, [[0.5, 0.5], [1.0, 0.0], [0.25, 0.75]], atol=1e-6)


def test_fedprox_gradient_matches_formula():
    # Prepare: anchor at the current weights, then move the weights by a known delta.
    model = _linear_model()
    trainer = Trainer(model, TrainConfig(augment=False, class_weighting="none"))
    trainer.set_anchor()
    rng = np.random.default_rng(0)
    deltas = [rng.normal(size=w.shape).astype(np.float32) for w in model.trainable_weights]
    for weight, delta in zip(model.trainable_weights, deltas, strict=True):
        weight.assign_add(delta)
    x = rng.uniform(0, 255, size=(4, 8, 8, 3)).astype(np.float32)
    y = np.array([0, 1, 0, 1])
    mu = 0.3

    # Execute
    data_grads, total_grads = trainer.objective_gradients(x, y, proximal_mu=mu)

    # Assert: d/dw [mu/2 ||w - a||^2] = mu (w - a) = mu * delta.
    for data, total, delta in zip(data_grads, total_grads, deltas, strict=True):
        np.testing.assert_allclose(total - data, mu * delta, rtol=1e-4, atol=1e-4)


def test_fedprox_keeps_weights_near_anchor():
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 255, size=(32, 8, 8, 3)).astype(np.float32)
    y = (x.mean(axis=(1, 2, 3)) > 127).astype(np.int64)
    cfg = TrainConfig(augment=False, learning_rate=0.05, warmup_epochs=0, batch_size=8)

    drifts = {}
    for mu in (0.0, 50.0):
        model = _linear_model(seed=3)
        start = [w.numpy() for w in model.trainable_weights]
        Trainer(model, cfg).fit(x, y, epochs=3, proximal_mu=mu)
        drifts[mu] = sum(
            float(np.sum((w.numpy() - s) ** 2))
            for w, s in zip(model.trainable_weights, start, strict=True)
        )

    assert drifts[50.0] < drifts[0.0]


def test_fit_lowers_loss_and_restores_best():
    rng = np.random.default_rng(2)
    x = rng.uniform(0, 255, size=(64, 8, 8, 3)).astype(np.float32)
    y = (x[:, :, :, 0].mean(axis=(1, 2)) > 127).astype(np.int64)
    model = _linear_model(seed=4)
    trainer = Trainer(model, TrainConfig(augment=False, learning_rate=0.05, batch_size=16))

    history = trainer.fit(x, y, epochs=8, val=(x, y), patience=0)

    assert history[-1]["loss"] < history[0]["loss"]
    assert all("val_auc" in entry for entry in history)
    assert trainer.evaluate(x, y)["roc_auc"] == pytest.approx(
        max(entry["val_auc"] for entry in history), abs=1e-6
    )


def test_fit_rejects_empty_split():
    from nephrolith.common.errors import DataError

    trainer = Trainer(_linear_model(), TrainConfig())
    with pytest.raises(DataError, match="empty"):
        trainer.fit(np.zeros((0, 8, 8, 3), np.float32), np.zeros((0,), np.int64), epochs=1)


def test_single_class_validation_runs_all_epochs(caplog):
    rng = np.random.default_rng(5)
    x = rng.uniform(0, 255, size=(16, 8, 8, 3)).astype(np.float32)
    y = np.array([0, 1] * 8)
    trainer = Trainer(_linear_model(seed=6), TrainConfig(augment=False, patience=1))

    with caplog.at_level("WARNING", logger="nephrolith.common.training"):
        history = trainer.fit(x, y, epochs=3, val=(x[:4], np.zeros(4, np.int64)))

    assert len(history) == 3
    assert "early stopping is off" in caplog.text


def test_loss_falls_on_real_slices(islam_subset):
    from nephrolith.common import data
    from nephrolith.common.config import PreprocessConfig
    from nephrolith.common.model import build_model, tiny_model_config

    # Prepare: 12 slices from each of 4 stone and 4 non-stone scan groups.
    chosen_groups = {"stone-g04", "stone-g05", "stone-g11", "stone-g23",
              "normal-g01", "cyst-g11", "tumor-g03", "normal-g02"}
    records, per_group = [], {}
    for record in data.discover(islam_subset):
        if record.group in chosen_groups and per_group.get(record.group, 0) < 12:
            per_group[record.group] = per_group.get(record.group, 0) + 1
            records.append(record)
    records = data.assign_splits(records, fractions=(1.0, 0.0, 0.0), seed=0, overwrite=True)
    x, y, _ = data.load_split(records, "train", PreprocessConfig(image_size=64))
    import tf_keras as keras

    keras.utils.set_random_seed(0)
    trainer = Trainer(
        build_model(tiny_model_config(64)),
        TrainConfig(augment=False, learning_rate=1e-3, batch_size=16, warmup_epochs=0),
    )

    # Execute
    history = trainer.fit(x, y, epochs=6)

    # Assert
    assert len(y) == 96
    assert history[-1]["loss"] < 0.8 * history[0]["loss"]
