"""Errors of hpo, split by what the caller must do.

One root (`HpoError`); a `SpecError` stops before any work starts, a `TrialFailed`
fails one trial and lets the worker go on, a `StorageError` wraps a database fault.
"""

from __future__ import annotations

import difflib


class HpoError(Exception):
    """Root of every error hpo raises on purpose."""

    exit_code = 1


class SpecError(HpoError):
    """A study spec is malformed; nothing has run yet.

    The message names the file, the field, what was expected and what to do.
    """

    exit_code = 2

    def __init__(self, source: str, field: str, message: str) -> None:
        self.source = source
        self.field = field
        self.detail = message
        where = f"[{field}] " if field else ""
        super().__init__(f"spec {source}: {where}{message}")


class OptionError(HpoError):
    """A command-line option is out of range or makes no sense; nothing has run yet.

    The message names the option, not the study file: the file is not at fault.
    """

    exit_code = 2

    def __init__(self, option: str, message: str) -> None:
        self.option = option
        super().__init__(f"option {option}: {message}")


class TrialFailed(HpoError):
    """One trial failed on its own (diverged, or an exception while building or fitting).

    The worker records the reason on the trial and carries on with the next one.
    """


class TrialDiverged(TrialFailed):
    """A seed's loss became NaN or infinite."""


class StorageError(HpoError):
    """The study database could not be reached or holds something unexpected."""


class StudyNotFound(StorageError):
    """No study (or trial) of the name given in the storage: bad input, like a bad spec."""

    exit_code = 2

    @classmethod
    def named(cls, study_name: str, names: list[str], where: str = "this storage") -> StudyNotFound:
        """The error for a `--study-name` the storage lacks: the closest name, and all of them."""
        return cls(f'no study "{study_name}" in {where}{did_you_mean(study_name, names)}; '
                   f'studies there: {", ".join(names) or "none"}')


class BackendError(HpoError):
    """The Keras backend asked for, or its device, cannot be used in this process; nothing
    has run yet."""

    exit_code = 2


def closest(word: str, options: list[str]) -> str | None:
    """The option closest to a mistyped word, or None when none is close."""
    close = difflib.get_close_matches(word, options, n=1)
    return close[0] if close else None


def did_you_mean(word: str, options: list[str]) -> str:
    """" (did you mean 'x'?)" for the option closest to a mistyped word, or ""."""
    close = closest(word, options)
    return f" (did you mean {close!r}?)" if close else ""
