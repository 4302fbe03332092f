"""The failures megalite knows: each is reported as one short message naming the flag or file and the fix, without
a traceback, and the command exits non-zero (`megalite.cli`). Anything else is a bug and keeps its traceback."""
from __future__ import annotations


class MegaliteError(Exception):
    """A known failure; its message names the flag or file and the fix."""


class ConfigError(MegaliteError, ValueError):
    """An invalid combination of flags; the message names the flags and the fix."""


class DataError(MegaliteError):
    """Training data that cannot be used as given (ids outside the vocabulary, empty datasets or splits)."""


class CheckpointError(MegaliteError):
    """A checkpoint that is missing, damaged, of another model or of a format megalite does not read."""


class TrainingError(MegaliteError):
    """A run that cannot go on (a non-finite loss or gradient norm, too many skipped steps)."""
