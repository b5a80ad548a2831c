"""Exception types of nephrolith; messages name the input, the expectation and the fix."""

from __future__ import annotations


class NephrolithError(Exception):
    """Base class for errors a user can fix (bad data, bad config, bad model file)."""


class DataError(NephrolithError):
    """An input file, folder or manifest is unreadable or does not hold what is expected."""


class ConfigError(NephrolithError):
    """A configuration value or option is invalid."""


class ModelError(NephrolithError):
    """A model, backbone source or checkpoint cannot be built or loaded."""
