"""Errors a user can act on.

Every expected failure (a bad config value, an unreadable data source, a checkpoint that does not fit, an
output that cannot be written) raises a ``MobysslError`` whose message names the key or file and the fix.
The command line prints such errors as one line and exits with code 2; any other exception is a bug and
keeps its traceback.
"""

from __future__ import annotations


class MobysslError(Exception):
    """An expected failure caused by the input or the environment, with what to do about it."""


class ConfigError(MobysslError, ValueError):
    """A recipe or override that cannot be turned into a valid config."""


class DataError(MobysslError, ValueError):
    """A data source that cannot be used."""


class CheckpointError(MobysslError, ValueError):
    """A checkpoint that is missing, unreadable or not what was expected."""


class BackboneError(MobysslError, ValueError):
    """An unknown backbone name or arguments the backbone cannot take."""


class RunDirError(MobysslError):
    """An output directory or output file that a command must not or cannot write."""
