"""Settings of one federated run, stored as federation.json in the run folder."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nephrolith.common.config import (
    FedConfig,
    ModelConfig,
    PreprocessConfig,
    TrainConfig,
    from_dict,
    load_json,
    to_dict,
)
from nephrolith.common.errors import ConfigError
from nephrolith.server.roundlog import ROUND_LOG_NAME

logger = logging.getLogger(__name__)

SETTINGS_NAME = "federation.json"
CHECKPOINTS_DIR = "checkpoints"


@dataclass(frozen=True)
class RunSettings:
    """Everything the ServerApp needs for one run.

    Attributes:
        run_dir: folder for the round log, checkpoints and federation.json.
        fed: rounds, strategy, mu, sampling, local epochs, batch size, learning rate.
        model: architecture; every hospital builds the same model from it.
        preprocess: DIP settings sent to the hospitals and stored in checkpoints.
        train: local training settings other than those in `fed` (augmentation,
            class weighting, weight decay, warm-up).
        server_data: optional folder the server evaluates the global model on each round.
        server_split: split of `server_data` to evaluate ("test", "val", or "all").
        threshold: decision threshold stored in the checkpoints.
        dump_replies: save every accepted update under run_dir/replies (audits, tests).
        site_dirs: simulation only: data folder per simulated hospital (partition id order).
    """

    run_dir: str
    fed: FedConfig = field(default_factory=FedConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    server_data: str | None = None
    server_split: str = "test"
    threshold: float = 0.5
    dump_replies: bool = False
    site_dirs: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.model.input_size != self.preprocess.image_size:
            raise ConfigError(
                f"model.input_size ({self.model.input_size}) must equal "
                f"preprocess.image_size ({self.preprocess.image_size})"
            )
        if self.server_split not in {"train", "val", "test", "all"}:
            raise ConfigError(
                f"server split: expected train, val, test or all, got {self.server_split!r}"
            )

    @property
    def path(self) -> Path:
        """The run folder as a Path."""
        return Path(self.run_dir)

    @property
    def round_log(self) -> Path:
        """The round log file."""
        return self.path / ROUND_LOG_NAME

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        return {
            "run_dir": self.run_dir,
            "fed": to_dict(self.fed),
            "model": to_dict(self.model),
            "preprocess": to_dict(self.preprocess),
            "train": to_dict(self.train),
            "server_data": self.server_data,
            "server_split": self.server_split,
            "threshold": self.threshold,
            "dump_replies": self.dump_replies,
            "site_dirs": list(self.site_dirs),
        }

    @classmethod
    def from_json(cls, values: dict[str, Any], where: str = SETTINGS_NAME) -> RunSettings:
        """Build settings from the dict written by to_json.

        Raises:
            ConfigError: on missing or invalid values.
        """
        if "run_dir" not in values:
            raise ConfigError(f"{where}: missing key 'run_dir'")
        return cls(
            run_dir=str(values["run_dir"]),
            fed=from_dict(FedConfig, values.get("fed", {}), f"{where}:fed"),
            model=from_dict(ModelConfig, values.get("model", {}), f"{where}:model"),
            preprocess=from_dict(
                PreprocessConfig, values.get("preprocess", {}), f"{where}:preprocess"
            ),
            train=from_dict(TrainConfig, values.get("train", {}), f"{where}:train"),
            server_data=values.get("server_data"),
            server_split=values.get("server_split", "test"),
            threshold=float(values.get("threshold", 0.5)),
            dump_replies=bool(values.get("dump_replies", False)),
            site_dirs=tuple(values.get("site_dirs", ())),
        )

    def save(self) -> Path:
        """Write federation.json into the run folder and return its path."""
        self.path.mkdir(parents=True, exist_ok=True)
        target = self.path / SETTINGS_NAME
        target.write_text(json.dumps(self.to_json(), indent=2) + "\n", encoding="utf-8")
        return target


def load_settings(run_dir: Path) -> RunSettings:
    """Read federation.json from a run folder.

    Raises:
        ConfigError: when the file is missing or invalid.
    """
    path = Path(run_dir) / SETTINGS_NAME
    return RunSettings.from_json(load_json(path), str(path))
