"""ConvNeXt backbone sources (keras.applications, TF Hub, compact), depthwise patch and freezing.

Every source returns a layer named "backbone" that maps images (N, S, S, 3) in 0..255 to a
spatial feature map (N, h, w, C). ConvNeXt normalises its input with the ImageNet mean and
std itself (its first layer), so callers pass raw 0..255 RGB.

ConvNeXt: Liu et al., "A ConvNet for the 2020s", CVPR 2022 (arXiv:2201.03545).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import tf_keras as keras

from nephrolith.common.config import ModelConfig
from nephrolith.common.errors import ModelError

logger = logging.getLogger(__name__)

BACKBONE_NAME = "backbone"
KERAS_MODEL_PREFIX = "convnext_tiny"
COMPACT_MODEL_PREFIX = "compact_convnext"
CONVNEXT_TINY_NOTOP_FILE = "convnext_tiny_notop.h5"
CONVNEXT_TINY_NOTOP_URL = (
    "https://storage.googleapis.com/tensorflow/keras-applications/convnext/"
    + CONVNEXT_TINY_NOTOP_FILE
)

# ImageNet-1k channel statistics on the 0..255 scale, as keras.applications ConvNeXt uses them.
IMAGENET_MEAN_255 = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_VARIANCE_255 = ((0.229 * 255) ** 2, (0.224 * 255) ** 2, (0.225 * 255) ** 2)

# ConvNeXt's layer-scale start value (the paper's 1e-6).
LAYER_SCALE_INIT = 1e-6


@keras.saving.register_keras_serializable(package="nephrolith")
class LayerScale(keras.layers.Layer):
    """Per-channel learned scale of a ConvNeXt block's residual branch.

    Args:
        init_value: start value of every scale factor.
        **kwargs: standard Layer arguments (name, trainable, dtype).
    """

    def __init__(self, init_value: float = LAYER_SCALE_INIT, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.init_value = float(init_value)

    def build(self, input_shape: Any) -> None:  # noqa: D102
        self.gamma = self.add_weight(
            name="gamma",
            shape=(int(input_shape[-1]),),
            initializer=keras.initializers.Constant(self.init_value),
            trainable=True,
        )
        super().build(input_shape)

    def call(self, inputs: Any) -> Any:  # noqa: D102
        return inputs * self.gamma

    def get_config(self) -> dict[str, Any]:  # noqa: D102
        config = super().get_config()
        config["init_value"] = self.init_value
        return config


def build_backbone(cfg: ModelConfig, input_shape: tuple[Any, Any, int] | None = None) -> Any:
    """Build the backbone named by cfg.backbone_source, patched and frozen.

    Args:
        cfg: model configuration.
        input_shape: (height, width, 3) of the backbone input; defaults to
            (cfg.input_size, cfg.input_size, 3). Use (None, None, 3) for a backbone
            that accepts any size (export).

    Returns:
        A tf_keras Model ("keras", "compact") or hub.KerasLayer ("hub"), named "backbone".

    Raises:
        ModelError: when weights or the hub handle cannot be loaded.
    """
    shape = input_shape or (cfg.input_size, cfg.input_size, 3)
    if cfg.backbone_source == "hub":
        return build_hub_backbone(cfg.hub_handle or "", cfg.effective_freeze_fraction)

    if cfg.backbone_source == "keras":
        grouped = _build_keras_convnext_tiny(cfg.backbone_weights, shape)
        prefix = KERAS_MODEL_PREFIX
    else:
        grouped = build_compact_convnext(cfg.compact_depths, cfg.compact_dims, shape, grouped=True)
        prefix = COMPACT_MODEL_PREFIX

    # The weights are already in place: the patch copies them and transposes the kernels.
    backbone = to_depthwise(grouped, name=BACKBONE_NAME, prefix=prefix)
    freeze_first_layers(backbone, cfg.effective_freeze_fraction)
    return backbone


def _build_keras_convnext_tiny(weights: str, input_shape: tuple[Any, Any, int]) -> keras.Model:
    """Build keras.applications ConvNeXt-Tiny without its top, from the given weights source."""
    applications = keras.applications
    if weights.lower() == "none":
        return applications.ConvNeXtTiny(include_top=False, weights=None, input_shape=input_shape)

    if weights.lower() == "imagenet":
        started = time.monotonic()
        try:
            return applications.ConvNeXtTiny(
                include_top=False, weights="imagenet", input_shape=input_shape
            )
        # keras' get_file raises a bare Exception ("URL fetch failure ...") when offline.
        except Exception as err:
            raise ModelError(
                "model.backbone_weights='imagenet': downloading "
                f"{CONVNEXT_TINY_NOTOP_URL} failed after {time.monotonic() - started:.1f} s "
                f"({err}). On a machine without internet, copy {CONVNEXT_TINY_NOTOP_FILE} "
                "(112 MB) from a connected machine and set model.backbone_weights to its path, "
                "or set it to 'none' for random initialisation."
            ) from err

    path = Path(weights).expanduser()
    if not path.is_file():
        raise ModelError(
            f"model.backbone_weights: weights file {path} not found; expected 'imagenet', "
            f"'none' or the path of an existing .h5 file such as {CONVNEXT_TINY_NOTOP_FILE}"
        )
    if path.suffix.lower() != ".h5":
        raise ModelError(
            f"model.backbone_weights: {path} is not an HDF5 weights file; expected a .h5 file "
            f"such as {CONVNEXT_TINY_NOTOP_FILE}"
        )
    model = applications.ConvNeXtTiny(include_top=False, weights=None, input_shape=input_shape)
    try:
        model.load_weights(str(path))
    except (ValueError, OSError, KeyError) as err:
        raise ModelError(
            f"model.backbone_weights: {path} does not hold ConvNeXt-Tiny weights without the "
            f"classification top ({err}); use {CONVNEXT_TINY_NOTOP_FILE} or a file written by "
            "save_weights() of the same backbone"
        ) from err
    logger.info("ConvNeXt-Tiny weights loaded from %s", path.name)
    return model


def build_compact_convnext(
    depths: tuple[int, ...],
    dims: tuple[int, ...],
    input_shape: tuple[Any, Any, int],
    grouped: bool = False,
    prefix: str = COMPACT_MODEL_PREFIX,
) -> keras.Model:
    """Build a ConvNeXt with the given blocks per stage and channels per stage.

    The layer order and naming follow keras.applications ConvNeXt (pre-stem
    normalisation, 4x4 stem, 2x2 downsampling, 7x7 depthwise blocks with an inverted
    bottleneck of 4x width and layer scale). tf_keras 2.21 does not export its generic
    ConvNeXt builder, so the design is built here.

    Args:
        depths: blocks in each of the 4 stages.
        dims: channels of each of the 4 stages.
        input_shape: (height, width, 3).
        grouped: build the 7x7 convolutions as Conv2D(groups=C), as keras.applications
            does, instead of DepthwiseConv2D; used to test the depthwise patch.
        prefix: start of every layer name.

    Returns:
        A functional model with output (N, h, w, dims[-1]), h = height // 32.
    """
    layers = keras.layers
    inputs = keras.Input(shape=input_shape, name=f"{prefix}_input")
    x = layers.Normalization(
        mean=list(IMAGENET_MEAN_255),
        variance=list(IMAGENET_VARIANCE_255),
        name=f"{prefix}_prestem_normalization",
    )(inputs)

    for stage, (depth, dim) in enumerate(zip(depths, dims, strict=True)):
        # Stage 0 starts with the 4x4 patchify stem; later stages halve the resolution.
        if stage == 0:
            x = layers.Conv2D(dim, 4, strides=4, name=f"{prefix}_stem_conv")(x)
            x = layers.LayerNormalization(epsilon=1e-6, name=f"{prefix}_stem_layernorm")(x)
        else:
            name = f"{prefix}_downsampling_{stage - 1}"
            x = layers.LayerNormalization(epsilon=1e-6, name=f"{name}_layernorm")(x)
            x = layers.Conv2D(dim, 2, strides=2, name=f"{name}_conv")(x)
        for block in range(depth):
            x = _convnext_block(x, dim, f"{prefix}_stage_{stage}_block_{block}", grouped)

    outputs = layers.LayerNormalization(epsilon=1e-6, name=f"{prefix}_final_layernorm")(x)
    return keras.Model(inputs, outputs, name=prefix)


def _convnext_block(x: Any, dim: int, name: str, grouped: bool) -> Any:
    """Apply one ConvNeXt block: 7x7 depthwise conv, LN, 4x MLP with GELU, layer scale, residual."""
    layers = keras.layers
    if grouped:
        y = layers.Conv2D(dim, 7, padding="same", groups=dim, name=f"{name}_depthwise_conv")(x)
    else:
        y = layers.DepthwiseConv2D(7, padding="same", name=f"{name}_depthwise_conv")(x)
    y = layers.LayerNormalization(epsilon=1e-6, name=f"{name}_layernorm")(y)
    y = layers.Dense(4 * dim, name=f"{name}_pointwise_conv_1")(y)
    y = layers.Activation("gelu", name=f"{name}_gelu")(y)
    y = layers.Dense(dim, name=f"{name}_pointwise_conv_2")(y)
    y = LayerScale(LAYER_SCALE_INIT, name=f"{name}_layer_scale")(y)
    return layers.Add(name=f"{name}_add")([x, y])


def to_depthwise(
    model: keras.Model, name: str | None = None, prefix: str | None = None
) -> keras.Model:
    """Return a copy of a functional model with grouped 7x7 convolutions as DepthwiseConv2D.

    TF on CPU runs Conv2D(groups=C) far slower than the equivalent DepthwiseConv2D
    (ConvNeXt-Tiny at 224 px, TF 2.21, 2-core x86 CPU: 4.8 against 30 images/s), so the
    graph is rewritten through its config. Weights must be loaded into `model` first,
    because the two layers store the kernel in different layouts: (k, k, 1, C) is copied
    as (k, k, C, 1).

    Args:
        model: functional tf_keras model, with weights loaded.
        name: name of the returned model; defaults to model.name.
        prefix: when given, layers whose names lack this prefix (keras' automatic names,
            such as the final LayerNormalization and TFOpLambda adds of keras.applications
            ConvNeXt) are renamed "<prefix>_<kind>_<k>", so names do not depend on how many
            models the process built before. The input layer becomes "<prefix>_input".

    Returns:
        A new model with the same layer names (except renamed ones), weights, trainable
        flags and outputs.
    """
    config = model.get_config()
    renames = _automatic_name_renames(config, prefix) if prefix else {}
    patched = 0
    for layer_config in config["layers"]:
        # Without a build_config, layers build on their first call inside their name
        # scope, so variables keep names like "<layer>/kernel:0". Building from the
        # config gives bare "kernel:0" names, which collide in HDF5 weight files.
        layer_config.pop("build_config", None)
        if _is_grouped_depthwise(layer_config):
            layer_config["class_name"] = "DepthwiseConv2D"
            layer_config["registered_name"] = None
            layer_config["config"] = _depthwise_config(layer_config["config"])
            patched += 1
    _apply_renames(config, renames)
    config["name"] = name or model.name

    # The classes of the live layers cover custom ones (LayerScale) that keras cannot look up.
    custom_objects = {type(layer).__name__: type(layer) for layer in model.layers}
    new_model = keras.Model.from_config(config, custom_objects=custom_objects)

    for src in model.layers:
        dst = new_model.get_layer(renames.get(src.name, src.name))
        weights = src.get_weights()
        if isinstance(dst, keras.layers.DepthwiseConv2D) and not isinstance(
            src, keras.layers.DepthwiseConv2D
        ):
            weights = [np.transpose(weights[0], (0, 1, 3, 2)), *weights[1:]]
        dst.set_weights(weights)
    logger.debug("depthwise patch: %d grouped convolutions replaced in %s", patched, model.name)
    return new_model


def _is_grouped_depthwise(layer_config: dict[str, Any]) -> bool:
    """Return True for a Conv2D layer config with one group per output channel."""
    if layer_config["class_name"] != "Conv2D":
        return False
    conf = layer_config["config"]
    groups = int(conf.get("groups", 1))
    return groups > 1 and groups == int(conf["filters"])


def _depthwise_config(conv: dict[str, Any]) -> dict[str, Any]:
    """Translate a grouped Conv2D config into the equivalent DepthwiseConv2D config."""
    keep = (
        "name", "trainable", "dtype", "kernel_size", "strides", "padding", "data_format",
        "dilation_rate", "activation", "use_bias", "bias_initializer", "bias_regularizer",
        "activity_regularizer", "bias_constraint",
    )  # fmt: skip
    depthwise = {key: conv[key] for key in keep if key in conv}
    depthwise["depth_multiplier"] = 1
    depthwise["depthwise_initializer"] = conv.get("kernel_initializer")
    depthwise["depthwise_regularizer"] = conv.get("kernel_regularizer")
    depthwise["depthwise_constraint"] = conv.get("kernel_constraint")
    return depthwise


def _automatic_name_renames(config: dict[str, Any], prefix: str) -> dict[str, str]:
    """Map keras' automatic layer names (no prefix) to systematic ones."""
    renames: dict[str, str] = {}
    counts: dict[str, int] = {}
    outputs = {entry[0] for entry in config["output_layers"]}
    for layer_config in config["layers"]:
        old = layer_config["name"]
        if old.startswith(prefix):
            continue
        if layer_config["class_name"] == "InputLayer":
            kind = "input"
        elif old in outputs and layer_config["class_name"] == "LayerNormalization":
            kind = "final_layernorm"
        elif layer_config["class_name"] == "TFOpLambda":
            kind = "op_" + str(layer_config["config"].get("function", "op")).split(".")[-1]
        else:
            kind = layer_config["class_name"].lower()
        index = counts.get(kind, 0)
        counts[kind] = index + 1
        single = kind in {"input", "final_layernorm"}
        renames[old] = f"{prefix}_{kind}" if single else f"{prefix}_{kind}_{index}"
    return renames


