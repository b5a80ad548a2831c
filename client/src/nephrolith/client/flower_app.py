"""The hospital's Flower ClientApp: local training and validation; only trainable weights leave.

What a reply contains: the trainable weights (train only), the example count, loss
and validation metrics, and the site name from the SuperNode's node config plus
data-quality warnings. Images, file names and patient ids never enter a reply.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from nephrolith.common.config import ModelConfig, PreprocessConfig, TrainConfig, from_dict
from nephrolith.common.constants import NUM_EXAMPLES_KEY, PROXIMAL_MU_KEY
from nephrolith.common.errors import DataError
from nephrolith.common.logs import setup_logging
from nephrolith.common.runtime import configure_tensorflow

logger = logging.getLogger(__name__)

# Node-config keys (`flower-supernode --node-config`) and simulation keys.
DATA_DIR_KEY = "data-dir"
SITE_ID_KEY = "site-id"
CACHE_DIR_KEY = "cache-dir"
PARTITION_ID_KEY = "partition-id"

# Train/evaluate ConfigRecord keys; nephrolith.server.app.CONFIG_KEYS sends the same.
EPOCHS_KEY = "local-epochs"
BATCH_SIZE_KEY = "batch-size"
LEARNING_RATE_KEY = "learning-rate"
SEED_KEY = "seed"
MODEL_CONFIG_KEY = "model-config"
PREPROCESS_CONFIG_KEY = "preprocess-config"
TRAIN_CONFIG_KEY = "train-config"
SERVER_ROUND_KEY = "server-round"

# A site below this many training images still trains, but with a warning.
FEW_IMAGES = 20

# One Trainer and one data set per process. Building a tf_keras model for every message
# grew a Ray actor by about 0.85 GB per call in a flwr simulation, and TF never returned it.
_TRAINERS: dict[str, Any] = {}
_DATASETS: dict[tuple[str, str], SiteData] = {}


@dataclass
class SiteData:
    """Preprocessed arrays of one hospital (train and validation splits)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    warnings: list[str]


def _configs(config: ConfigRecord) -> tuple[ModelConfig, PreprocessConfig, TrainConfig]:
    def parse(key: str, cls: type) -> Any:
        if key not in config:
            raise KeyError(f"server message has no {key!r}; server and client versions differ")
        return from_dict(cls, json.loads(str(config[key])), f"server message:{key}")

    return (
        parse(MODEL_CONFIG_KEY, ModelConfig),
        parse(PREPROCESS_CONFIG_KEY, PreprocessConfig),
        parse(TRAIN_CONFIG_KEY, TrainConfig),
    )


def get_trainer(model_cfg: ModelConfig, train_cfg: TrainConfig, seed: int) -> Any:
    """Return this process's Trainer for the model, building it on first use.

    The model is built with the server's seed, so frozen weights (which never
    travel) match the server's model.
    """
    key = json.dumps([model_cfg.__repr__(), train_cfg.__repr__(), seed])
    if key not in _TRAINERS:
        configure_tensorflow()
        import tf_keras as keras

        from nephrolith.common.model import build_model
        from nephrolith.common.training import Trainer

        _TRAINERS.clear()  # a new configuration replaces the old model
        keras.utils.set_random_seed(seed)
        _TRAINERS[key] = Trainer(build_model(model_cfg), train_cfg)
    return _TRAINERS[key]


def load_site_data(
    data_dir: Path, cfg: PreprocessConfig, seed: int, cache_dir: Path | None = None
) -> SiteData:
    """Discover a hospital folder, split it by patient/group when needed and load train and val.

    Raises:
        DataError: when the folder has no usable training images.
    """
    from nephrolith.common import data

    key = (str(data_dir), json.dumps(repr(cfg)) + str(seed))
    if key in _DATASETS:
        return _DATASETS[key]
    records = data.discover(data_dir)
    if any(r.split is None for r in records):
        records = data.assign_splits(records, seed=seed)
    x_train, y_train, _ = data.load_split(records, "train", cfg, cache_dir=cache_dir)
    try:
        x_val, y_val, _ = data.load_split(records, "val", cfg, cache_dir=cache_dir)
    except DataError:
        x_val = np.zeros((0, *x_train.shape[1:]), np.float32)
        y_val = np.zeros((0,), np.int64)
    warnings = site_warnings(y_train, y_val)
    for warning in warnings:
        logger.warning("%s", warning)
    _DATASETS[key] = SiteData(x_train, y_train, x_val, y_val, warnings)
    return _DATASETS[key]


def site_warnings(y_train: np.ndarray, y_val: np.ndarray) -> list[str]:
    """Return data-quality warnings the server should see (counts only, no identifiers)."""
    warnings = []
    classes = np.unique(y_train).tolist()
    if len(classes) < 2:
        warnings.append(f"training split has a single class {classes}; it trains anyway")
    if len(y_train) < FEW_IMAGES:
        warnings.append(f"only {len(y_train)} training images (fewer than {FEW_IMAGES})")
    if len(y_val) == 0:
        warnings.append("no validation images; federated evaluation skips this site")
    elif len(np.unique(y_val)) < 2:
        warnings.append("validation split has a single class; its AUC is undefined")
    return warnings


