"""One exception family for everything a user can get wrong.

The CLI catches `EnvEncError`, prints its message on one line and exits 2, so every message must say
what was wrong, where, and how to fix it.
"""


class EnvEncError(Exception):
    """Base class of every error a user can cause and fix."""


class ConfigError(EnvEncError):
    """A config file, preset or `--set` override is malformed, unknown or of the wrong type."""


class InputError(EnvEncError):
    """Data handed to a function (frames, batches, arrays) has the wrong shape, dtype or size."""


class ModelError(EnvEncError):
    """A model directory is missing, is not the expected kind of model, or cannot be loaded."""


class DataError(EnvEncError):
    """An artifact on disk (Parquet shards, checkpoints) is missing, empty, corrupt or inconsistent."""


class UnsupportedGameError(EnvEncError):
    """A game has no annotations (RAM decoding) or is not an ALE game."""
