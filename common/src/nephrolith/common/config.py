"""Frozen configuration dataclasses, with validation and JSON round trips."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from nephrolith.common.constants import WINDOW_PRESETS, WindowPreset
from nephrolith.common.errors import ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class PreprocessConfig:
    """DIP pipeline settings; saved in every checkpoint and applied unchanged at inference.

    Attributes:
        window: a WindowPreset name; ignored when window_center/window_width are set.
        window_center: explicit window centre in HU (DICOM WindowCenter).
        window_width: explicit window width in HU (DICOM WindowWidth).
        denoise: "none", "nlm" (non-local means) or "bilateral".
        denoise_strength: filter strength h for NLM, sigmaColor/10 for bilateral.
        clahe: apply contrast-limited adaptive histogram equalisation.
        clahe_clip_limit: CLAHE clip limit.
        clahe_tile_grid: CLAHE tiles per side.
        unsharp_amount: unsharp-mask gain; 0 turns sharpening off.
        unsharp_sigma_px: Gaussian sigma of the unsharp mask, in output pixels.
        image_size: side of the square model input in pixels.
        keep_aspect: pad to a square (True) instead of stretching (False).
    """

    window: str = WindowPreset.SOFT_TISSUE.value
    window_center: float | None = None
    window_width: float | None = None
    denoise: str = "none"
    denoise_strength: float = 5.0
    clahe: bool = True
    clahe_clip_limit: float = 2.0
    clahe_tile_grid: int = 8
    unsharp_amount: float = 0.5
    unsharp_sigma_px: float = 1.0
    image_size: int = 224
    keep_aspect: bool = True

    def __post_init__(self) -> None:
        if self.window not in {p.value for p in WindowPreset}:
            raise ConfigError(
                f"preprocess.window: expected one of {sorted(p.value for p in WindowPreset)}, "
                f"got {self.window!r}"
            )
        if (self.window_center is None) != (self.window_width is None):
            raise ConfigError("preprocess: set both window_center and window_width, or neither")
        if self.window_width is not None and self.window_width <= 0:
            raise ConfigError(f"preprocess.window_width: expected > 0 HU, got {self.window_width}")
        if self.denoise not in {"none", "nlm", "bilateral"}:
            raise ConfigError(
                f"preprocess.denoise: expected 'none', 'nlm' or 'bilateral', got {self.denoise!r}"
            )
        if not 16 <= self.image_size <= 1024:
            raise ConfigError(f"preprocess.image_size: expected 16..1024 px, got {self.image_size}")
        if self.unsharp_amount < 0:
            raise ConfigError(
                f"preprocess.unsharp_amount: expected >= 0, got {self.unsharp_amount}"
            )

    @property
    def hu_bounds(self) -> tuple[float, float]:
        """Return (hu_min, hu_max) of the effective window."""
        if self.window_center is not None and self.window_width is not None:
            center, width = self.window_center, self.window_width
        else:
            center, width = WINDOW_PRESETS[WindowPreset(self.window)]
        return center - width / 2.0, center + width / 2.0


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of the stone classifier.

    Attributes:
        backbone_source: "keras" (keras.applications ConvNeXt-Tiny), "hub" (a
            TensorFlow Hub handle: URL or local SavedModel folder) or "compact"
            (the same ConvNeXt design with fewer and narrower blocks, for tests
            and CPU experiments).
        backbone_weights: for "keras": "imagenet", "none" or a path to a weights
            file. Ignored for "hub" (the SavedModel carries its weights).
        hub_handle: URL or local folder for backbone_source "hub".
        input_size: side of the square input in pixels.
        freeze_fraction: fraction of backbone layers frozen from the input side;
            None means 0.8 with pretrained weights and 0.0 with random init.
        embed_dim: token width of the transformer encoder.
        num_heads: attention heads.
        mlp_dim: hidden width of the GELU feed-forward block.
        num_layers: transformer encoder blocks.
        dropout: dropout rate inside the encoder and before the head.
        num_classes: logits returned by the model.
        compact_depths: blocks per stage of the "compact" backbone.
        compact_dims: channels per stage of the "compact" backbone.
    """

    backbone_source: str = "keras"
    backbone_weights: str = "imagenet"
    hub_handle: str | None = None
    input_size: int = 224
    freeze_fraction: float | None = None
    embed_dim: int = 768
    num_heads: int = 8
    mlp_dim: int = 3072
    num_layers: int = 1
    dropout: float = 0.1
    num_classes: int = 2
    compact_depths: tuple[int, ...] = (1, 1, 2, 1)
    compact_dims: tuple[int, ...] = (16, 32, 64, 128)

    def __post_init__(self) -> None:
        if self.backbone_source not in {"keras", "hub", "compact"}:
            raise ConfigError(
                "model.backbone_source: expected 'keras', 'hub' or 'compact', "
                f"got {self.backbone_source!r}"
            )
        if self.backbone_source == "hub" and not self.hub_handle:
            raise ConfigError("model.hub_handle: required when backbone_source is 'hub'")
        if self.embed_dim % self.num_heads:
            raise ConfigError(
                f"model.embed_dim ({self.embed_dim}) must be divisible by "
                f"model.num_heads ({self.num_heads})"
            )
        if self.freeze_fraction is not None and not 0.0 <= self.freeze_fraction <= 1.0:
            raise ConfigError(f"model.freeze_fraction: expected 0..1, got {self.freeze_fraction}")
        if len(self.compact_depths) != 4 or len(self.compact_dims) != 4:
            raise ConfigError("model.compact_depths and model.compact_dims need 4 stages each")

    @property
    def pretrained(self) -> bool:
        """True when the backbone starts from trained weights."""
        if self.backbone_source == "hub":
            return True
        return self.backbone_source == "keras" and self.backbone_weights.lower() != "none"

    @property
    def effective_freeze_fraction(self) -> float:
        """Return the freeze fraction in force (0.8 pretrained, 0.0 random init by default)."""
        if self.freeze_fraction is not None:
            return self.freeze_fraction
        return 0.8 if self.pretrained else 0.0