def _site(context: Context, site_dirs: Sequence[str]) -> tuple[Path, str, Path | None]:
    """Return (data folder, site name, cache folder) from the node config."""
    node = context.node_config
    if site_dirs:
        index = int(node[PARTITION_ID_KEY])
        folder = Path(site_dirs[index])
        return folder, str(node.get(SITE_ID_KEY, folder.name)), None
    if DATA_DIR_KEY not in node:
        raise KeyError(
            f"SuperNode started without --node-config {DATA_DIR_KEY}=...; "
            "start it with nephrolith-client join"
        )
    folder = Path(str(node[DATA_DIR_KEY]))
    cache = Path(str(node[CACHE_DIR_KEY])) if CACHE_DIR_KEY in node else None
    return folder, str(node.get(SITE_ID_KEY, folder.name)), cache


def _site_record(name: str, warnings: list[str]) -> ConfigRecord:
    return ConfigRecord({SITE_ID_KEY: name, "warnings": "\n".join(warnings)})


def handle_train(msg: Message, context: Context, site_dirs: Sequence[str] = ()) -> Message:
    """Train the received global model on the local training split and return the new weights."""
    from nephrolith.common import weights

    started = time.perf_counter()
    config = msg.content["config"]
    model_cfg, pre_cfg, train_cfg = _configs(config)
    seed = int(config.get(SEED_KEY, 0))
    server_round = int(config.get(SERVER_ROUND_KEY, 0))
    folder, name, cache = _site(context, site_dirs)
    site = load_site_data(folder, pre_cfg, seed, cache)
    trainer = get_trainer(model_cfg, train_cfg, seed)
    weights.set_trainable(trainer.model, msg.content["arrays"].to_numpy_ndarrays())

    # The same seed per round in a fresh process and in a reused one, so a simulation
    # and a deployment with the same inputs produce the same weights.
    round_seed = seed + 1000 * server_round
    import tf_keras as keras

    keras.utils.set_random_seed(round_seed)
    mu = float(config.get(PROXIMAL_MU_KEY, 0.0))
    history = trainer.fit(
        site.x_train,
        site.y_train,
        int(config.get(EPOCHS_KEY, 1)),
        learning_rate=float(config.get(LEARNING_RATE_KEY, train_cfg.learning_rate)),
        proximal_mu=mu,
        patience=0,
        seed=round_seed,
    )
    metrics = MetricRecord(
        {
            NUM_EXAMPLES_KEY: int(len(site.y_train)),
            "train-loss": float(history[-1]["loss"]),
            "train-seconds": round(time.perf_counter() - started, 3),
            PROXIMAL_MU_KEY: mu,
        }
    )
    logger.info(
        "round %d: trained on %d images, loss %.4f",
        server_round,
        len(site.y_train),
        history[-1]["loss"],
    )
    content = RecordDict(
        {
            "arrays": ArrayRecord(weights.get_trainable(trainer.model)),
            "metrics": metrics,
            "site": _site_record(name, site.warnings),
        }
    )
    return Message(content=content, reply_to=msg)


def handle_evaluate(msg: Message, context: Context, site_dirs: Sequence[str] = ()) -> Message:
    """Evaluate the received global model on the local validation split."""
    from nephrolith.common import weights

    config = msg.content["config"]
    model_cfg, pre_cfg, train_cfg = _configs(config)
    seed = int(config.get(SEED_KEY, 0))
    folder, name, cache = _site(context, site_dirs)
    site = load_site_data(folder, pre_cfg, seed, cache)
    trainer = get_trainer(model_cfg, train_cfg, seed)
    weights.set_trainable(trainer.model, msg.content["arrays"].to_numpy_ndarrays())
    nan = float("nan")
    scores: dict[str, Any] = {
        "loss": nan,
        "roc_auc": nan,
        "accuracy": nan,
        "recall": nan,
        "specificity": nan,
    }
    if len(site.y_val):
        scores = trainer.evaluate(site.x_val, site.y_val)
    metrics = MetricRecord(
        {
            NUM_EXAMPLES_KEY: int(len(site.y_val)),
            "val-loss": float(scores["loss"]),
            "val-auc": float(scores["roc_auc"]),
            "val-accuracy": float(scores["accuracy"]),
            "val-sensitivity": float(scores["recall"]),
            "val-specificity": float(scores["specificity"]),
        }
    )
    content = RecordDict({"metrics": metrics, "site": _site_record(name, [])})
    return Message(content=content, reply_to=msg)


def make_client_app(site_dirs: Sequence[str] = ()) -> ClientApp:
    """Return a ClientApp; `site_dirs` maps simulation partition ids to data folders.

    Without `site_dirs` (deployment) the data folder comes from the SuperNode's
    node config key "data-dir".
    """
    client_app = ClientApp()
    dirs = tuple(site_dirs)

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        setup_logging()
        return handle_train(msg, context, dirs)

    @client_app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        setup_logging()
        return handle_evaluate(msg, context, dirs)

    return client_app


app = make_client_app()
