"""Local training of the stone classifier: AdamW, cosine schedule, FedProx term, early stopping."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from nephrolith.common.config import TrainConfig
from nephrolith.common.errors import DataError

logger = logging.getLogger(__name__)

EpochCallback = Callable[[dict[str, Any]], None]


def class_weights(labels: np.ndarray, num_classes: int = 2) -> np.ndarray:
    """Return inverse-frequency class weights that average to 1 over the examples.

    A class absent from `labels` gets weight 0, so it cannot affect the loss.

    Args:
        labels: integer class labels, shape (N,).
        num_classes: number of classes.
    """
    counts = np.bincount(labels.astype(np.int64), minlength=num_classes).astype(np.float64)
    present = counts > 0
    weights = np.zeros(num_classes, dtype=np.float64)
    weights[present] = len(labels) / (present.sum() * counts[present])
    return weights.astype(np.float32)


def cosine_lr(step: int, total_steps: int, peak: float, warmup_steps: int) -> float:
    """Return the learning rate of a linear warm-up followed by a cosine decay to 0."""
    if warmup_steps > 0 and step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return 0.5 * peak * (1.0 + math.cos(math.pi * progress))


def predict_logits(model: Any, x: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Run the model in inference mode and return logits, shape (N, num_classes)."""
    import tensorflow as tf

    outputs = []
    for start in range(0, len(x), batch_size):
        batch = tf.convert_to_tensor(x[start : start + batch_size], dtype=tf.float32)
        outputs.append(model(batch, training=False).numpy())
    if not outputs:
        return np.zeros((0, model.output_shape[-1]), dtype=np.float32)
    return np.concatenate(outputs, axis=0)


