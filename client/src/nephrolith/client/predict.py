"""Batch prediction for the command line: JSON lines plus heatmap PNGs."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2

from nephrolith.common.errors import DataError

logger = logging.getLogger(__name__)


def _write_overlay(path: Path, display: Any, heat: Any) -> None:
    from nephrolith.common.explain import overlay

    rgb = overlay(display, heat)
    if not cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
        raise DataError(f"{path}: could not write the heatmap PNG; check the folder permissions")


def predict_paths(
    checkpoint_dir: Path, inputs: Sequence[Path], out_dir: Path, *, heatmaps: bool = True
) -> int:
    """Predict every file or DICOM series folder in `inputs` and write predictions.jsonl.

    A folder is read as one DICOM series (a study); a file as one slice, or as a
    study when it contains a volume (NIfTI, multi-frame DICOM). An input that cannot be
    read gets a line with its error instead of stopping the run.

    Args:
        checkpoint_dir: checkpoint folder written by train-local or the server.
        inputs: files and folders to score.
        out_dir: receives predictions.jsonl and, with `heatmaps`, one PNG per image
            (for a study, one per top slice).
        heatmaps: write Grad-CAM overlays.

    Returns:
        The number of inputs that were scored.
    """
    from nephrolith.client.inference import Predictor
    from nephrolith.common.io import read_study

    predictor = Predictor.from_checkpoint(checkpoint_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    scored = 0
    with (out_dir / "predictions.jsonl").open("w", encoding="utf-8") as sink:
        for index, path in enumerate(inputs):
            line: dict[str, Any] = {"input": str(path), "threshold": predictor.threshold}
            try:
                ct = read_study(path)
            except (DataError, NotImplementedError) as err:
                logger.warning("skipped input %d: %s", index, err)
                line["error"] = str(err)
                sink.write(json.dumps(line) + "\n")
                continue

            if ct.is_volume:
                study = predictor.predict_study(ct)
                line.update(
                    kind="study",
                    probability=study.score,
                    label=study.verdict,
                    slice_scores=[round(float(s), 6) for s in study.slice_scores],
                    top_slices=study.top_slices,
                    candidates=[c.to_json() for c in study.candidates],
                )
                if heatmaps:
                    line["heatmaps"] = []
                    for slice_index in study.top_slices:
                        target = out_dir / f"{index:05d}-slice{slice_index:04d}-heatmap.png"
                        _write_overlay(
                            target, study.displays[slice_index], study.heatmaps[slice_index]
                        )
                        line["heatmaps"].append(target.name)
            else:
                result = predictor.predict_slice(ct)
                line.update(
                    kind="slice",
                    probability=result.probability,
                    label=result.label,
                    candidates=[c.to_json() for c in result.candidates],
                )
                if heatmaps:
                    target = out_dir / f"{index:05d}-heatmap.png"
                    _write_overlay(target, result.display, result.heatmap)
                    line["heatmap"] = target.name
            sink.write(json.dumps(line) + "\n")
            scored += 1
    return scored
