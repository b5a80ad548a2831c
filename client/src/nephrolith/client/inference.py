"""Predictor: one loaded checkpoint turning CT slices and studies into scores, heatmaps and stones.

Study aggregation: the study score is the highest slice score, the same rule
as `metrics.aggregate_by_group` uses for patient- and study-level metrics. A
study is called "stone" when that score reaches the checkpoint's threshold.
"""

from __future__ import annotations

import hashlib
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from nephrolith.client.candidates import Candidate, CandidateSettings, find_candidates
from nephrolith.common import dip
from nephrolith.common.config import PreprocessConfig, from_dict
from nephrolith.common.constants import CLASS_NAMES
from nephrolith.common.errors import ModelError
from nephrolith.common.image import CTImage

logger = logging.getLogger(__name__)


@dataclass
class SlicePrediction:
    """Result for one slice.

    Attributes:
        probability: stone probability 0..1.
        label: class name of the verdict at the checkpoint's threshold.
        heatmap: normalised Grad-CAM heat 0..1 on the uploaded image's grid (H, W).
        display: the slice as uint8 grey levels (H, W), windowed like the model input.
        candidates: stone candidates, empty unless the label is the positive class.
    """

    probability: float
    label: str
    heatmap: np.ndarray
    display: np.ndarray
    candidates: list[Candidate] = field(default_factory=list)


@dataclass
class StudyPrediction:
    """Result for one volume.

    Attributes:
        score: study score, the highest slice probability.
        verdict: class name of the verdict at the checkpoint's threshold.
        slice_scores: stone probability per slice, shape (D,), in the volume's order.
        top_slices: indices of the highest-scoring slices, best first.
        heatmaps: slice index -> heat (H, W) for every top slice.
        displays: slice index -> uint8 grey slice (H, W) for every top slice.
        candidates: stone candidates from slices scoring at or above the threshold.
    """

    score: float
    verdict: str
    slice_scores: np.ndarray
    top_slices: list[int]
    heatmaps: dict[int, np.ndarray]
    displays: dict[int, np.ndarray]
    candidates: list[Candidate] = field(default_factory=list)


def model_fingerprint(model: Any, metadata: dict[str, Any]) -> str:
    """Return "sha256:<12 hex>" over the model's weights and its metadata.

    The id changes whenever a weight or the preprocessing changes, so responses can
    be traced to the exact model that produced them.
    """
    digest = hashlib.sha256()
    digest.update(json.dumps(metadata, sort_keys=True, default=str).encode("utf-8"))
    # Checkpoints record the SHA-256 of their weights file, which then stands for the weights.
    if not metadata.get("weights_sha256"):
        for array in model.get_weights():
            digest.update(np.ascontiguousarray(array).tobytes())
    return "sha256:" + digest.hexdigest()[:12]


