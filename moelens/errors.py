"""Errors moelens raises for bad input. Each message says what happened and what to do next.

The CLI prints these without a traceback and exits non-zero; anything else is a bug.
"""

from __future__ import annotations

from collections.abc import Iterable


class MoelensError(Exception):
    """Base class: a user-facing problem with a clear message."""


class StoreError(MoelensError):
    """The trace store cannot be used as asked."""


class StoreNotFoundError(StoreError):
    """The database file does not exist (and we were not asked to create it)."""


class StoreCorruptError(StoreError):
    """The file exists but is not a moelens trace store."""


class StoreVersionError(StoreError):
    """The store was written by a newer moelens."""


class StoreLockedError(StoreError):
    """Another process holds the write lock for longer than we were willing to wait."""


class RunNotFoundError(StoreError):
    """A run id that the store does not have."""


class NotMoEError(MoelensError):
    """The model has no Mixture-of-Experts layer moelens can find."""


class InputError(MoelensError):
    """Input files or texts that cannot be read, or that contain nothing to record."""


class SteeringError(MoelensError):
    """An intervention that cannot be applied to this model."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """``" (did you mean X?)"`` for the closest of ``choices`` to a mistyped ``name``, else ``""``."""
    import difflib

    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""
