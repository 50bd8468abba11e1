"""The one error type the data layer raises for bad input."""

from __future__ import annotations


class DataError(ValueError):
    """A dataset, split, list file or sample that is missing, unreadable or inconsistent.

    The message always names the offending file, split or parameter and says what is wrong with it.
    """