def _apply_renames(config: dict[str, Any], renames: dict[str, str]) -> None:
    """Rename layers in a functional model config, including the references to them."""
    if not renames:
        return

    def rename_refs(value: Any) -> Any:
        # Inbound node entries are [layer_name, node_index, tensor_index, kwargs] lists.
        if isinstance(value, list):
            if value and isinstance(value[0], str) and value[0] in renames and len(value) >= 3:
                return [renames[value[0]], *[rename_refs(item) for item in value[1:]]]
            return [rename_refs(item) for item in value]
        if isinstance(value, dict):
            return {key: rename_refs(item) for key, item in value.items()}
        return value

    for layer_config in config["layers"]:
        new = renames.get(layer_config["name"])
        if new:
            layer_config["name"] = new
            layer_config["config"]["name"] = new
        layer_config["inbound_nodes"] = rename_refs(layer_config["inbound_nodes"])
    config["input_layers"] = rename_refs(config["input_layers"])
    config["output_layers"] = rename_refs(config["output_layers"])


def freeze_first_layers(backbone: keras.Model, fraction: float) -> tuple[int, int]:
    """Freeze the first `fraction` of the backbone's layers, counted from the input side.

    Args:
        backbone: functional model; its `layers` list is in topological order.
        fraction: 0..1; int(fraction * number of layers) layers are frozen.

    Returns:
        (frozen layers, frozen parameters).
    """
    n_frozen = int(fraction * len(backbone.layers))
    for layer in backbone.layers[:n_frozen]:
        layer.trainable = False
    frozen_params = sum(layer.count_params() for layer in backbone.layers[:n_frozen])
    total_params = backbone.count_params()
    logger.info(
        "backbone: %d of %d layers frozen (fraction %.2f), %d of %d parameters frozen",
        n_frozen, len(backbone.layers), fraction, frozen_params, total_params,
    )  # fmt: skip
    return n_frozen, frozen_params


