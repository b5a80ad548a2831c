"""nephrolith shared core: CT readers, DIP preprocessing, model, checkpoints and metrics."""

__version__ = "0.1.0"
