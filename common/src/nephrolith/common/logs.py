"""Logging setup for entry points; library modules only create loggers."""

from __future__ import annotations

import logging
import os


def setup_logging(level: str | int | None = None) -> None:
    """Configure the root logger once, for CLIs, services and Flower apps.

    Args:
        level: a logging level name or number; defaults to the
            NEPHROLITH_LOG_LEVEL environment variable, then INFO.
    """
    if level is None:
        level = os.environ.get("NEPHROLITH_LOG_LEVEL", "INFO")
    root = logging.getLogger()
    if any(getattr(h, "_nephrolith", False) for h in root.handlers):
        root.setLevel(level)
        return
    handler = logging.StreamHandler()
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    )
    handler._nephrolith = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