def build_hub_backbone(handle: str, freeze_fraction: float) -> Any:
    """Load a TF Hub feature extractor (URL or local SavedModel folder) as a KerasLayer.

    A hub.KerasLayer is trainable or frozen as a whole. Per-layer freezing works only
    when it was applied before the SavedModel was exported (export_hub_backbone does that):
    the SavedModel then lists only the unfrozen variables as trainable. So fraction 1.0
    freezes the whole layer, and any smaller fraction trains what the SavedModel marks
    as trainable.

    NOTE: freezing part of a SavedModel exported without a baked freeze (by filtering
    the layer's trainable_weights by variable name) is not implemented.

    Args:
        handle: https URL of a TF Hub model, or a local SavedModel folder.
        freeze_fraction: 1.0 freezes the whole layer; anything smaller keeps the baked freeze.

    Raises:
        ModelError: when the folder is missing or the model cannot be loaded.
    """
    if "://" not in handle:
        folder = Path(handle).expanduser()
        if not (folder / "saved_model.pb").is_file():
            raise ModelError(
                f"model.hub_handle: {folder} is not a SavedModel folder (no saved_model.pb); "
                "pass a TF Hub URL or a folder written by export_hub_backbone()"
            )
        handle = str(folder)

    import tensorflow_hub as hub  # noqa: PLC0415 (heavy; only the hub source needs it)

    trainable = freeze_fraction < 1.0
    try:
        layer = hub.KerasLayer(handle, trainable=trainable, name=BACKBONE_NAME)
    except (OSError, ValueError, RuntimeError) as err:
        raise ModelError(
            f"model.hub_handle: loading {handle} failed ({err}); check the URL and the "
            "network, or pass a local SavedModel folder"
        ) from err

    n_trainable = len(layer.trainable_weights)
    n_total = n_trainable + len(layer.non_trainable_weights)
    if 0.0 < freeze_fraction < 1.0:
        logger.info(
            "hub backbone: freeze fraction %.2f cannot be applied per layer to a hub.KerasLayer; "
            "the freeze baked into the SavedModel applies (%d of %d variables trainable)",
            freeze_fraction, n_trainable, n_total,
        )  # fmt: skip
    else:
        logger.info(
            "hub backbone: %s (%d of %d variables trainable)",
            "frozen as a whole" if not trainable else "trainable", n_trainable, n_total,
        )  # fmt: skip
    return layer


