"""Compare traced Grad-CAM (explain.grad_cam) with the eager tape it replaced, in one run.

Usage: python benchmarks/bench_gradcam.py [--repeats 10] [--batch 1]
Prints a Markdown table; the numbers go into BENCHMARKS.md by hand with the date.
Models are built with random init (no weights can be downloaded here); speed does
not depend on the weight values.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from datetime import UTC, datetime

from nephrolith.common.runtime import configure_tensorflow

configure_tensorflow()

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from nephrolith.common import explain  # noqa: E402
from nephrolith.common.config import ModelConfig  # noqa: E402
from nephrolith.common.model import build_model, tiny_model_config  # noqa: E402


def eager_cam(model, x):
    """The pre-change implementation: the same maths with an eager GradientTape."""
    explainer = explain._explainer(model)
    with tf.GradientTape() as tape:
        features, logits = explainer(tf.convert_to_tensor(x), training=False)
        score = logits[:, 1] - logits[:, 0]
    grads = tape.gradient(score, features)
    alpha = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
    return tf.nn.relu(tf.reduce_sum(alpha * features, axis=-1)).numpy()


def median_ms(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()

    models = {
        "tiny 64 px": tiny_model_config(64),
        "compact 128 px, 768-dim encoder": ModelConfig(
            backbone_source="compact", input_size=128, compact_depths=(1, 1, 3, 1),
            compact_dims=(32, 64, 128, 256),
        ),
        "ConvNeXt-Tiny 224 px": ModelConfig(backbone_source="keras", backbone_weights="none"),
    }
    print(f"date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; machine: {platform.processor() or 'x86_64'}, "
          f"{len(os.sched_getaffinity(0))} cores, load {os.getloadavg()[0]:.1f}; "
          f"batch {args.batch}; median of {args.repeats}")
    print("| model | eager tape (ms) | traced grad_cam (ms) | speed-up |")
    print("|---|---|---|---|")
    rng = np.random.default_rng(0)
    for name, cfg in models.items():
        model = build_model(cfg)
        x = rng.uniform(0, 255, (args.batch, cfg.input_size, cfg.input_size, 3)).astype(np.float32)
        eager = median_ms(lambda: eager_cam(model, x), args.repeats)
        traced = median_ms(lambda: explain.grad_cam(model, x), args.repeats)
        print(f"| {name} | {eager:.1f} | {traced:.1f} | {eager / traced:.1f}x |")


if __name__ == "__main__":
    main()