@dataclass(frozen=True)
class TrainConfig:
    """Local training settings (single site, centralised, or one federated round).

    Attributes:
        epochs: maximum epochs.
        batch_size: images per step.
        learning_rate: peak AdamW learning rate.
        weight_decay: AdamW decoupled weight decay.
        warmup_epochs: linear warm-up before the cosine decay.
        patience: epochs without validation AUC gain before early stopping; 0 disables it.
        class_weighting: "balanced" reweights the loss by inverse class frequency, "none" does not.
        augment: apply training-time augmentation.
        seed: seed for shuffling, augmentation and initialisation.
    """

    epochs: int = 10
    batch_size: int = 16
    learning_rate: float = 3e-4
    weight_decay: float = 0.05
    warmup_epochs: int = 1
    patience: int = 3
    class_weighting: str = "balanced"
    augment: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError(
                "train: epochs and batch_size must be >= 1, "
                f"got {self.epochs} and {self.batch_size}"
            )
        if self.class_weighting not in {"balanced", "none"}:
            raise ConfigError(
                "train.class_weighting: expected 'balanced' or 'none', "
                f"got {self.class_weighting!r}"
            )


@dataclass(frozen=True)
class FedConfig:
    """Federation settings sent from the server to the hospitals.

    Attributes:
        strategy: "fedavg" or "fedprox".
        proximal_mu: FedProx proximal coefficient mu (ignored by FedAvg).
        num_rounds: server rounds.
        min_clients: minimum hospitals per round.
        fraction_train: fraction of connected hospitals sampled for training.
        local_epochs: epochs each hospital trains per round.
        batch_size: local batch size.
        learning_rate: local AdamW learning rate.
        round_timeout_s: seconds the server waits for replies in a round.
        seed: seed for sampling and local training.
    """

    strategy: str = "fedavg"
    proximal_mu: float = 0.01
    num_rounds: int = 3
    min_clients: int = 2
    fraction_train: float = 1.0
    local_epochs: int = 1
    batch_size: int = 16
    learning_rate: float = 3e-4
    round_timeout_s: float = 3600.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.strategy not in {"fedavg", "fedprox"}:
            raise ConfigError(
                f"fed.strategy: expected 'fedavg' or 'fedprox', got {self.strategy!r}"
            )
        if self.proximal_mu < 0:
            raise ConfigError(f"fed.proximal_mu: expected >= 0, got {self.proximal_mu}")
        if not 0.0 < self.fraction_train <= 1.0:
            raise ConfigError(f"fed.fraction_train: expected 0 < f <= 1, got {self.fraction_train}")
        if self.num_rounds < 1 or self.min_clients < 1 or self.local_epochs < 1:
            raise ConfigError("fed: num_rounds, min_clients and local_epochs must be >= 1")


def to_dict(config: Any) -> dict[str, Any]:
    """Return a JSON-ready dict of a config dataclass (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def from_dict(cls: type[T], values: dict[str, Any], where: str = "config") -> T:
    """Build a config dataclass from a dict, rejecting unknown keys.

    Args:
        cls: the dataclass type.
        values: field values; missing fields take their defaults.
        where: name of the source, used in error messages.

    Raises:
        ConfigError: on unknown keys or invalid values.
    """
    names = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ConfigError(
            f"{where}: unknown keys {unknown} for {cls.__name__}; valid keys: {sorted(names)}"
        )
    kwargs = {}
    for key, value in values.items():
        default = getattr(cls, key, None) if not callable(getattr(cls, key, None)) else None
        if isinstance(default, tuple) and isinstance(value, list):
            value = tuple(value)
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ConfigError(f"{where}: {err}") from err


def load_json(path: Path) -> dict[str, Any]:
    """Read a JSON config file.

    Raises:
        ConfigError: when the file is missing or not valid JSON.
    """
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise ConfigError(f"{path}: config file not found") from err
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: invalid JSON at line {err.lineno}: {err.msg}") from err


__all__ = [
    "FedConfig",
    "ModelConfig",
    "PreprocessConfig",
    "TrainConfig",
    "from_dict",
    "load_json",
    "to_dict",
]