def predict_probs(model: Any, x: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Return the stone probability softmax(logits)[:, 1] per image, shape (N,)."""
    logits = predict_logits(model, x, batch_size)
    return softmax(logits)[:, 1]


def softmax(logits: np.ndarray) -> np.ndarray:
    """Return the row-wise softmax of a logits array, computed stably in float64."""
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)


class Trainer:
    """Trains one model in place; build it once per process and call `fit` many times.

    Each `fit` call starts with fresh optimizer state, which is what a federated
    round needs (the received global weights are the starting point). With
    `proximal_mu > 0` the loss adds the FedProx term mu/2 * ||w - w_global||^2
    over the trainable weights, where w_global are the weights at the start of
    the call (Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020).
    """

    def __init__(self, model: Any, cfg: TrainConfig) -> None:
        import tensorflow as tf
        import tf_keras as keras

        self.model = model
        self.cfg = cfg
        self._trainable = model.trainable_weights
        self._anchor = [tf.Variable(w, trainable=False) for w in self._trainable]
        self._mu = tf.Variable(0.0, trainable=False, dtype=tf.float32)
        self._class_weight = tf.Variable(tf.ones([model.output_shape[-1]]), trainable=False)
        self.optimizer = keras.optimizers.AdamW(
            learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay
        )
        # Norm scales, biases and the positional embedding are not decayed.
        self.optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta", "pos_embed"])
        self._fit_calls = 0
        self._step = self._make_step()

    def _make_step(self) -> Callable[..., Any]:
        import tensorflow as tf

        spec = [
            tf.TensorSpec([None, *self.model.input_shape[1:]], tf.float32),
            tf.TensorSpec([None], tf.int64),
        ]

        @tf.function(input_signature=spec)
        def step(x: Any, y: Any) -> Any:
            with tf.GradientTape() as tape:
                logits = self.model(x, training=True)
                per_example = tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits)
                weights = tf.gather(self._class_weight, y)
                loss = tf.reduce_sum(per_example * weights) / tf.maximum(
                    tf.reduce_sum(weights), 1e-6
                )
                prox = tf.add_n(
                    [
                        tf.reduce_sum(tf.square(w - a))
                        for w, a in zip(self._trainable, self._anchor, strict=True)
                    ]
                )
                total = loss + 0.5 * self._mu * prox
            grads = tape.gradient(total, self._trainable)
            self.optimizer.apply_gradients(zip(grads, self._trainable, strict=True))
            return loss, total

        return step

    def objective_gradients(
        self, x: np.ndarray, y: np.ndarray, proximal_mu: float
    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Return the gradients of the data loss and of the FedProx objective, unapplied.

        The anchor is whatever the last `fit` call started from (or the initial
        weights). The difference of the two lists is mu * (w - w_global) per
        weight, which the tests compare with the formula.
        """
        import tensorflow as tf

        weights = class_weights(y) if self.cfg.class_weighting == "balanced" else np.ones(2)
        with tf.GradientTape(persistent=True) as tape:
            logits = self.model(tf.convert_to_tensor(x, tf.float32), training=False)
            per_example = tf.nn.sparse_softmax_cross_entropy_with_logits(
                tf.convert_to_tensor(y, tf.int64), logits
            )
            w = tf.gather(tf.constant(weights, tf.float32), tf.convert_to_tensor(y, tf.int64))
            loss = tf.reduce_sum(per_example * w) / tf.maximum(tf.reduce_sum(w), 1e-6)
            prox = tf.add_n(
                [
                    tf.reduce_sum(tf.square(v - a))
                    for v, a in zip(self._trainable, self._anchor, strict=True)
                ]
            )
            total = loss + 0.5 * proximal_mu * prox
        data_grads = [g.numpy() for g in tape.gradient(loss, self._trainable)]
        total_grads = [g.numpy() for g in tape.gradient(total, self._trainable)]
        del tape
        return data_grads, total_grads

    def set_anchor(self) -> None:
        """Make the current trainable weights the FedProx anchor w_global."""
        for anchor, weight in zip(self._anchor, self._trainable, strict=True):
            anchor.assign(weight)

    def _reset_optimizer(self) -> None:
        import tensorflow as tf

        for var in self.optimizer.variables:
            var.assign(tf.zeros_like(var))

    def fit(
        self,
        x: np.ndarray,
        y: np.ndarray,
        epochs: int | None = None,
        *,
        learning_rate: float | None = None,
        proximal_mu: float = 0.0,
        val: tuple[np.ndarray, np.ndarray] | None = None,
        patience: int | None = None,
        on_epoch: EpochCallback | None = None,
        seed: int | None = None,
    ) -> list[dict[str, Any]]:
        """Train on (x, y) and return one history entry per epoch.

        Args:
            x: images (N, S, S, 3) float32 in 0..255.
            y: labels (N,) in {0, 1}.
            epochs: epochs to run; defaults to cfg.epochs.
            learning_rate: peak learning rate; defaults to cfg.learning_rate.
            proximal_mu: FedProx coefficient; 0 gives plain local training.
            val: optional validation (x, y); adds val_loss and val_auc to the history.
            patience: early-stopping patience on val_auc; defaults to cfg.patience when
                `val` is given, and the best weights are restored at the end.
            on_epoch: called with each history entry as it is produced.
            seed: seed of shuffling and augmentation for this call. By default it is
                derived from cfg.seed and the number of earlier calls, so repeated
                calls differ. A federated round passes its own seed, so a fresh process
                and a reused one shuffle identically.

        Raises:
            DataError: when x is empty or x and y differ in length.
        """
        import tensorflow as tf

        if len(x) == 0:
            raise DataError("training split is empty: no images to train on; check the manifest")
        if len(x) != len(y):
            raise DataError(f"training data: {len(x)} images but {len(y)} labels")
        epochs = epochs or self.cfg.epochs
        peak = learning_rate or self.cfg.learning_rate
        patience = self.cfg.patience if patience is None else patience
        if val is not None and len(np.unique(val[1])) < 2:
            logger.warning(
                "validation split has a single class: validation AUC is undefined, so "
                "early stopping is off and the last epoch's weights are kept"
            )
            patience = 0
        if len(np.unique(y)) < 2:
            logger.warning(
                "training split has a single class (%s): the model can only learn a prior",
                np.unique(y).tolist(),
            )

        # Anchor for FedProx: the weights this call starts from.
        self.set_anchor()
        self._mu.assign(float(proximal_mu))
        weights = class_weights(y) if self.cfg.class_weighting == "balanced" else np.ones(2)
        self._class_weight.assign(weights.astype(np.float32))
        self._reset_optimizer()

        if seed is None:
            seed = self.cfg.seed + 7919 * self._fit_calls
        rng = np.random.default_rng(seed)
        self._fit_calls += 1
        batch = self.cfg.batch_size
        steps_per_epoch = math.ceil(len(x) / batch)
        total_steps = steps_per_epoch * epochs
        warmup = min(self.cfg.warmup_epochs * steps_per_epoch, total_steps // 2)

        history: list[dict[str, Any]] = []
        best_auc, best_weights, stale = -1.0, None, 0
        step_index = 0
        for epoch in range(1, epochs + 1):
            started = time.perf_counter()
            order = rng.permutation(len(x))
            losses = []
            for start in range(0, len(x), batch):
                idx = order[start : start + batch]
                xb = x[idx]
                if self.cfg.augment:
                    from nephrolith.common import dip

                    xb = dip.augment_batch(xb, rng)
                self.optimizer.learning_rate.assign(
                    cosine_lr(step_index, total_steps, peak, warmup)
                )
                loss, _ = self._step(
                    tf.convert_to_tensor(xb, tf.float32), tf.convert_to_tensor(y[idx], tf.int64)
                )
                losses.append(float(loss))
                step_index += 1
            entry: dict[str, Any] = {
                "epoch": epoch,
                "loss": float(np.mean(losses)),
                "seconds": round(time.perf_counter() - started, 3),
                "images_per_s": round(len(x) / max(time.perf_counter() - started, 1e-9), 2),
            }
            if not np.isfinite(entry["loss"]):
                raise FloatingPointError(
                    f"training loss became {entry['loss']} at epoch {epoch}; "
                    "lower the learning rate"
                )

            # Validation and early stopping on AUC.
            if val is not None:
                scores = self.evaluate(*val)
                entry["val_loss"] = scores["loss"]
                entry["val_auc"] = scores["roc_auc"]
                auc = scores["roc_auc"] if scores["roc_auc"] == scores["roc_auc"] else -1.0
                if auc > best_auc:
                    best_auc, stale = auc, 0
                    best_weights = [w.numpy() for w in self.model.weights]
                else:
                    stale += 1
            history.append(entry)
            logger.info(
                "epoch %d/%d: loss %.4f%s (%.1f img/s)",
                epoch,
                epochs,
                entry["loss"],
                f", val_auc {entry['val_auc']:.4f}" if "val_auc" in entry else "",
                entry["images_per_s"],
            )
            if on_epoch is not None:
                on_epoch(entry)
            if val is not None and patience > 0 and stale >= patience:
                logger.info("early stopping after epoch %d: no val AUC gain in %d", epoch, patience)
                break

        if best_weights is not None:
            self.model.set_weights(best_weights)
        return history

    def evaluate(self, x: np.ndarray, y: np.ndarray, threshold: float = 0.5) -> dict[str, Any]:
        """Return the unweighted cross-entropy and binary metrics of the model on (x, y)."""
        from nephrolith.common import metrics

        logits = predict_logits(self.model, x, self.cfg.batch_size * 2)
        probs = softmax(logits)
        picked = np.clip(probs[np.arange(len(y)), y.astype(np.int64)], 1e-7, 1.0)
        loss = float(-np.mean(np.log(picked))) if len(y) else float("nan")
        result = metrics.binary_metrics(y.astype(np.int64), probs[:, 1], threshold)
        result["loss"] = loss
        return result
