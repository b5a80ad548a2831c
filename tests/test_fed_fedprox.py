"""FedProx: the proximal gradient by formula, and the ClientApp passing mu to training."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, Metadata, RecordDict

from nephrolith.common.config import TrainConfig, to_dict


def _one_layer_model():
    import tf_keras as keras

    inputs = keras.Input(shape=(2,))
    logits = keras.layers.Dense(2, name="logits")(inputs)
    return keras.Model(inputs, logits)


def test_proximal_gradient_is_mu_times_distance_to_global():
    from nephrolith.common.training import Trainer

    # Prepare: anchor (the received global model) with known weights, then move away by delta.
    model = _one_layer_model()
    trainer = Trainer(model, TrainConfig(class_weighting="none", augment=False, batch_size=4))
    w_global = [np.array([[0.1, 0.2], [0.3, 0.4]], np.float32), np.array([0.0, 0.0], np.float32)]
    delta = [np.array([[1.0, -1.0], [0.5, 0.0]], np.float32), np.array([0.2, -0.2], np.float32)]
    model.set_weights(w_global)
    trainer.set_anchor()
    model.set_weights([g + d for g, d in zip(w_global, delta, strict=True)])
    x = np.array([[1.0, 2.0], [0.5, -1.0], [3.0, 0.0]], np.float32)
    y = np.array([0, 1, 1])

    # Execute
    mu = 0.5
    data_grads, total_grads = trainer.objective_gradients(x, y, proximal_mu=mu)

    # Assert: d/dw [mu/2 ||w - w_global||^2] = mu (w - w_global) = 0.5 * delta.
    np.testing.assert_allclose(
        total_grads[0] - data_grads[0], [[0.5, -0.5], [0.25, 0.0]], atol=1e-6
    )
    np.testing.assert_allclose(total_grads[1] - data_grads[1], [0.1, -0.1], atol=1e-6)

    # The data gradient itself matches the softmax cross-entropy formula (mean over 3 examples).
    w, b = model.get_weights()
    logits = x @ w + b
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    dlogits = (probs - np.eye(2)[y]) / len(y)
    np.testing.assert_allclose(data_grads[0], x.T @ dlogits, atol=1e-5)
    np.testing.assert_allclose(data_grads[1], dlogits.sum(axis=0), atol=1e-5)


def _message(arrays: list[np.ndarray], config: dict) -> Message:
    metadata = Metadata(
        run_id=1,
        message_id="m1",
        src_node_id=0,
        dst_node_id=5,
        reply_to_message_id="",
        group_id="",
        created_at=time.time(),
        ttl=600.0,
        message_type=MessageType.TRAIN,
    )
    content = RecordDict({"arrays": ArrayRecord(arrays), "config": ConfigRecord(config)})
    return Message(content=content, metadata=metadata)


@pytest.fixture(scope="module")
def tiny_site(tmp_path_factory, islam_subset) -> Path:
    from nephrolith.server.simulation import prepare_sites

    out = tmp_path_factory.mktemp("prox")
    folders, _ = prepare_sites(islam_subset, out, 1, "iid", seed=0, limit=24)
    return folders[0]


@pytest.mark.slow
def test_client_app_passes_proximal_mu_to_training(tiny_site):
    from nephrolith.client import flower_app
    from nephrolith.common import weights
    from nephrolith.common.config import PreprocessConfig
    from nephrolith.common.model import tiny_model_config

    # Prepare: the same global model and data, trained once without and once with a large mu.
    model_cfg = tiny_model_config(32)
    train_cfg = TrainConfig(augment=False, batch_size=8, learning_rate=3e-3, seed=0)
    config = {
        "model-config": json.dumps(to_dict(model_cfg)),
        "preprocess-config": json.dumps(to_dict(PreprocessConfig(image_size=32))),
        "train-config": json.dumps(to_dict(train_cfg)),
        "local-epochs": 2,
        "batch-size": 8,
        "learning-rate": 3e-3,
        "seed": 0,
        "server-round": 1,
    }
    trainer = flower_app.get_trainer(model_cfg, train_cfg, 0)
    start = weights.get_trainable(trainer.model)
    context = Context(
        run_id=1,
        node_id=5,
        node_config={"data-dir": str(tiny_site)},
        state=RecordDict(),
        run_config={},
    )

    # Execute
    replies = {}
    for mu in (0.0, 50.0):
        reply = flower_app.handle_train(_message(start, {**config, "proximal-mu": mu}), context)
        replies[mu] = reply

    # Assert: the reply echoes mu, and the proximal pull keeps the update closer to the start.
    def distance(reply: Message) -> float:
        new = reply.content["arrays"].to_numpy_ndarrays()
        return float(np.sqrt(sum(np.sum((n - s) ** 2) for n, s in zip(new, start, strict=True))))

    assert replies[50.0].content["metrics"]["proximal-mu"] == 50.0
    assert replies[0.0].content["metrics"]["num-examples"] > 0
    assert distance(replies[50.0]) < 0.8 * distance(replies[0.0])
    assert replies[0.0].content["site"]["site-id"] == tiny_site.name
    # Nothing but weights, counts/metrics and the site record goes back.
    assert set(replies[0.0].content.keys()) == {"arrays", "metrics", "site"}
