"""Grad-CAM explanation maps and colour overlays for the stone classifier.

Grad-CAM: Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks via
Gradient-based Localization", ICCV 2017 (arXiv:1610.02391).
"""

from __future__ import annotations

import logging
import weakref
from typing import Any

import cv2
import numpy as np
import tensorflow as tf
import tf_keras as keras

from nephrolith.common.errors import ModelError
from nephrolith.common.model import FEATURES_NAME

logger = logging.getLogger(__name__)

STONE_INDEX = 1

# One explainer (same layers and weights, two outputs) per classifier, dropped with it.
_EXPLAINERS: weakref.WeakKeyDictionary[keras.Model, keras.Model] = weakref.WeakKeyDictionary()
# Traced Grad-CAM functions per classifier and class index. Tracing once makes a
# call many times faster than running the tape eagerly (see BENCHMARKS.md).
_CAM_FUNCTIONS: weakref.WeakKeyDictionary[keras.Model, dict[int, Any]] = (
    weakref.WeakKeyDictionary()
)


def grad_cam(
    model: keras.Model, x: np.ndarray, class_index: int = STONE_INDEX
) -> tuple[np.ndarray, np.ndarray]:
    """Compute class probabilities and Grad-CAM heatmaps from one forward pass.

    The map weights each backbone channel A_c by alpha_c, the mean over (h, w) of the
    gradient of the class score with respect to A_c, and keeps ReLU(sum_c alpha_c A_c).
    For two classes the score is the log-odds logits[:, k] - logits[:, 1 - k], because
    the softmax probability of class k rises with it. Otherwise the score is logits[:, k].
    The (h, w) map is resized to the input size (bilinear) and divided by its maximum.

    Args:
        model: a model built by build_model (it has the "backbone_features" layer).
        x: images (N, S, S, 3), float 0..255, preprocessed as for prediction.
        class_index: class to explain; 1 is "stone".

    Returns:
        (probs (N,) softmax probability of class_index, heatmaps (N, S, S) float32 0..1).
        An image whose map has no positive evidence gets an all-zero heatmap.

    Raises:
        ModelError: on a wrong input shape or a model without the features layer.
    """
    x = np.asarray(x, dtype=np.float32)
    expected = tuple(model.input_shape[1:])
    if x.ndim != 4 or tuple(x.shape[1:]) != expected:
        raise ModelError(f"grad_cam: expected images (N, {expected}), got shape {x.shape}")
    num_classes = int(model.output_shape[-1])
    if not 0 <= class_index < num_classes:
        raise ModelError(
            f"grad_cam: class_index must be in 0..{num_classes - 1}, got {class_index}"
        )

    probs, cams = _cam_function(model, class_index)(tf.convert_to_tensor(x))
    probs, cams = probs.numpy(), cams.numpy()
    size = (int(x.shape[2]), int(x.shape[1]))
    heatmaps = np.stack([_upsample_normalised(cam, size) for cam in cams])
    return probs.astype(np.float32), heatmaps


def _cam_function(model: keras.Model, class_index: int) -> Any:
    """Return a traced function mapping images to (class probabilities, raw CAMs (N, h, w))."""
    functions = _CAM_FUNCTIONS.setdefault(model, {})
    if class_index in functions:
        return functions[class_index]
    explainer = _explainer(model)
    num_classes = int(model.output_shape[-1])
    spec = tf.TensorSpec([None, *model.input_shape[1:]], tf.float32)

    @tf.function(input_signature=[spec])
    def cam(images: Any) -> Any:
        with tf.GradientTape() as tape:
            features, logits = explainer(images, training=False)
            if num_classes == 2:
                score = logits[:, class_index] - logits[:, 1 - class_index]
            else:
                score = logits[:, class_index]
        grads = tape.gradient(score, features)
        probs = tf.nn.softmax(logits, axis=-1)[:, class_index]
        alpha = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
        return probs, tf.nn.relu(tf.reduce_sum(alpha * features, axis=-1))

    functions[class_index] = cam
    return cam


def _explainer(model: keras.Model) -> keras.Model:
    """Return a model sharing `model`'s layers that outputs (feature map, logits)."""
    explainer = _EXPLAINERS.get(model)
    if explainer is None:
        try:
            features = model.get_layer(FEATURES_NAME).output
        except ValueError as err:
            raise ModelError(
                f"grad_cam: model {model.name!r} has no {FEATURES_NAME!r} layer; "
                "build it with build_model()"
            ) from err
        explainer = keras.Model(model.inputs, [features, model.output], name="grad_cam")
        _EXPLAINERS[model] = explainer
    return explainer


def _upsample_normalised(cam: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize an (h, w) map to size (width, height) and scale its maximum to 1."""
    heat = cv2.resize(cam.astype(np.float32), size, interpolation=cv2.INTER_LINEAR)
    heat = np.maximum(heat, 0.0)
    peak = float(heat.max())
    if peak <= 0.0 or not np.isfinite(peak):
        return np.zeros_like(heat, dtype=np.float32)
    return (heat / peak).astype(np.float32)


def overlay(gray: np.ndarray, heat: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """Blend a heatmap in the JET colour map over a grey image.

    Args:
        gray: (H, W) uint8 image, e.g. the windowed slice shown to the reader.
        heat: (h, w) float map in 0..1; resized to (H, W) when the sizes differ.
        alpha: weight of the colour map, 0..1.

    Returns:
        (H, W, 3) uint8 RGB image.

    Raises:
        ModelError: on wrong shapes or dtypes.
    """
    gray = np.asarray(gray)
    heat = np.asarray(heat, dtype=np.float32)
    if gray.ndim != 2 or gray.dtype != np.uint8:
        raise ModelError(
            f"overlay: expected a 2-D uint8 image, got shape {gray.shape}, dtype {gray.dtype}"
        )
    if heat.ndim != 2:
        raise ModelError(f"overlay: expected a 2-D heatmap, got shape {heat.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise ModelError(f"overlay: alpha must be in 0..1, got {alpha}")

    if heat.shape != gray.shape:
        heat = cv2.resize(heat, (gray.shape[1], gray.shape[0]), interpolation=cv2.INTER_LINEAR)
    levels = np.clip(np.nan_to_num(heat) * 255.0, 0, 255).round().astype(np.uint8)
    # OpenCV colour maps come out in BGR order.
    colour = cv2.cvtColor(cv2.applyColorMap(levels, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    base = np.repeat(gray[:, :, None], 3, axis=2).astype(np.float32)
    blended = (1.0 - alpha) * base + alpha * colour.astype(np.float32)
    return np.clip(blended.round(), 0, 255).astype(np.uint8)


__all__ = ["STONE_INDEX", "grad_cam", "overlay"]
