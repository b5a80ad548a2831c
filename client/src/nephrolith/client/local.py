"""Single-site work at a hospital: train a local model, evaluate a checkpoint, predict files."""

from __future__ import annotations

import json
import logging
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from nephrolith.common import __version__
from nephrolith.common.config import ModelConfig, PreprocessConfig, TrainConfig, from_dict, to_dict
from nephrolith.common.constants import CLASS_NAMES
from nephrolith.common.errors import DataError

logger = logging.getLogger(__name__)

# Decision threshold used when the validation split cannot tune one.
DEFAULT_THRESHOLD = 0.5


@dataclass(frozen=True)
class LocalRun:
    """Outputs of `train_local`: where the checkpoint went and what it scored."""

    checkpoint_dir: Path
    threshold: float
    history: list[dict[str, Any]]
    val_metrics: dict[str, Any]


def git_revision() -> str:
    """Return the git commit of the installed source tree, or "unknown" outside a checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


def load_records(data_dir: Path, manifest: Path | None, seed: int) -> list[Any]:
    """Discover the records of a CT folder and give every record a split.

    Records that already have a split (from a manifest) keep it. The others are
    split by patient, or by group without patient ids, never by image.
    """
    from nephrolith.common import data

    source = manifest if manifest is not None else data_dir
    records = data.discover(source)
    if not records:
        raise DataError(
            f"{source}: no readable CT images found; run `nephrolith-client check-data`"
        )
    if any(not r.split for r in records):
        records = data.assign_splits(records, seed=seed)
    return records


def _split_arrays(
    records: Sequence[Any], split: str, cfg: PreprocessConfig, cache_dir: Path | None
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    from nephrolith.common import data

    x, y, groups = data.load_split(records, split, cfg, cache_dir=cache_dir)
    if len(x) == 0:
        raise DataError(
            f"split {split!r} is empty; write a manifest with `check-data --write-manifest` "
            "or give more patients"
        )
    return x, y, groups


def train_local(
    data_dir: Path,
    out_dir: Path,
    *,
    model_cfg: ModelConfig,
    preprocess_cfg: PreprocessConfig,
    train_cfg: TrainConfig,
    manifest: Path | None = None,
    cache_dir: Path | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> LocalRun:
    """Train the classifier on one site's train split and save a checkpoint.

    The decision threshold is chosen on the validation split (Youden's J) and
    stored in the checkpoint with the preprocessing, so evaluation and the
    inference API apply exactly what training used.

    Args:
        data_dir: the hospital's CT folder (class sub-folders or a manifest.csv).
        out_dir: run folder; receives checkpoint/, history.json and config.json.
        model_cfg: architecture; its input_size must equal preprocess_cfg.image_size.
        preprocess_cfg: DIP settings.
        train_cfg: optimiser, epochs, seed.
        manifest: explicit manifest CSV; overrides discovery in data_dir.
        cache_dir: folder for preprocessed arrays, reused across runs.
        on_epoch: progress callback with each epoch's history entry.
    """
    from nephrolith.common import metrics
    from nephrolith.common.model import build_model
    from nephrolith.common.training import Trainer, predict_probs
    from nephrolith.common.weights import save_checkpoint

    if model_cfg.input_size != preprocess_cfg.image_size:
        model_cfg = replace(model_cfg, input_size=preprocess_cfg.image_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    # Data: split by patient or group, then preprocess once.
    records = load_records(data_dir, manifest, train_cfg.seed)
    x_train, y_train, _ = _split_arrays(records, "train", preprocess_cfg, cache_dir)
    x_val, y_val, val_groups = _split_arrays(records, "val", preprocess_cfg, cache_dir)
    logger.info(
        "train: %d images (%d stone), val: %d images (%d stone)",
        len(y_train),
        int(y_train.sum()),
        len(y_val),
        int(y_val.sum()),
    )

    # Model and training.
    import tf_keras as keras

    keras.utils.set_random_seed(train_cfg.seed)
    model = build_model(model_cfg)
    trainer = Trainer(model, train_cfg)
    history = trainer.fit(x_train, y_train, val=(x_val, y_val), on_epoch=on_epoch)

    # Threshold on validation data, never on test data.
    val_probs = predict_probs(model, x_val)
    if len(np.unique(y_val)) == 2:
        threshold = metrics.choose_threshold(y_val, val_probs)
    else:
        threshold = DEFAULT_THRESHOLD
        logger.warning(
            "validation split has a single class, so no threshold can be tuned on it; "
            "using %.2f. Give the validation split patients of both classes.",
            threshold,
        )
    val_metrics = metrics.binary_metrics(y_val, val_probs, threshold)

    metadata = {
        "model": to_dict(model_cfg),
        "preprocess": to_dict(preprocess_cfg),
        "class_names": list(CLASS_NAMES),
        "threshold": float(threshold),
        "provenance": {
            "kind": "local",
            "train": to_dict(train_cfg),
            "data": str(manifest or data_dir),
            "n_train": int(len(y_train)),
            "n_val": int(len(y_val)),
            "n_val_groups": len(set(val_groups)),
            "epochs_run": len(history),
            "backbone_weights": _weights_provenance(model_cfg),
            "git_revision": git_revision(),
            "seconds": round(time.perf_counter() - started, 1),
        },
        "nephrolith_version": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    checkpoint_dir = out_dir / "checkpoint"
    save_checkpoint(checkpoint_dir, model, metadata)
    (out_dir / "history.json").write_text(json.dumps(history, indent=2), encoding="utf-8")
    (out_dir / "config.json").write_text(
        json.dumps(
            {
                "model": to_dict(model_cfg),
                "preprocess": to_dict(preprocess_cfg),
                "train": to_dict(train_cfg),
            },
            indent=2,
        ),
        encoding="utf-8",
    )
    logger.info("checkpoint written to %s (threshold %.4f)", checkpoint_dir, threshold)
    return LocalRun(checkpoint_dir, float(threshold), history, _json_safe(val_metrics))


def _weights_provenance(cfg: ModelConfig) -> str:
    if cfg.backbone_source == "hub":
        return f"tensorflow-hub:{cfg.hub_handle}"
    if cfg.backbone_source == "compact":
        return "compact ConvNeXt, random init"
    if cfg.backbone_weights.lower() == "none":
        return "keras ConvNeXt-Tiny, random init"
    return f"keras ConvNeXt-Tiny, weights {cfg.backbone_weights}"


def _json_safe(values: dict[str, Any]) -> dict[str, Any]:
    safe: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, float) and value != value:
            safe[key] = None
        elif isinstance(value, np.generic):
            safe[key] = value.item()
        else:
            safe[key] = value
    return safe


def evaluate_checkpoint(
    checkpoint_dir: Path,
    data_dir: Path,
    out_dir: Path,
    *,
    split: str = "test",
    manifest: Path | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    cache_dir: Path | None = None,
    title: str | None = None,
) -> dict[str, Any]:
    """Evaluate a checkpoint on one split and write the JSON, PNG and HTML report.

    The split must come from a manifest or a seeded split of the same data the
    checkpoint was trained on. With a seeded split, `seed` must equal the training seed.
    """
    from nephrolith.common import metrics, report
    from nephrolith.common.training import predict_probs
    from nephrolith.common.weights import load_checkpoint

    model, meta = load_checkpoint(checkpoint_dir)
    preprocess_cfg = from_dict(PreprocessConfig, meta["preprocess"], "checkpoint preprocess")
    records = load_records(data_dir, manifest, seed)
    x, y, groups = _split_arrays(records, split, preprocess_cfg, cache_dir)
    sites = _sites_for(records, split, groups)

    probs = predict_probs(model, x)
    result = metrics.evaluate(
        y, probs, groups, float(meta["threshold"]), sites=sites, n_boot=n_boot, seed=seed
    )
    result["checkpoint"] = str(checkpoint_dir)
    result["split"] = split
    result["model_provenance"] = meta.get("provenance", {})
    history_path = Path(checkpoint_dir).parent / "history.json"
    if history_path.exists():
        result["history"] = json.loads(history_path.read_text(encoding="utf-8"))
    report.write_report(result, out_dir, title or f"nephrolith evaluation ({split} split)")
    return result


def _sites_for(records: Sequence[Any], split: str, groups: Sequence[str]) -> list[str] | None:
    """Return one site name per example, or None unless every record of the split has a site.

    A group (patient or scan) belongs to exactly one site, so the site of an
    example follows from its group.
    """
    site_of_group = {r.group: r.site for r in records if r.split == split}
    if not site_of_group or any(not site for site in site_of_group.values()):
        return None
    return [site_of_group[g] for g in groups]
