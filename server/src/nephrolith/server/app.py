"""The Flower ServerApp: initial model, strategy, server-side evaluation and global checkpoints."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from nephrolith.common.config import to_dict
from nephrolith.common.constants import CLASS_NAMES
from nephrolith.common.logs import setup_logging
from nephrolith.common.runtime import configure_tensorflow
from nephrolith.server.roundlog import RoundLog, clean_json
from nephrolith.server.settings import CHECKPOINTS_DIR, RunSettings, load_settings
from nephrolith.server.strategy import make_strategy

logger = logging.getLogger(__name__)

# Run-config key naming the run folder (see flwr_app/pyproject.toml).
RUN_DIR_KEY = "run-dir"

# Keys of the train/evaluate ConfigRecord; nephrolith.client.flower_app reads the same keys.
CONFIG_KEYS = {
    "epochs": "local-epochs",
    "batch_size": "batch-size",
    "learning_rate": "learning-rate",
    "seed": "seed",
    "model": "model-config",
    "preprocess": "preprocess-config",
    "train": "train-config",
}

# Metric the best checkpoint is chosen on (aggregated federated validation AUC).
BEST_METRIC = "val-auc"


def build_initial_model(settings: RunSettings) -> Any:
    """Build the global model from ModelConfig with a fixed seed, never from pooled data.

    Every hospital builds the same architecture with the same seed, so weights that
    do not travel (frozen backbone layers) are identical everywhere.
    """
    configure_tensorflow()
    import tf_keras as keras

    from nephrolith.common.model import build_model

    keras.utils.set_random_seed(settings.fed.seed)
    return build_model(settings.model)


def round_config(settings: RunSettings, train: bool) -> ConfigRecord:
    """Return the ConfigRecord sent to the hospitals with every train or evaluate message."""
    values: dict[str, Any] = {
        CONFIG_KEYS["seed"]: settings.fed.seed,
        CONFIG_KEYS["model"]: json.dumps(to_dict(settings.model)),
        CONFIG_KEYS["preprocess"]: json.dumps(to_dict(settings.preprocess)),
        CONFIG_KEYS["train"]: json.dumps(to_dict(settings.train)),
    }
    if train:
        values[CONFIG_KEYS["epochs"]] = settings.fed.local_epochs
        values[CONFIG_KEYS["batch_size"]] = settings.fed.batch_size
        values[CONFIG_KEYS["learning_rate"]] = settings.fed.learning_rate
    return ConfigRecord(values)


def _load_server_data(settings: RunSettings) -> tuple[np.ndarray, np.ndarray] | None:
    if not settings.server_data:
        return None
    from nephrolith.common import data

    records = data.discover(Path(settings.server_data))
    split = None if settings.server_split == "all" else settings.server_split
    x, y, _ = data.load_split(records, split, settings.preprocess)
    logger.info("server-side evaluation on %d images (%s split)", len(y), settings.server_split)
    return x, y


class RoundEnd:
    """Evaluate-fn for Strategy.start: server-side evaluation, checkpoints and round_end.

    Strategy.start calls it with round 0 before training and after every round,
    once the federated evaluation of that round is aggregated.
    """

    def __init__(self, settings: RunSettings, model: Any, strategy: Any, log: RoundLog) -> None:
        self.settings = settings
        self.model = model
        self.strategy = strategy
        self.log = log
        self.server_data = _load_server_data(settings)
        self.best_score = -np.inf
        self.started = time.time()

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Evaluate the global model on the server data and save the checkpoints."""
        from nephrolith.common import weights

        weights.set_trainable(self.model, arrays.to_numpy_ndarrays())
        server_metrics = self._server_evaluate(server_round)
        if server_round == 0:
            return server_metrics

        federated = self.strategy.evaluate_metrics.get(server_round, {})
        metric, score = BEST_METRIC, federated.get(BEST_METRIC)
        if score is None or not np.isfinite(score):
            # No hospital had both classes in its validation split this round. The
            # server's data may select the best model only when it is not the test
            # split: choosing a checkpoint on test data would bias its test score.
            metric, score = "server-auc", float("nan")
            if self.settings.server_split != "test":
                score = (server_metrics or {}).get("server-auc", float("nan"))
            else:
                logger.warning(
                    "round %d: no validation AUC from the hospitals; the best checkpoint "
                    "is not updated because the server evaluates on its test split",
                    server_round,
                )
        self._save(server_round, "last", federated, server_metrics, (metric, score))
        if np.isfinite(score) and score > self.best_score:
            self.best_score = float(score)
            self._save(server_round, "best", federated, server_metrics, (metric, score))
        self.log.write(
            "round_end", round=server_round, seconds=round(time.time() - self.started, 3)
        )
        return server_metrics

    def _server_evaluate(self, server_round: int) -> MetricRecord | None:
        if self.server_data is None:
            return None
        from nephrolith.common import metrics
        from nephrolith.common.training import predict_probs

        x, y = self.server_data
        probs = predict_probs(self.model, x)
        scores = metrics.binary_metrics(y, probs, self.settings.threshold)
        record = MetricRecord(
            {
                "server-auc": float(scores["roc_auc"]),
                "server-accuracy": float(scores["accuracy"]),
                "server-sensitivity": float(scores["recall"]),
                "server-specificity": float(scores["specificity"]),
                "num-examples": int(len(y)),
            }
        )
        self.log.write("server_evaluate", round=server_round, metrics=dict(record))
        logger.info("round %d: server-side AUC %.4f", server_round, scores["roc_auc"])
        return record

    def _save(
        self, server_round: int, kind: str, federated: dict, server: Any, score: tuple[str, float]
    ) -> None:
        from nephrolith.common import weights

        settings = self.settings
        folder = settings.path / CHECKPOINTS_DIR / kind
        metadata = clean_json(
            {
                "preprocess": to_dict(settings.preprocess),
                "class_names": list(CLASS_NAMES),
                "threshold": settings.threshold,
                "provenance": {
                    "kind": f"federated-{kind}",
                    "strategy": settings.fed.strategy,
                    "proximal_mu": settings.fed.proximal_mu
                    if settings.fed.strategy == "fedprox"
                    else 0.0,
                    "round": server_round,
                    "rounds": settings.fed.num_rounds,
                    "sites": sorted(set(self.strategy.sites.values())),
                    "fed": to_dict(settings.fed),
                    "train": to_dict(settings.train),
                    "val_metrics": federated,
                    "server_metrics": dict(server) if server is not None else None,
                },
            }
        )
        weights.save_checkpoint(folder, self.model, metadata)
        self.log.write(
            "checkpoint",
            round=server_round,
            kind=kind,
            path=str(folder),
            metric=score[0],
            score=score[1],
        )


