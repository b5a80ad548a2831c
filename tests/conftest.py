"""Shared pytest fixtures: paths to the real data beside the repository, TF set-up."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nephrolith.common.runtime import configure_tensorflow

# TensorFlow reads its thread settings once; set them before any test imports it.
configure_tensorflow()

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("NEPHROLITH_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def require_shared(*parts: str) -> Path:
    """Return a path under the shared data folder, or skip (fail under CI=true) when absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        message = (
            f"real data not found at {path}; place the shared data folder beside the "
            "repository or set NEPHROLITH_SHARED_DATA"
        )
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def islam_subset() -> Path:
    """Folder of the 1,914-slice Islam et al. kidney CT subset."""
    return require_shared("ct-kidney-islam-subset")


@pytest.fixture(scope="session")
def stone_boxes() -> Path:
    """Folder of the extra stone slices with bounding boxes."""
    return require_shared("ct-kidney-islam-stone-boxes")


@pytest.fixture(scope="session")
def volume_samples() -> Path:
    """Folder of the real abdominal CT volumes (NIfTI and a JPEG 2000 DICOM series)."""
    return require_shared("ct-volume-samples")
