"""The errors this tool raises on purpose, all under one base class.

A ``SkiptuneError`` means the input or the environment is wrong (a bad value, a missing file, a
study of other settings), never that the code is: its message says what is wrong and what to do,
in the library's words. ``option`` names the setting it is about (``"nfe"``), so a front end can
name its own flag for it; the CLI prints ``--nfe: ...`` and exits 2. Any other exception is a bug
and keeps its traceback.
"""

from __future__ import annotations


class SkiptuneError(Exception):
    """Base of every error the tool raises on purpose."""

    def __init__(self, message: str, option: str | None = None) -> None:
        super().__init__(message)
        self.option = option


class InputError(SkiptuneError, ValueError):
    """A value is out of range, impossible, or does not fit the others."""


class ScheduleError(SkiptuneError, ValueError):
    """A schedule file or table is invalid, or made for another model."""


class NoSkipsError(SkiptuneError, TypeError):
    """The model has no long skips this tool knows how to find."""


class ModelLoadError(SkiptuneError, RuntimeError):
    """A model could not be loaded (missing files, not offline, untrusted pickle, missing package)."""


class DataNotFoundError(SkiptuneError, FileNotFoundError):
    """A data set's files are missing."""


class ReferenceStatsError(SkiptuneError, FileNotFoundError):
    """Reference statistics are missing, unreadable, or do not fit the features."""


class FeatureWeightsError(SkiptuneError, FileNotFoundError):
    """A feature extractor's weights are missing or unsafe to load."""


class StorageError(SkiptuneError, ValueError):
    """A study storage cannot be opened or written."""


class StudyError(SkiptuneError, ValueError):
    """A study is missing, was not made by this tool, or was run with other settings."""


class NonFiniteSamplesError(SkiptuneError, FloatingPointError):
    """The sampler produced NaN or inf (a ρ far from 1 can blow a model up)."""


class OutputPathError(SkiptuneError, OSError):
    """An output path cannot be written safely (not a regular file, or not writable)."""


class InputFileError(SkiptuneError, ValueError):
    """A file the tool reads is not a regular file, too large, or not of the expected form."""
