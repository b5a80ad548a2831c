"""TensorFlow process settings that must be in place before TensorFlow is imported."""

from __future__ import annotations

import os
import sys


def configure_tensorflow(intra_op_threads: int | None = None, inter_op_threads: int = 1) -> None:
    """Set TensorFlow's environment before its first import in this process.

    TensorFlow reads its thread-pool sizes once, when it runs its first op, so
    they are passed through environment variables here. `TF_USE_LEGACY_KERAS=1`
    makes `tf.keras` resolve to tf_keras, which tensorflow_hub requires.

    Args:
        intra_op_threads: threads per op; defaults to the CPU count of this process.
        inter_op_threads: ops run in parallel; 1 avoids oversubscribing small machines.
    """
    if intra_op_threads is None:
        intra_op_threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 2
    os.environ.setdefault("TF_NUM_INTRAOP_THREADS", str(intra_op_threads))
    os.environ.setdefault("TF_NUM_INTEROP_THREADS", str(inter_op_threads))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    if "tensorflow" in sys.modules:
        # Too late to change the pools; the variables above only help child processes.
        return
