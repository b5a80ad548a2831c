"""Grouped k-fold cross-validation: each group is tested by a model that never saw it."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from nephrolith.common.config import ModelConfig, PreprocessConfig, TrainConfig, to_dict
from nephrolith.common.errors import DataError

logger = logging.getLogger(__name__)

# Fraction of a fold's training groups held out for early stopping.
VAL_FRACTION = 0.15


def cross_validate(
    data_dir: Path,
    out_dir: Path,
    *,
    model_cfg: ModelConfig,
    preprocess_cfg: PreprocessConfig,
    train_cfg: TrainConfig,
    n_folds: int = 5,
    manifest: Path | None = None,
    cache_dir: Path | None = None,
    n_boot: int = 1000,
    threshold: float = 0.5,
) -> dict[str, Any]:
    """Train one model per fold and evaluate the pooled out-of-fold predictions.

    Folds are made of whole groups (patients, or scan groups without patient
    ids), stratified by the group's label. Inside each fold's training groups,
    VAL_FRACTION of the groups serve for early stopping, so no test group ever
    influences its own model. With few groups, a single train/test split leaves a
    handful of test scans, and its AUC then depends more on which scans were drawn
    than on the model. Pooling all folds tests every group once.

    Pooled threshold metrics use the fixed `threshold` (class-balanced training
    makes 0.5 the natural operating point); ROC-AUC and PR-AUC do not depend on it.

    Returns:
        The report dict (as metrics.evaluate, plus "folds" with per-fold AUCs),
        also written with plots to out_dir.
    """
    import tf_keras as keras

    from nephrolith.common import data, metrics, report
    from nephrolith.common.model import build_model
    from nephrolith.common.training import Trainer, predict_probs

    if model_cfg.input_size != preprocess_cfg.image_size:
        model_cfg = replace(model_cfg, input_size=preprocess_cfg.image_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = data.discover(manifest if manifest is not None else data_dir)
    if not records:
        raise DataError(f"{manifest or data_dir}: no records found; run check-data first")
    folds = data.group_folds(records, n_folds, seed=train_cfg.seed)

    all_probs, all_labels, all_groups, fold_rows = [], [], [], []
    for fold in range(n_folds):
        started = time.perf_counter()

        # Split: this fold is the test set; the other folds give train and val groups.
        test = [replace(r, split="test") for r, f in zip(records, folds, strict=True) if f == fold]
        rest = [replace(r, split=None) for r, f in zip(records, folds, strict=True) if f != fold]
        rest = data.assign_splits(
            rest, fractions=(1 - VAL_FRACTION, VAL_FRACTION, 0.0), seed=train_cfg.seed + fold
        )
        x_tr, y_tr, _ = data.load_split(rest, "train", preprocess_cfg, cache_dir=cache_dir)
        x_val, y_val, _ = data.load_split(rest, "val", preprocess_cfg, cache_dir=cache_dir)
        x_te, y_te, g_te = data.load_split(test, "test", preprocess_cfg, cache_dir=cache_dir)

        # Train a fresh model with the fold's seed.
        keras.utils.set_random_seed(train_cfg.seed + fold)
        trainer = Trainer(build_model(model_cfg), train_cfg)
        history = trainer.fit(x_tr, y_tr, val=(x_val, y_val))
        probs = predict_probs(trainer.model, x_te)

        fold_metrics = metrics.binary_metrics(y_te, probs, threshold)
        row = {
            "fold": fold,
            "n_test": int(len(y_te)),
            "n_test_groups": len(set(g_te)),
            "n_test_stone": int(y_te.sum()),
            "roc_auc": _finite_or_none(fold_metrics["roc_auc"]),
            "epochs_run": len(history),
            "seconds": round(time.perf_counter() - started, 1),
        }
        fold_rows.append(row)
        logger.info(
            "fold %d/%d: test AUC %s on %d groups",
            fold + 1,
            n_folds,
            row["roc_auc"],
            row["n_test_groups"],
        )
        all_probs.append(probs)
        all_labels.append(y_te)
        all_groups.extend(f"fold{fold}:{g}" for g in g_te)
        del trainer
        keras.backend.clear_session()

    # Pooled out-of-fold evaluation with group-level bootstrap CIs.
    result = metrics.evaluate(
        np.concatenate(all_labels),
        np.concatenate(all_probs),
        all_groups,
        threshold,
        n_boot=n_boot,
        seed=train_cfg.seed,
    )
    result["folds"] = fold_rows
    result["protocol"] = (
        f"{n_folds}-fold cross-validation by group, stratified by group label; "
        f"{VAL_FRACTION:.0%} of each fold's training groups for early stopping; "
        "metrics on the pooled out-of-fold predictions"
    )
    result["config"] = {
        "model": to_dict(model_cfg),
        "preprocess": to_dict(preprocess_cfg),
        "train": to_dict(train_cfg),
    }
    report.write_report(result, out_dir, f"nephrolith {n_folds}-fold group cross-validation")
    (out_dir / "folds.json").write_text(json.dumps(fold_rows, indent=2), encoding="utf-8")
    return result


def _finite_or_none(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None