def heat_to_image_grid(
    heat: np.ndarray, height: int, width: int, cfg: PreprocessConfig
) -> np.ndarray:
    """Map a heatmap from the model's (S, S) input back onto the uploaded slice's (H, W) grid.

    This inverts `dip.resize_square`: with keep_aspect the image was scaled so its
    longer side is S and centred between padding bands, which are cropped here
    before scaling back.
    """
    size = heat.shape[0]
    if cfg.keep_aspect:
        scale = size / max(height, width)
        new_h = max(1, min(size, round(height * scale)))
        new_w = max(1, min(size, round(width * scale)))
        top, left = (size - new_h) // 2, (size - new_w) // 2
        heat = heat[top : top + new_h, left : left + new_w]
    mapped = cv2.resize(heat.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
    return np.clip(mapped, 0.0, 1.0)


class Predictor:
    """A checkpoint loaded once, with its preprocessing, threshold and class names.

    Preprocessing runs in the caller's thread, but every model run goes through one
    dedicated thread, one batch at a time, so batches of concurrent requests
    interleave in arrival order. With 4 waitress threads calling TensorFlow
    directly, a ConvNeXt-Tiny server grew to 2.56 GB peak RSS over 80 requests;
    through one thread it stayed at 1.28 GB (benchmarks/api_load.py, 2 cores).
    """

    def __init__(
        self,
        model: Any,
        metadata: dict[str, Any],
        *,
        batch_size: int = 8,
        candidates: CandidateSettings | None = None,
    ) -> None:
        """Wrap a loaded model.

        Args:
            model: a tf_keras model returning logits (N, num_classes).
            metadata: the checkpoint metadata (keys "preprocess", "threshold",
                "class_names", "model", "provenance").
            batch_size: slices per model run.
            candidates: candidate search settings; defaults apply when None.

        Raises:
            ModelError: when the metadata lacks preprocessing or contains an invalid threshold.
        """
        if "preprocess" not in metadata:
            raise ModelError("checkpoint metadata: missing 'preprocess'; save the checkpoint again")
        self.model = model
        self.metadata = metadata
        self.preprocess = from_dict(PreprocessConfig, metadata["preprocess"], "metadata.preprocess")
        self.class_names = tuple(metadata.get("class_names") or CLASS_NAMES)
        self.threshold = float(metadata.get("threshold", 0.5))
        if not 0.0 <= self.threshold <= 1.0:
            raise ModelError(f"checkpoint metadata: threshold must be 0..1, got {self.threshold}")
        input_size = int(model.input_shape[1])
        if self.preprocess.image_size != input_size:
            raise ModelError(
                f"checkpoint metadata: preprocess.image_size {self.preprocess.image_size} differs "
                f"from the model input size {input_size}; save the checkpoint with matching sizes"
            )
        self.batch_size = batch_size
        self.candidate_settings = candidates or CandidateSettings()
        self.model_id = model_fingerprint(model, metadata)
        self._model_thread = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="nephrolith-model"
        )

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: str | Path, **kwargs: Any) -> Predictor:
        """Load a checkpoint folder written by `weights.save_checkpoint`."""
        from nephrolith.common import weights

        model, metadata = weights.load_checkpoint(Path(checkpoint_dir))
        predictor = cls(model, metadata, **kwargs)
        logger.info("model %s loaded", predictor.model_id)
        return predictor

    def info(self) -> dict[str, Any]:
        """Return the model description served by GET /v1/model."""
        return {
            "model_id": self.model_id,
            "architecture": self.metadata.get("model", {}),
            "class_names": list(self.class_names),
            "threshold": self.threshold,
            "preprocess": self.metadata["preprocess"],
            "provenance": self.metadata.get("provenance", {}),
            "nephrolith_version": self.metadata.get("nephrolith_version"),
            "created": self.metadata.get("created"),
            "study_aggregation": "max",
        }

    def _label(self, probability: float) -> str:
        return self.class_names[1] if probability >= self.threshold else self.class_names[0]

    def _display(self, pixels: np.ndarray, is_hu: bool) -> np.ndarray:
        if is_hu:
            grey = dip.window(pixels, *self.preprocess.hu_bounds)
        else:
            grey = np.clip(pixels, 0.0, 255.0)
        return np.round(grey).astype(np.uint8)

    def _run(self, slices: list[np.ndarray], is_hu: bool) -> tuple[np.ndarray, np.ndarray]:
        """Return stone probabilities (N,) and uint8 heat (N, S, S), one forward pass per batch."""
        from nephrolith.common import explain

        probs, heats = [], []
        for start in range(0, len(slices), self.batch_size):
            batch = np.stack(
                [
                    dip.preprocess_slice(s, is_hu, self.preprocess)
                    for s in slices[start : start + self.batch_size]
                ]
            )
            batch_probs, batch_heat = self._model_thread.submit(
                explain.grad_cam, self.model, batch
            ).result()
            probs.append(np.asarray(batch_probs, dtype=np.float64))
            heats.append(np.round(np.clip(np.asarray(batch_heat), 0.0, 1.0) * 255).astype(np.uint8))
        probs_all = np.concatenate(probs)
        if not np.all(np.isfinite(probs_all)):
            raise ModelError("the model returned non-finite probabilities; check the checkpoint")
        return probs_all, np.concatenate(heats)

    def predict_slice(self, ct: CTImage) -> SlicePrediction:
        """Score one slice and explain it.

        Args:
            ct: a 2-D CTImage (HU or display grey levels).

        Raises:
            ValueError: when `ct` is a volume.
        """
        if ct.is_volume:
            raise ValueError(f"predict_slice: expected a 2-D slice, got shape {ct.pixels.shape}")
        probs, heats = self._run([ct.pixels], ct.is_hu)
        probability = float(probs[0])
        height, width = ct.pixels.shape
        heat = heat_to_image_grid(heats[0] / 255.0, height, width, self.preprocess)
        label = self._label(probability)

        candidates: list[Candidate] = []
        if label == self.class_names[1]:
            candidates = find_candidates(
                heat,
                self.candidate_settings,
                hu=ct.pixels if ct.is_hu else None,
                spacing_mm=ct.spacing_mm,
            )
        return SlicePrediction(
            probability, label, heat, self._display(ct.pixels, ct.is_hu), candidates
        )

    def predict_study(self, ct: CTImage, top_k: int = 3) -> StudyPrediction:
        """Score every slice of a volume, aggregate to a study score and find stone candidates.

        Args:
            ct: a CTImage volume (D, H, W); a 2-D image counts as a one-slice study.
            top_k: number of highest-scoring slices returned with heatmaps.
        """
        volume = ct.pixels if ct.is_volume else ct.pixels[np.newaxis]
        probs, heats = self._run(list(volume), ct.is_hu)
        depth, height, width = volume.shape

        # Study score: the highest slice score (same rule as metrics.aggregate_by_group).
        score = float(probs.max())
        top = [int(i) for i in np.argsort(-probs, kind="stable")[: max(0, top_k)]]

        # Candidates only come from slices the model itself calls positive.
        positive = np.flatnonzero(probs >= self.threshold)
        heat_volume = np.zeros(volume.shape, dtype=np.float16) if len(positive) else None
        for index in positive:
            heat_volume[index] = heat_to_image_grid(
                heats[index] / 255.0, height, width, self.preprocess
            )
        candidates: list[Candidate] = []
        if heat_volume is not None:
            # A 2-D image sent as a study has no slice thickness, so its candidates get no size.
            spacing = ct.spacing_mm if ct.is_volume else None
            candidates = find_candidates(
                heat_volume,
                self.candidate_settings,
                hu=volume if ct.is_hu else None,
                spacing_mm=spacing,
            )

        heatmaps = {
            i: heat_to_image_grid(heats[i] / 255.0, height, width, self.preprocess) for i in top
        }
        displays = {i: self._display(volume[i], ct.is_hu) for i in top}
        return StudyPrediction(
            score=score,
            verdict=self._label(score),
            slice_scores=probs,
            top_slices=top,
            heatmaps=heatmaps,
            displays=displays,
            candidates=candidates,
        )