def export_hub_backbone(cfg: ModelConfig, out_dir: Path) -> Path:
    """Build the "keras" or "compact" backbone, freeze it and save it as a SavedModel folder.

    The folder works as model.hub_handle. It accepts any input size (input shape
    (None, None, 3)), and the freeze of cfg.effective_freeze_fraction is baked in,
    because a hub.KerasLayer cannot freeze part of its layers afterwards.

    Args:
        cfg: configuration with backbone_source "keras" or "compact".
        out_dir: folder to create; must not exist yet or be empty.

    Returns:
        out_dir.

    Raises:
        ModelError: for backbone_source "hub" or a non-empty out_dir.
    """
    if cfg.backbone_source == "hub":
        raise ModelError(
            "export_hub_backbone: backbone_source 'hub' is already a SavedModel; "
            "export a 'keras' or 'compact' backbone"
        )
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ModelError(f"export_hub_backbone: {out_dir} is not empty; choose a new folder")

    backbone = build_backbone(cfg, input_shape=(None, None, 3))
    started = time.monotonic()
    backbone.save(str(out_dir), save_format="tf", include_optimizer=False)
    logger.info(
        "hub backbone exported to %s in %.1f s (%d trainable, %d frozen variables)",
        out_dir.name, time.monotonic() - started,
        len(backbone.trainable_weights), len(backbone.non_trainable_weights),
    )  # fmt: skip
    return out_dir


__all__ = [
    "BACKBONE_NAME",
    "LayerScale",
    "build_backbone",
    "build_compact_convnext",
    "build_hub_backbone",
    "export_hub_backbone",
    "freeze_first_layers",
    "to_depthwise",
]
