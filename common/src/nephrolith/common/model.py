"""Stone classifier: ConvNeXt backbone, transformer encoder over its spatial tokens, logits head."""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np
import tf_keras as keras

from nephrolith.common.backbones import BACKBONE_NAME, build_backbone
from nephrolith.common.config import ModelConfig, from_dict, to_dict
from nephrolith.common.errors import ModelError

logger = logging.getLogger(__name__)

INPUT_NAME = "image"
FEATURES_NAME = "backbone_features"
LOGITS_NAME = "logits"
MODEL_NAME = "nephrolith_classifier"
# Attribute on a built model containing its ModelConfig as JSON (read by weights.save_checkpoint).
CONFIG_ATTRIBUTE = "nephrolith_model_config_json"


@keras.saving.register_keras_serializable(package="nephrolith")
class PositionalEmbedding(keras.layers.Layer):
    """Learned positional embedding added to a token sequence (N, T, D).

    The table has one row per token position; T and D come from the input shape, so
    the layer must see a static sequence length.

    Args:
        initializer_stddev: standard deviation of the truncated-normal initial values.
        **kwargs: standard Layer arguments (name, trainable, dtype).
    """

    def __init__(self, initializer_stddev: float = 0.02, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.initializer_stddev = float(initializer_stddev)

    def build(self, input_shape: Any) -> None:  # noqa: D102
        num_tokens, width = input_shape[-2], input_shape[-1]
        if num_tokens is None or width is None:
            raise ModelError(
                f"{self.name}: expected a static token count and width, got shape {input_shape}"
            )
        self.embedding = self.add_weight(
            name="embedding",
            shape=(int(num_tokens), int(width)),
            initializer=keras.initializers.TruncatedNormal(stddev=self.initializer_stddev),
            trainable=True,
        )
        super().build(input_shape)

    def call(self, inputs: Any) -> Any:  # noqa: D102
        return inputs + self.embedding

    def get_config(self) -> dict[str, Any]:  # noqa: D102
        config = super().get_config()
        config["initializer_stddev"] = self.initializer_stddev
        return config


def build_model(cfg: ModelConfig) -> keras.Model:
    """Build the classifier as a functional tf_keras model.

    Graph: image (N, S, S, 3) in 0..255 -> backbone feature map (N, h, w, C) ->
    1x1 projection to embed_dim (only when C != embed_dim) -> tokens (N, h*w, embed_dim)
    + learned positional embedding -> num_layers pre-norm transformer encoder blocks ->
    LayerNorm -> global average pooling over tokens -> dropout -> Dense logits
    (N, num_classes). The model returns logits; apply softmax for probabilities.

    Layer names: "backbone" (the whole backbone), "backbone_features" (an identity on its
    output that explain.grad_cam reads), "encoder_<i>_*" per encoder block, "logits".

    Args:
        cfg: model configuration.

    Returns:
        The model; getattr(model, CONFIG_ATTRIBUTE) contains cfg as JSON.

    Raises:
        ModelError: when the backbone cannot be built or its output is not a 4-D map.
    """
    inputs = keras.Input(shape=(cfg.input_size, cfg.input_size, 3), name=INPUT_NAME)
    backbone = build_backbone(cfg)
    features = keras.layers.Activation("linear", name=FEATURES_NAME)(backbone(inputs))
    height, width, channels = _feature_map_shape(backbone, features, cfg)

    # Tokens: one per feature-map cell, projected to the encoder width when they differ.
    x = features
    if channels != cfg.embed_dim:
        x = keras.layers.Conv2D(cfg.embed_dim, 1, name="token_projection")(x)
    x = keras.layers.Reshape((height * width, cfg.embed_dim), name="tokens")(x)
    x = PositionalEmbedding(name="position_embedding")(x)
    x = keras.layers.Dropout(cfg.dropout, name="token_dropout")(x)

    for index in range(cfg.num_layers):
        x = encoder_block(x, cfg, index)

    x = keras.layers.LayerNormalization(epsilon=1e-6, name="encoder_norm")(x)
    x = keras.layers.GlobalAveragePooling1D(name="token_pool")(x)
    x = keras.layers.Dropout(cfg.dropout, name="head_dropout")(x)
    logits = keras.layers.Dense(cfg.num_classes, name=LOGITS_NAME)(x)

    model = keras.Model(inputs, logits, name=MODEL_NAME)
    setattr(model, CONFIG_ATTRIBUTE, json.dumps(to_dict(cfg)))
    counts = count_params(model)
    logger.info(
        "model built: backbone %s, %d tokens of %d dims, %d encoder blocks; "
        "%d parameters, %d trainable (%d in the backbone)",
        cfg.backbone_source, height * width, cfg.embed_dim, cfg.num_layers,
        counts["total"], counts["trainable"], counts["backbone_trainable"],
    )  # fmt: skip
    return model


def encoder_block(x: Any, cfg: ModelConfig, index: int) -> Any:
    """Apply one transformer encoder block to tokens (N, T, embed_dim).

    Pre-norm layout (as in ViT): x + MHA(LN(x)), then x + MLP(LN(x)). Pre-norm keeps
    the residual path free of normalisation, which trains more stably than post-norm
    when encoder blocks are stacked; build_model adds the final LayerNorm.

    Args:
        x: symbolic token tensor.
        cfg: model configuration (embed_dim, num_heads, mlp_dim, dropout).
        index: block number, used in the layer names "encoder_<index>_*".

    Returns:
        Symbolic tensor of the same shape.
    """
    layers = keras.layers
    name = f"encoder_{index}"
    key_dim = cfg.embed_dim // cfg.num_heads

    y = layers.LayerNormalization(epsilon=1e-6, name=f"{name}_norm_1")(x)
    y = layers.MultiHeadAttention(
        num_heads=cfg.num_heads, key_dim=key_dim, dropout=cfg.dropout, name=f"{name}_attention"
    )(y, y)
    y = layers.Dropout(cfg.dropout, name=f"{name}_attention_dropout")(y)
    x = layers.Add(name=f"{name}_add_1")([x, y])

    y = layers.LayerNormalization(epsilon=1e-6, name=f"{name}_norm_2")(x)
    y = layers.Dense(cfg.mlp_dim, activation="gelu", name=f"{name}_mlp_dense_1")(y)
    y = layers.Dropout(cfg.dropout, name=f"{name}_mlp_dropout_1")(y)
    y = layers.Dense(cfg.embed_dim, name=f"{name}_mlp_dense_2")(y)
    y = layers.Dropout(cfg.dropout, name=f"{name}_mlp_dropout_2")(y)
    return layers.Add(name=f"{name}_add_2")([x, y])


def _feature_map_shape(backbone: Any, features: Any, cfg: ModelConfig) -> tuple[int, int, int]:
    """Return the static (h, w, C) of the backbone output for cfg.input_size."""
    shape = tuple(features.shape)
    if len(shape) != 4:
        raise ModelError(
            f"backbone ({cfg.backbone_source}): expected a feature map (N, h, w, C), got "
            f"output shape {shape}; a hub handle must be a feature extractor without pooling"
        )
    if all(dim is not None for dim in shape[1:]):
        return int(shape[1]), int(shape[2]), int(shape[3])

    # A SavedModel exported with input (None, None, 3) has no static output size:
    # measure it with one zero image of the configured size.
    probe = backbone(np.zeros((1, cfg.input_size, cfg.input_size, 3), dtype=np.float32))
    _, height, width, channels = (int(dim) for dim in probe.shape)
    logger.debug("backbone output size measured: %dx%dx%d", height, width, channels)
    return height, width, channels


def model_config_of(model: keras.Model) -> ModelConfig:
    """Return the ModelConfig a model was built from by build_model.

    Raises:
        ModelError: when the model was not built by build_model.
    """
    raw = getattr(model, CONFIG_ATTRIBUTE, None)
    if raw is None:
        raise ModelError(
            f"model {model.name!r} carries no ModelConfig; build it with build_model() "
            "or pass metadata['model'] explicitly"
        )
    return from_dict(ModelConfig, json.loads(raw), where="model config")


def count_params(model: keras.Model) -> dict[str, int]:
    """Count parameters of a model built by build_model.

    Returns:
        Dict with "total", "trainable", "backbone" (all backbone parameters),
        "backbone_trainable" and "head" (everything outside the backbone: projection,
        positional embedding, encoder and logits layer).
    """
    backbone = model.get_layer(BACKBONE_NAME)
    total = _size(model.weights)
    backbone_total = _size(backbone.weights)
    return {
        "total": total,
        "trainable": _size(model.trainable_weights),
        "backbone": backbone_total,
        "backbone_trainable": _size(backbone.trainable_weights),
        "head": total - backbone_total,
    }


def _size(variables: list[Any]) -> int:
    return int(sum(int(np.prod(variable.shape)) for variable in variables))


def tiny_model_config(input_size: int = 64) -> ModelConfig:
    """Return a small configuration for tests and CPU demos (compact backbone, 64-dim encoder)."""
    return ModelConfig(
        backbone_source="compact",
        backbone_weights="none",
        input_size=input_size,
        embed_dim=64,
        num_heads=8,
        mlp_dim=128,
        num_layers=1,
        dropout=0.1,
    )


__all__ = [
    "CONFIG_ATTRIBUTE",
    "FEATURES_NAME",
    "LOGITS_NAME",
    "PositionalEmbedding",
    "build_model",
    "count_params",
    "encoder_block",
    "model_config_of",
    "tiny_model_config",
]