def run_federation(grid: Grid, settings: RunSettings) -> Any:
    """Run the configured number of rounds on `grid` and return Flower's Result."""
    log = RoundLog(settings.round_log)
    model = build_initial_model(settings)
    from nephrolith.common import weights

    initial = ArrayRecord(weights.get_trainable(model))
    strategy = make_strategy(
        settings.fed.strategy,
        log,
        proximal_mu=settings.fed.proximal_mu,
        min_clients=settings.fed.min_clients,
        fraction_train=settings.fed.fraction_train,
        dump_dir=settings.path / "replies" if settings.dump_replies else None,
    )
    log.write(
        "run_start",
        strategy=settings.fed.strategy,
        num_rounds=settings.fed.num_rounds,
        min_clients=settings.fed.min_clients,
        fed=to_dict(settings.fed),
        model=to_dict(settings.model),
        arrays=len(initial),
        bytes_per_update=initial.count_bytes(),
    )
    round_end = RoundEnd(settings, model, strategy, log)
    try:
        result = strategy.start(
            grid=grid,
            initial_arrays=initial,
            num_rounds=settings.fed.num_rounds,
            timeout=settings.fed.round_timeout_s,
            train_config=round_config(settings, train=True),
            evaluate_config=round_config(settings, train=False),
            evaluate_fn=round_end,
        )
    except Exception as err:
        log.write("run_end", status="failed", reason=f"{type(err).__name__}: {err}")
        raise
    log.write("run_end", status="completed", best_score=clean_json(round_end.best_score))
    return result


def make_server_app(settings: RunSettings | None = None) -> ServerApp:
    """Return a ServerApp; without `settings` it reads federation.json from the run-config folder.

    The simulation passes its settings directly because flwr 1.39's
    `run_simulation` gives the ServerApp an empty run config.
    """
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        setup_logging()
        resolved = settings
        if resolved is None:
            if RUN_DIR_KEY not in context.run_config:
                raise KeyError(
                    f"run config has no {RUN_DIR_KEY!r}; start runs with nephrolith-server"
                )
            resolved = load_settings(Path(str(context.run_config[RUN_DIR_KEY])))
        run_federation(grid, resolved)

    return server_app


app = make_server_app()
